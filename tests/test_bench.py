"""Smoke test of the throughput benchmark on the tiny preset (CPU): it runs the real train_step."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_throughput_smoke(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "train_throughput.py"), "--preset", "tiny",
                          "--shapes", "2x64", "--steps", "1", "--warmup", "1", "--profile", str(tmp_path),
                          "--profile_steps", "1"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(rows) == 1 and "error" not in rows[0], out
    row = rows[0]
    assert row["tokens_per_s"] > 0 and row["compile_s"] > 0 and 0 <= row["mfu"] < 1
    assert row["loss"] > 0 and row["batch"] == 2 and row["seq"] == 64
    assert row["tokens_per_s_synced"] > 0
    assert "device busy per step" in out and (tmp_path / "2x64" / "hlo.txt.gz").exists()  # the profile ran
