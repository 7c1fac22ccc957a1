"""Streaming: converting a checkpoint larger than a memory budget keeps the peak RSS under it.

The converter runs in a fresh process whose peak RSS is read from /proc/self/status (VmHWM)
at exit; the budget is that of a process that only imports the same libraries, plus a margin
well below the file size.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fast_compile import default_env

from jaxlora.config import LLaMAConfig
from jaxlora.weights import jaxlora_dir as cio
from jaxlora.weights import lit_llama
from jaxlora.weights.torch_zip import TorchZipReader, write_torch_zip

ROOT = Path(__file__).resolve().parent.parent
MARGIN = 768 << 20  # allowed above the import baseline; the file is about twice that

# Runs `python <args>` and prints the peak RSS (VmHWM) at exit. getrusage's ru_maxrss would not
# do: Linux keeps it across fork+exec, so the child would report pytest's own peak.
WRAPPER = """
import atexit, runpy, sys
def _report():
    with open('/proc/self/status') as f:
        sys.stderr.write('PEAK_RSS_KB ' + [l.split()[1] for l in f if l.startswith('VmHWM:')][0] + chr(10))
atexit.register(_report)
sys.argv = sys.argv[1:]
if sys.argv[0] == '-c':
    exec(sys.argv[1])
else:  # as `python SCRIPT` does: the script's folder first on sys.path
    sys.path.insert(0, __import__('os').path.dirname(__import__('os').path.abspath(sys.argv[0])))
    runpy.run_path(sys.argv[0], run_name='__main__')
"""


def peak_rss(*args: str) -> tuple[int, str]:
    env = {**default_env(), "JAX_PLATFORMS": "cpu"}  # the budget was measured with XLA's default code
    p = subprocess.run([sys.executable, "-c", WRAPPER, *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return int(p.stderr.rsplit("PEAK_RSS_KB ", 1)[1].split()[0]) * 1024, p.stderr


def synthetic_items(config: LLaMAConfig):
    rng = np.random.default_rng(0)
    block = rng.standard_normal(1 << 18).astype(np.float32)
    maps = {k: m for m in lit_llama.base_maps(config) for k in m.keys(config.n_layer)}
    for n, key in enumerate(lit_llama.sorted_like_lit(maps)):
        shape = maps[key].lit_shape
        yield key, np.resize(np.roll(block, -n * 7919), int(np.prod(shape))).reshape(shape)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for the peak RSS")
def test_conversion_of_a_file_larger_than_the_budget(tmp_path):
    # Small but wide: 7B's vocabulary, n_embd 1024, 24 layers: ~1.5 GB of float32.
    config = LLaMAConfig(n_layer=24, n_head=8, n_embd=1024, vocab_size=32000)
    src = tmp_path / "lit-llama.pth"
    write_torch_zip(src, synthetic_items(config))
    size = src.stat().st_size
    baseline, _ = peak_rss("-c", "import jaxlora.weights.convert, jaxlora.model.llama, orbax.checkpoint, tensorstore")
    budget = baseline + MARGIN
    assert budget < size, (budget, size)

    peak, log = peak_rss("convert/from_lit_llama.py", "--checkpoint_path", str(src), "--out_dir",
                         str(tmp_path / "ck"), "--model_config", json.dumps(config.to_dict()))
    print(f"file {size / 2**20:.0f} MiB, baseline {baseline / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB; "
          + log.strip().splitlines()[-2])
    assert peak < budget, f"peak RSS {peak / 2**20:.0f} MiB >= budget {budget / 2**20:.0f} MiB"

    # And the data arrived: a few tensors, bit for bit.
    params = cio.ArrayTreeReader(tmp_path / "ck" / "params")
    maps = {m.lit_key: m for m in lit_llama.base_maps(config)}
    with TorchZipReader(src) as reader:
        for lit_key, i in [("lm_head.weight", None), ("transformer.wte.weight", None),
                           ("transformer.h.{i}.mlp.c_fc1.weight", 7), ("transformer.h.{i}.attn.c_attn.weight", 0)]:
            m = maps[lit_key]
            want = m.to_ours(reader.read(lit_key.format(i=i)))
            np.testing.assert_array_equal(params.read(m.path[1:], i), want)
