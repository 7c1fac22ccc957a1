"""Weight-only int8 (jaxlora.model.quantize) against float32: the kernels, the product, the model.

Tolerances, from the rounding: q = round(W / s), s = max|W[:, j]| / 127, so the error is
uniform in +-s/2 and a Gaussian column of n rows (max ~ sqrt(2 ln n) std) is reproduced to
sqrt(2 ln n) / 127 / sqrt(12) relative: 0.66% at n = 256, 0.9% at 4096-11008 (measured 0.87-0.92%
at 7B shapes). Each int8 product is then exact to float32 rounding (1e-5) against x @ (q * s).
Logits: tiny model (2 layers, 256 wide, 1,024 vocab), float32 compute. At the init scale (kernels
N(0, 0.02), adapters merged) int8 logits are within 3% (measured 1.6%) of the float32 logits' norm;
with the kernels scaled to 7B's gain per matmul (std x sqrt(fan_in) = 1.28), within 10% (measured
5.2%: the error grows through the layers, see docs/benchmarks.md). A wrong scale axis or a
dequantized kernel in the wrong dtype is off by ~100%. Top-1:
positions whose float32 top-2 margin exceeds 5x the int8 error's std must agree (random-init
logits are near-uniform, so top-1 over all positions is noise: see docs/benchmarks.md).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxlora.config import LLaMAConfig, LoRAConfig
from jaxlora.infer.decode import prepare
from jaxlora.model.layouts import init_variables
from jaxlora.model.llama import LLaMA
from jaxlora.model.quantize import Int8Kernel, dense_dot, dequantize, quantize_kernel, quantize_params, rows_padded_dot


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_kernel_rounding_per_output_channel():
    w = 0.02 * jax.random.normal(jax.random.key(7), (3, 256, 96))  # leading layer axis
    w = w.at[1, :, 5].set(0.0)  # an all-zero column
    k = quantize_kernel(w)
    assert k.q.dtype == jnp.int8 and k.q.shape == w.shape and k.scale.shape == (3, 96)
    np.testing.assert_allclose(k.scale, np.abs(np.asarray(w)).max(axis=1) / 127 + (np.asarray(w).std(axis=1) == 0),
                               rtol=1e-6)  # reduced over the input axis; a zero column gets scale 1
    err = np.abs(np.asarray(dequantize(k)) - np.asarray(w))
    assert (err <= np.asarray(k.scale)[:, None, :] / 2 + 1e-7).all()  # round to nearest, no clipping
    assert np.abs(np.asarray(k.q)).max() == 127  # every column's largest weight maps to +-127
    assert 0.004 < rel(dequantize(k), w) < 0.009  # ~0.66% for 256 Gaussian rows


@pytest.mark.parametrize("rows", [1, 3, 8])  # decode-sized (padded on GPU) and more
def test_int8_product_is_exact_for_the_dequantized_kernel(rows):
    w = 0.02 * jax.random.normal(jax.random.key(0), (256, 384))
    x = jax.random.normal(jax.random.key(1), (rows, 1, 256))
    k = quantize_kernel(w)
    with jax.default_matmul_precision("highest"):
        want = x @ dequantize(k)
        got = dense_dot(x, k, jnp.float32)
        assert got.shape == (rows, 1, 384) and got.dtype == jnp.float32
        assert rel(got, want) < 1e-5
        assert rel(got, x @ w) < 0.01  # the quantization error itself (~0.66%)
        half = dense_dot(x, k, jnp.bfloat16, jnp.float32)  # bf16 activations
        assert half.dtype == jnp.float32 and rel(half, want) < 0.01


def _logits(model, variables, tokens):
    with jax.default_matmul_precision("highest"):
        return np.asarray(model.apply(variables, tokens))[..., :model.config.vocab_size]


@pytest.mark.parametrize("gain,tol", [(1.0, 0.03), (8.0, 0.1)])  # init scale; 7B's per-matmul gain at width 256
def test_int8_logits_near_float32(gain, tol):
    config = LLaMAConfig(n_layer=2, n_head=4, n_embd=256, vocab_size=1024, block_size=64)
    model = LLaMA(config, LoRAConfig(r=4, targets=("q", "v", "up")))
    variables = init_variables(model, jax.random.key(0))
    flat = traverse_util.flatten_dict(variables["params"])
    flat = {k: v * gain if k[-1] == "kernel" and k[0] != "lm_head" else v for k, v in flat.items()}
    variables = {"params": traverse_util.unflatten_dict(flat),
                 "lora": jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(1), a.shape),
                                      variables["lora"])}
    tokens = jax.random.randint(jax.random.key(2), (4, 32), 0, config.vocab_size)
    ref = _logits(model, variables, tokens)

    m, v = prepare(model, jax.tree.map(jnp.copy, variables), merge=True, quantize="int8")
    flat = traverse_util.flatten_dict(v["params"], is_leaf=lambda _, x: isinstance(x, Int8Kernel))
    assert {k for k, x in flat.items() if isinstance(x, Int8Kernel)} == {k for k in flat if k[-1] == "kernel"}
    assert flat[("wte", "embedding")].dtype == jnp.float32  # the embedding is looked up, not multiplied
    got = _logits(m, v, tokens)
    err = rel(got, ref)
    assert err < tol, err
    m_merged, merged = prepare(model, jax.tree.map(jnp.copy, variables), merge=True)  # float32, adapters merged
    assert rel(_logits(m_merged, merged, tokens), ref) < 1e-4  # so the error above is int8's alone

    top2 = np.sort(ref, axis=-1)[..., -2:]
    confident = (top2[..., 1] - top2[..., 0]) > 5 * (got - ref).std()
    assert confident.sum() >= 8
    np.testing.assert_array_equal(got.argmax(-1)[confident], ref.argmax(-1)[confident])


def test_bad_mode_is_named():
    with pytest.raises(ValueError, match="quantize must be one of"):
        quantize_params({}, "int4")


@pytest.mark.parametrize("shape", [(1, 24), (3, 24), (2, 1, 24), (9, 24)])
def test_rows_padded_dot_equals_the_plain_product(shape):
    """The GPU's few-row padding (quantize.GPU_MIN_GEMM_ROWS) changes no value and no shape."""
    x = jax.random.normal(jax.random.key(1), shape, jnp.float32)
    kernel = jax.random.normal(jax.random.key(2), (24, 40), jnp.float32)
    want = jnp.dot(x, kernel, precision="highest")
    with jax.default_matmul_precision("highest"):
        got = rows_padded_dot(x, kernel, jnp.float32, min_rows=8)
    assert got.shape == want.shape == (*shape[:-1], 40)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
