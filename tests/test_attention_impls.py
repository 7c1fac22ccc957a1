"""Attention implementations on packed rows, on CPU: cuDNN's packed-layout inputs (segment runs)
against a numpy reference, the cuDNN path's plumbing against a stand-in kernel that follows the
packed layout's contract, and TPU splash attention (Pallas interpreter) against the XLA path.
The real cuDNN kernel needs a Hopper GPU: bench/check_packed_attention.py."""
from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.model import attention
from jaxlora.model.attention import (
    causal_attention,
    masked_attention,
    pick_attention,
    segment_runs,
    softmax_one_pass,
)

# float32 on CPU, one softmax each: measured differences ~1e-7 (stand-in) and ~5e-6 (splash,
# which scales q before the product and sums in other blocks); the bounds are stated here.
ATOL, RTOL = 2e-5, 2e-5


def _layout(lengths: list[int], T: int) -> np.ndarray:
    """One row of segment ids: samples 1, 2, ... of `lengths` end to end, then padding (0)."""
    row = np.zeros(T, np.int32)
    start = 0
    for i, n in enumerate(lengths, start=1):
        row[start:start + n] = i
        start += n
    assert start <= T
    return row


def _reference_runs(row: np.ndarray, M: int) -> tuple[list[int], list[int], int]:
    """Runs of equal ids, by a plain loop; past M, the last slot takes the rest of the row."""
    starts = [t for t in range(len(row)) if t == 0 or row[t] != row[t - 1]]
    kept = starts[:M]
    ends = kept[1:] + [len(row)]
    lengths = [e - s for s, e in zip(kept, ends)]
    pad = M - len(kept)
    return lengths + [-1] * pad, kept + [-1] * (pad + 1), len(starts)


def _random_rows(rng: np.random.Generator, B: int, T: int) -> np.ndarray:
    rows = []
    for kind in range(B):
        if kind % 4 == 0:
            lengths = [T]  # one sample fills the row
        elif kind % 4 == 1:
            lengths = [int(rng.integers(1, T))]  # one sample and a padding tail
        else:
            lengths, left = [], T - int(rng.integers(0, T // 4))  # several, maybe a padding tail
            while left > 0:
                lengths.append(min(left, int(rng.integers(1, T // 3))))
                left -= lengths[-1]
        rows.append(_layout(lengths, T))
    return np.stack(rows)


@pytest.mark.parametrize("T, M", [(64, 4), (64, 64), (37, 2)])
def test_segment_runs_match_a_loop(T, M):
    rng = np.random.default_rng(T + M)
    segments = _random_rows(rng, 12, T)
    segments[5] = 0  # an all-padding row
    lengths, offsets, runs = jax.jit(segment_runs, static_argnums=1)(jnp.asarray(segments), M)
    assert lengths.shape == (12, M) and offsets.shape == (12, M + 1)
    assert lengths.dtype == offsets.dtype == runs.dtype == jnp.int32
    overflowed = 0
    for row, l, o, r in zip(segments, np.asarray(lengths), np.asarray(offsets), np.asarray(runs)):
        want_l, want_o, want_r = _reference_runs(row, M)
        np.testing.assert_array_equal(l, want_l)
        np.testing.assert_array_equal(o, want_o)
        assert r == want_r
        assert l[l > 0].sum() == T  # every token in a slot, overflow or not
        overflowed += want_r > M
    assert overflowed or M == 64  # the small M cases include rows past M


# --------------------------------------------------------------------------- cuDNN's packed path


def _stand_in(calls: list):
    """A kernel keeping the contract of JAX's cuDNN call with packed segments (fused_attention_
    stablehlo.dot_product_attention): per row, slot j covers tokens [q_offsets[j], + q_seqlen[j]),
    -1 marks unused slots, q_offsets has one more (unused, -1) column; causal within each slot.
    Tokens in no slot, or in two, or a malformed extra column, come out NaN."""
    real = attention.cudnn_fused

    def dot_product_attention(query, key, value, bias, mask, q_seqlen, kv_seqlen, q_offsets, kv_offsets,
                              fp8_params=None, *, scale, mask_type, qkv_layout, **_):
        B, T, _, hs = query.shape
        M = q_seqlen.shape[1]
        assert bias is None and mask is None and qkv_layout == "BTNH"
        assert mask_type == real.MaskType.PADDING_CAUSAL and scale == pytest.approx(hs ** -0.5)
        assert q_offsets.shape == (B, M + 1) and kv_seqlen.shape == (B, M)
        assert all(x.dtype == jnp.int32 for x in (q_seqlen, kv_seqlen, q_offsets, kv_offsets))
        calls.append(key.shape[2])
        t = jnp.arange(T)
        start, n = q_offsets[:, :M, None], q_seqlen[..., None]
        inside = (n >= 0) & (t >= start) & (t < start + n)  # (B, M, T)
        slot, covered = jnp.argmax(inside, axis=1), inside.sum(axis=1) == 1
        same = (slot[:, :, None] == slot[:, None, :])[:, None]
        out = jax.nn.dot_product_attention(query, key, value, mask=same, is_causal=True, scale=scale)
        ok = covered & jnp.all(q_offsets[:, M:] == -1, axis=1, keepdims=True) & jnp.all(
            (q_seqlen == kv_seqlen) & (q_offsets[:, :M] == kv_offsets[:, :M]), axis=1, keepdims=True)
        return jnp.where(ok[:, :, None, None], out, jnp.nan)

    return types.SimpleNamespace(dot_product_attention=dot_product_attention, MaskType=real.MaskType)


def _qkv(B: int, T: int, H: int, K: int, hs: int = 16, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(key, (B, T, n, hs)) for key, n in zip(keys, (H, K, K)))


def _value_and_grads(fn, q, k, v, segments):
    w = jax.random.normal(jax.random.key(9), q.shape)  # a random cotangent
    return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(w * fn(q, k, v, segments)), (0, 1, 2)))(q, k, v)


def _xla(q, k, v, segments):
    return masked_attention(q, k, v, segments, "xla")


def _assert_close(got, want):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=ATOL, rtol=RTOL), got, want)


@pytest.mark.parametrize("native_gqa", [True, False])
def test_cudnn_packed_path_equals_the_masked_reference(monkeypatch, native_gqa):
    calls = []
    monkeypatch.setattr(attention, "cudnn_fused", _stand_in(calls))
    monkeypatch.setattr(attention, "CUDNN_PACKED_GQA", native_gqa)
    # the bias branch must not be taken when every row fits: poison it
    monkeypatch.setattr(attention, "masked_attention", lambda q, k, v, s, impl: jnp.full_like(q, jnp.nan))
    segments = jnp.asarray(_random_rows(np.random.default_rng(1), 4, 64))
    q, k, v = _qkv(4, 64, 4, 2)
    cudnn = lambda q, k, v, s: causal_attention(q, k, v, "cudnn-ragged", s, max_segments=64)
    _assert_close(_value_and_grads(cudnn, q, k, v, segments), _value_and_grads(_xla, q, k, v, segments))
    assert calls and set(calls) == {2 if native_gqa else 4}  # grouped k/v read in place, or repeated


def test_cudnn_rows_past_max_segments_take_the_bias_path(monkeypatch):
    monkeypatch.setattr(attention, "cudnn_fused", _stand_in([]))
    monkeypatch.setattr(attention, "masked_attention", lambda q, k, v, s, impl: _xla(q, k, v, s))
    segments = _random_rows(np.random.default_rng(2), 2, 64)
    segments[1] = _layout([5] * 12, 64)  # 13 runs with the padding tail, past 4 slots
    segments = jnp.asarray(segments)
    q, k, v = _qkv(2, 64, 2, 2)
    cudnn = lambda q, k, v, s: causal_attention(q, k, v, "cudnn-ragged", s, max_segments=4)
    _assert_close(_value_and_grads(cudnn, q, k, v, segments), _value_and_grads(_xla, q, k, v, segments))


def test_cudnn_without_packing_takes_the_bias_path_with_a_note(monkeypatch):
    def unsupported(query, key, value, bias, mask, q_seqlen, kv_seqlen, q_offsets, kv_offsets, **kwargs):
        raise NotImplementedError("Packed layout requires a GPU with at least Hopper architecture.")

    stand_in = _stand_in([])
    stand_in.dot_product_attention = unsupported
    monkeypatch.setattr(attention, "masked_attention", lambda q, k, v, s, impl: _xla(q, k, v, s))
    segments = jnp.asarray(_random_rows(np.random.default_rng(3), 2, 32))
    q, k, v = _qkv(2, 32, 2, 2)
    want = _xla(q, k, v, segments)
    for fused, why in ((stand_in, "Hopper"), (None, "takes no packed segments")):
        monkeypatch.setattr(attention, "cudnn_fused", fused)
        with pytest.warns(RuntimeWarning, match=why):
            np.testing.assert_array_equal(causal_attention(q, k, v, "cudnn-ragged", segments), want)


# --------------------------------------------------------------------------- TPU splash (interpreted)


def test_splash_matches_xla_on_packed_rows_with_grouped_kv():
    segments = jnp.asarray(np.stack([_layout([50, 40, 30], 128), _layout([128], 128)]))
    q, k, v = _qkv(2, 128, 4, 2)
    _assert_close(_value_and_grads(lambda *a: causal_attention(*a[:3], "splash", a[3]), q, k, v, segments),
                  _value_and_grads(_xla, q, k, v, segments))


def test_splash_keeps_samples_apart_in_a_padded_length():
    """100 tokens (padded to 128 inside, cut back): equal to XLA, and a changed sample moves its own
    outputs only; unpacked, the padding is causal attention's own tail."""
    segments = jnp.asarray(_layout([30, 45, 20], 100)[None])  # and 5 tokens of padding
    q, k, v = _qkv(1, 100, 2, 1, seed=2)
    changed = slice(30, 75)  # sample 2
    q2, k2, v2 = (t.at[:, changed].multiply(-3.0) for t in (q, k, v))
    run = jax.jit(lambda q, k, v, s: causal_attention(q, k, v, "splash", s))
    a, b = np.asarray(run(q, k, v, segments)), np.asarray(run(q2, k2, v2, segments))
    np.testing.assert_allclose(a, _xla(q, k, v, segments), atol=ATOL, rtol=RTOL)
    others = np.ones(100, bool)
    others[changed] = False
    np.testing.assert_array_equal(a[:, others], b[:, others])
    assert not np.allclose(a[:, changed], b[:, changed])
    np.testing.assert_allclose(run(q, k, v, None), jax.nn.dot_product_attention(q, k, v, is_causal=True),
                               atol=ATOL, rtol=RTOL)


def test_auto_picks_splash_on_tpu_and_cudnn_on_gpu(monkeypatch):
    for backend, dtype, want in (("tpu", jnp.float32, "splash"), ("tpu", jnp.bfloat16, "splash"),
                                 ("gpu", jnp.bfloat16, "cudnn"), ("gpu", jnp.float32, "xla"),
                                 ("cpu", jnp.bfloat16, "xla")):
        monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
        assert pick_attention("auto", dtype) == want
    assert pick_attention("splash", jnp.float32) == "splash"
    with pytest.raises(ValueError, match="attention must be one of"):
        pick_attention("flash", jnp.float32)


def test_one_pass_softmax_equals_softmax_with_masked_slots():
    """Decoding's softmax: max and sum in one reduction, equal to jax.nn.softmax (f32, 1e-6)."""
    x = jax.random.normal(jax.random.key(0), (3, 5, 40), jnp.float32) * 4
    x = x.at[0, :, 7:].set(-jnp.inf).at[1, 2, :39].set(-jnp.inf)  # masked tails; a row of one slot
    np.testing.assert_allclose(softmax_one_pass(x), jax.nn.softmax(x, axis=-1), rtol=1e-6, atol=1e-7)
