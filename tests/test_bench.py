"""Smoke test of the throughput benchmark on the tiny preset (CPU): it runs the real train_step."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_throughput_smoke(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "train_throughput.py"), "--preset", "tiny",
                          "--shapes", "2x64", "--steps", "1", "--warmup", "1", "--peak_tflops", "1", "--profile", str(tmp_path),
                          "--profile_steps", "1"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(rows) == 1 and "error" not in rows[0], out
    row = rows[0]
    assert row["tokens_per_s"] > 0 and row["compile_s"] > 0 and 0 <= row["mfu"] < 1
    assert row["loss"] > 0 and row["batch"] == 2 and row["seq"] == 64
    assert row["tokens_per_s_synced"] > 0
    assert "device busy per step" in out and (tmp_path / "2x64" / "hlo.txt.gz").exists()  # the profile ran


def test_throughput_plot_from_logs(tmp_path):
    import pytest
    pytest.importorskip("matplotlib")
    log = tmp_path / "runs.log"
    log.write_text("\n".join([
        "not json",
        json.dumps({"bench": "jaxlora", "batch": 2, "seq": 64, "scan_layers": 0, "tokens_per_s": 100.5, "mfu": 0.5}),
        json.dumps({"bench": "jaxlora", "batch": 2, "seq": 64, "scan_layers": 0, "quantize": "fp8",
                    "tokens_per_s": 150.0, "mfu": 0.7}),
        json.dumps({"peer": "peft", "batch": 2, "seq": 64, "tokens_per_s": 60.0}),
        json.dumps({"peer": "peft+compile", "batch": 2, "seq": 64, "tokens_per_s": 80.0}),
    ]))
    out = tmp_path / "t.png"
    subprocess.run([sys.executable, str(ROOT / "bench" / "plot_throughput.py"), str(log), "--out", str(out)],
                   check=True, capture_output=True, timeout=120)
    assert out.read_bytes()[:4] == b"\x89PNG"
    sys.path.insert(0, str(ROOT / "bench"))
    from plot_throughput import read_rows, series_name
    assert [series_name(r) for r in read_rows([str(log)])] == [
        "jaxlora bf16, per-layer weights", "jaxlora fp8, per-layer weights", "PyTorch PEFT", "PyTorch PEFT + torch.compile"]
    kept = read_rows([str(log)], {"quantize": "fp8"})  # rows without the key stay: the peers, and bf16 (no key)
    assert [r["tokens_per_s"] for r in kept] == [100.5, 150.0, 60.0, 80.0]
    assert [r["tokens_per_s"] for r in read_rows([str(log)], {"quantize": "none"})] == [100.5, 60.0, 80.0]
