"""The bench's experiment scripts compute what they claim before their timings mean anything:
bench/decode_attention_check.py's other ways of a decode step's attention against jaxlora's (the
two-pass softmax against `cached_attention` in float32, whole decode loops of each way against the
current one: grouped-query heads, masked slots), and bench/dropout_check.py's 16-bit dropout (its
drop rate and mean, and the adapter gradients of every way without dropout)."""
from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from decode_attention_check import WAYS, attention_variant, check  # noqa: E402
from dropout_check import adapter_loss, dropout_bits16, time_way  # noqa: E402

from jaxlora.config import LLaMAConfig  # noqa: E402
from jaxlora.model.attention import cached_attention  # noqa: E402


def test_two_pass_softmax_attention_equals_cached_attention():
    kq, kk, kv = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(kq, (2, 1, 8, 16), jnp.float32)
    k = jax.random.normal(kk, (2, 2, 24, 16), jnp.float32)  # 2 k/v heads for 8 query heads
    v = jax.random.normal(kv, (2, 2, 24, 16), jnp.float32)
    mask = (jnp.arange(24)[None, :] < jnp.array([[5], [24]])) | (jnp.arange(24)[None, :] == 20)
    expected = cached_attention(q, k, v, mask)
    twopass = attention_variant(two_pass=True, f32pv=False)
    np.testing.assert_allclose(twopass(q, k, v, mask), expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(twopass(q, k, v, ~mask | (jnp.arange(24) == 0)), expected, atol=1e-3)


def test_every_way_decodes_like_the_current_one():
    cfg = LLaMAConfig(block_size=64, vocab_size=64, n_layer=2, n_head=8, n_embd=128, n_kv_head=2)
    outs = {way: check(way, cfg, B=2, prompt=8, steps=6, layers=2, repeats=1, dtype=jnp.float32) for way in WAYS}
    for way, (row, out) in outs.items():
        assert row["us_per_step"] > 0 and row["kernels_per_step"] > 0
        reference = outs["current+oproj" if "oproj" in way else "current"][1]
        np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5, err_msg=way)
    assert not np.allclose(outs["current+oproj"][1], outs["current"][1], atol=1e-3)  # the product ran


def test_bits16_dropout_drops_the_rate_and_keeps_the_mean():
    x = jnp.ones((512, 1000), jnp.float32)
    y = dropout_bits16(jax.random.key(3, impl="rbg"), x, 0.05)
    dropped = float(jnp.mean(y == 0))
    assert abs(dropped - 0.05) < 0.002 and abs(float(jnp.mean(y)) - 1) < 0.003
    assert set(np.unique(np.asarray(y)).tolist()) == {0.0, np.float32(1 / 0.95)}
    other = dropout_bits16(jax.random.key(4, impl="rbg"), x, 0.05)
    assert float(jnp.mean((y == 0) & (other == 0))) < 0.004  # other keys, other masks


def test_dropout_ways_share_the_adapter_maths():
    keys = jax.random.split(jax.random.key(0), 4)
    x, g = jax.random.normal(keys[0], (16, 8)), jax.random.normal(keys[1], (16, 6))
    a, b = jax.random.normal(keys[2], (8, 2)), jax.random.normal(keys[3], (2, 6))
    key = jax.random.key(1, impl="rbg")
    plain = jax.grad(adapter_loss("none", 0.05), argnums=(0, 1, 2))(x, a, b, key, g)
    for way in ("flax", "bits16"):
        assert np.allclose(jax.grad(adapter_loss(way, 0.0), argnums=(0, 1, 2))(x, a, b, key, g)[1], plain[1], rtol=1e-5)
        dropped = jax.grad(adapter_loss(way, 0.5), argnums=(0, 1, 2))(x, a, b, key, g)
        assert not np.allclose(dropped[1], plain[1], rtol=1e-2)  # the mask is applied
    assert time_way("bits16", 32, 8, 6, 2, 0.05, 1)["ms"] > 0
