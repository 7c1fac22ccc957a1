"""Device loading through the engine holds about one layer's tensor on the host, whatever the source.

A model large enough to tell (8 layers, 2048 wide, LLaMA's 32000-token vocabulary, bfloat16:
~1.1 GB) is written as a lit-llama .pth and as a sharded HF safetensors directory; a fresh
process loads each onto the (CPU) device with `jaxlora.weights.load.load_base_model`, in the
stacked and the per-layer run layouts, sampling its RSS. On the CPU backend device arrays are
host memory too, so the host's share is RSS - baseline - what the device holds: it must stay
below one layer's tensors plus what the engine may read ahead (98 + 128 MiB, and 16 MiB for the
allocator). Measured 2026-12-01 (2 cores): 66 MiB per-layer and 109-147 MiB stacked; 2026-12-02
stacked 86 MiB alone and 197-214 MiB on a busy machine (the read-ahead fills while the device
copies wait), where the loaders that built a whole stacked leaf on the host held 426-491 MiB
(8 layers of c_attn alone are 192 MiB).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from fast_compile import default_env

from jaxlora.config import LLaMAConfig
from jaxlora.weights import hf, lit_llama
from jaxlora.weights.engine import READ_AHEAD_BYTES
from jaxlora.weights.safetensors_io import save_sharded, tensor_sizes
from jaxlora.weights.torch_zip import write_torch_zip

ROOT = Path(__file__).resolve().parent.parent
CONFIG = LLaMAConfig(n_layer=8, n_head=16, n_embd=2048, vocab_size=32000, padded_vocab_size=32000)
BF16 = np.dtype(ml_dtypes.bfloat16)

LOAD = """
import json, sys, threading, time, jax, jax.numpy as jnp
from flax import traverse_util
from jaxlora.config import LLaMAConfig
from jaxlora.model.llama import LLaMA
from jaxlora.parallel import sharding as shd
from jaxlora.weights.load import load_params

def rss():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * 4096

config = LLaMAConfig(**json.loads(sys.argv[3]))
model = LLaMA(config, param_dtype=jnp.bfloat16, scan_layers=sys.argv[2] == 'stacked')
shardings = shd.variable_shardings(model, shd.make_mesh(data=1), as_run=True)['params']
jax.jit(lambda x: x + 1)(jnp.zeros(4)).block_until_ready()  # the runtime up before the baseline
before, samples, done = rss(), [], threading.Event()

def sample():  # (time, RSS, bytes the (CPU) device holds), every 2 ms
    while not done.is_set():
        samples.append((time.perf_counter(), rss(), sum(a.nbytes for a in jax.live_arrays())))
        time.sleep(0.002)

thread = threading.Thread(target=sample)
thread.start()
params = jax.block_until_ready(load_params(model, sys.argv[4], sys.argv[1], 0, None, shardings))
done.set()
thread.join()
# host memory = RSS - baseline - device memory; a device buffer being filled shows in RSS before
# its array exists, so take the device's holdings up to 0.2 s later
worst = max(r - before - max(d for u, _, d in samples if t <= u <= t + 0.2) for t, r, _ in samples)
print(json.dumps({'host_peak': worst, 'loaded': sum(x.nbytes for x in jax.tree.leaves(params))}))
"""


def synthetic(keys: dict):
    """(key, bf16 tensor) for every key of {key: map}, in order, distinct values, one at a time."""
    block = np.random.default_rng(0).standard_normal(1 << 18).astype(BF16)
    for n, (key, m) in enumerate(keys.items()):
        yield key, np.resize(np.roll(block, -n * 7919), int(np.prod(m.lit_shape))).reshape(m.lit_shape)


def keyed(maps: list) -> dict:
    return {k: m for m in maps for k in m.keys(CONFIG.n_layer)}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("big")
    write_torch_zip(tmp / "lit-llama.pth", synthetic(lit_llama.sorted_like_lit(keyed(lit_llama.base_maps(CONFIG)))))
    hf_dir = tmp / "hf"
    hf_dir.mkdir()
    hf_keys = keyed(hf.base_maps(CONFIG))
    (hf_dir / "config.json").write_text(json.dumps(hf.config_to_hf(CONFIG, "bfloat16")))
    save_sharded(hf_dir, tensor_sizes((k, m.lit_shape, BF16) for k, m in hf_keys.items()), synthetic(hf_keys),
                 256 << 20)
    return {"lit": tmp / "lit-llama.pth", "hf": hf_dir}


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for the peak RSS")
@pytest.mark.parametrize("layout", ["stacked", "per_layer"])
@pytest.mark.parametrize("kind", ["lit", "hf"])
def test_device_load_holds_about_one_layer_on_the_host(sources, kind, layout):
    env = {**default_env(), "JAX_PLATFORMS": "cpu"}  # -O0 code would copy the weights at half the speed
    p = subprocess.run([sys.executable, "-c", LOAD, str(sources[kind]), layout, json.dumps(CONFIG.to_dict()), kind],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    layer = sum(int(np.prod(m.lit_shape)) for m in lit_llama.base_maps(CONFIG) if m.layered) * BF16.itemsize
    print(f"{kind} {layout}: loaded {r['loaded'] / 2**20:.0f} MiB; host peak {r['host_peak'] / 2**20:.0f} MiB, "
          f"one layer's tensors {layer / 2**20:.0f} MiB")
    assert r["loaded"] > 1_000_000_000
    assert r["host_peak"] < layer + READ_AHEAD_BYTES + (16 << 20), \
        f"{kind} {layout}: the host held {r['host_peak'] / 2**20:.0f} MiB"
