"""Smoke test of the decoding benchmark on the tiny preset (CPU): the real prefill and decode programs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generate_throughput_smoke():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "generate_throughput.py"), "--preset", "tiny",
                          "--batches", "2", "--prompt_len", "16", "--new_tokens", "6", "--variants", "bf16,int8",
                          "--repeats", "1", "--logit_prompts", "2",
                          "--bandwidth_mb", "8"],  # a small array: the test reads only that it is measured
                         capture_output=True, text=True, timeout=300, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["variant"] for r in rows] == ["bf16", "int8"] and not any("error" in r for r in rows), out
    for r in rows:
        assert r["decode_tok_s"] > 0 and abs(r["total_tok_s"] - 2 * r["decode_tok_s"]) < 0.2
        assert r["ttft_s"] > 0 and r["compile_s"] > 0 and r["bound_tok_s"] > 0 and r["cache_len"] == 128
        assert r["bandwidth_gbs"] == max(r["read_gbs"], r["copy_gbs"]) > 0
    bf16, int8 = rows
    assert int8["step_bytes"] < bf16["step_bytes"]  # int8 kernels: fewer bytes per step
    assert 0 < int8["logit_err"] < 0.2 and "top1_agree" in int8
    assert "of bound" in out  # the table
