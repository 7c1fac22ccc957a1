"""The loss used by the train step: token NLL sum, chunking, and the head's backward dtype."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.train.steps import (
    CHUNK_SLACK,
    IGNORE_INDEX,
    MAX_CHUNK_LOGITS,
    head_logits,
    loss_chunk_tokens,
    token_nll_sum,
)


def _data(seed: int, B: int = 2, T: int = 24, C: int = 16, V: int = 40, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(B, T, C)), dtype)
    kernel = jnp.asarray(rng.normal(size=(C, V)) * 0.3, dtype)
    targets = rng.integers(0, V, size=(B, T))
    targets[rng.random((B, T)) < 0.3] = IGNORE_INDEX
    return hidden, kernel, jnp.asarray(targets)


def _reference_nll_sum(hidden, kernel, targets):
    """Independent: float64 numpy log-softmax."""
    logits = np.asarray(hidden, np.float64) @ np.asarray(kernel, np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    t = np.asarray(targets)
    keep = t != IGNORE_INDEX
    picked = np.take_along_axis(logp, np.maximum(t, 0)[..., None], -1)[..., 0]
    return -(picked * keep).sum(), keep.sum()


@pytest.mark.parametrize("chunk", [0, 7, 16, 48, 1000])
def test_nll_sum_matches_reference_for_any_chunking(chunk):
    hidden, kernel, targets = _data(0)
    total, count = token_nll_sum(hidden, kernel, targets, chunk)
    ref_total, ref_count = _reference_nll_sum(hidden, kernel, targets)
    assert int(count) == ref_count
    np.testing.assert_allclose(float(total), ref_total, rtol=1e-5)


def test_loss_chunks_are_even_and_bounded():
    """The fewest chunks within the bounds, of equal size: padding is less than one row a chunk."""
    assert loss_chunk_tokens(4096, 128256, 4096) == 1024  # Llama 3 at 8 x 512: 4 x 1,024, not 5 x 1,021
    assert loss_chunk_tokens(1024, 128256, 4096) == 0  # one chunk: the whole batch
    assert loss_chunk_tokens(8192, 32000, 4096) == 4096 and loss_chunk_tokens(4096, 32000, 4096) == 0
    assert loss_chunk_tokens(5000, 32000, 4096) == 2500 and loss_chunk_tokens(5000, 32000, 0) == 0
    for n in (1, 7, 100, 1000, 4096, 4100, 12345):
        for vocab, asked in ((32000, 4096), (128256, 4096), (50, 7), (50, 1)):
            chunk = loss_chunk_tokens(n, vocab, asked) or n
            n_chunks = -(-n // chunk)
            assert n_chunks * chunk - n < n_chunks
            assert chunk <= max(1, min(asked, MAX_CHUNK_LOGITS // vocab)) * CHUNK_SLACK


def test_chunked_gradient_equals_whole_batch_gradient():
    hidden, kernel, targets = _data(1)
    grad = lambda chunk: jax.grad(lambda h: token_nll_sum(h, kernel, targets, chunk)[0])(hidden)  # noqa: E731
    np.testing.assert_allclose(np.asarray(grad(5)), np.asarray(grad(0)), rtol=1e-5, atol=1e-6)


def _dot_input_dtypes(fn, *args):
    jaxpr = jax.make_jaxpr(fn)(*args)
    found = []

    def walk(jx):
        for eqn in jx.eqns:
            if eqn.primitive.name == "dot_general":
                found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
            for p in eqn.params.values():  # pjit, custom_vjp, checkpoint, scan bodies
                inner = getattr(p, "jaxpr", None)
                if inner is not None:
                    walk(getattr(inner, "jaxpr", inner))
    walk(jaxpr.jaxpr)
    return found


def test_bf16_head_backward_runs_in_bf16_and_matches_float32():
    hidden, kernel, targets = _data(2, C=32, V=64, dtype=jnp.bfloat16)
    loss = lambda h: token_nll_sum(h, kernel, targets)[0]  # noqa: E731
    dots = _dot_input_dtypes(jax.grad(loss), hidden)
    assert dots and all(d == ("bfloat16", "bfloat16") for d in dots), dots  # no float32 GEMM in the backward
    got = np.asarray(jax.grad(loss)(hidden), np.float32)
    ref = np.asarray(jax.grad(lambda h: token_nll_sum(h, kernel.astype(jnp.float32), targets)[0])(
        hidden.astype(jnp.float32)))
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-2  # bf16 operands: ~3e-3 expected


def test_head_logits_forward_is_float32():
    hidden, kernel, _ = _data(3, dtype=jnp.bfloat16)
    out = head_logits(hidden.reshape(-1, hidden.shape[-1]), kernel)
    assert out.dtype == jnp.float32


def test_head_logits_gradients_for_batched_hidden_states():
    """(B, T, C) hidden states, as model.apply gives the head: both gradients equal float64 ones
    (the kernel's gradient sums over every leading axis)."""
    hidden, kernel, _ = _data(4)
    weights = jnp.asarray(np.random.default_rng(5).normal(size=(hidden.shape[0], hidden.shape[1], kernel.shape[1])))
    d_hidden, d_kernel = jax.grad(lambda h, k: jnp.sum(head_logits(h, k) * weights), argnums=(0, 1))(hidden, kernel)
    w, h, k = (np.asarray(x, np.float64) for x in (weights, hidden, kernel))
    np.testing.assert_allclose(d_hidden, np.einsum("btv,cv->btc", w, k), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d_kernel, np.einsum("btc,btv->cv", h, w), rtol=1e-5, atol=1e-5)
