"""Text generation. For now: a minimal batched greedy decoder, used for evaluation samples.

`greedy_generate` runs a jitted `lax.while_loop` that re-runs the whole (fixed-length) token
buffer through the model for every new token: no KV cache, so each token costs a full
forward pass of the buffer. That is fine for the short evaluation samples of a training run
(and for small models); a KV-cache sampler with top-k / temperature is a separate module.

Prompts of different lengths are decoded together: each row is right-padded in one buffer
and the next token of row b is read at that row's own last position. Causal attention makes
the padding after a position invisible to it, so every row gets exactly the tokens it would
get alone.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.model import LLaMA, layered

Array = jax.Array
_LENGTH_MULTIPLE = 32  # buffer lengths are rounded up to this, so few programs are compiled
_cache: dict[Any, Any] = {}


def _decoder(model: LLaMA, max_new_tokens: int, eos_id: int, vocab_size: int) -> Any:
    key = (model, max_new_tokens, eos_id, vocab_size)
    if key in _cache:
        return _cache[key]

    def decode(variables: Any, buf: Array, last: Array) -> Array:
        variables = {name: layered(model, tree) for name, tree in variables.items()}
        B = buf.shape[0]
        rows = jnp.arange(B)
        head = variables["params"]["lm_head"]["kernel"]

        def cond(carry: tuple) -> Array:
            i, _, _, done = carry
            return (i < max_new_tokens) & ~jnp.all(done)

        def body(carry: tuple) -> tuple:
            i, buf, last, done = carry
            hidden = model.apply(variables, buf, return_hidden=True)
            h = hidden[rows, last]  # (B, C): each row's newest position
            logits = jnp.dot(h, head.astype(h.dtype), preferred_element_type=jnp.float32)[:, :vocab_size]
            tok = jnp.argmax(logits, axis=-1).astype(buf.dtype)
            nxt = jnp.minimum(last + 1, buf.shape[1] - 1)
            buf = buf.at[rows, nxt].set(jnp.where(done, buf[rows, nxt], tok))
            last = jnp.where(done, last, nxt)
            return i + 1, buf, last, done | (tok == eos_id)

        init = (jnp.zeros((), jnp.int32), buf, last, jnp.zeros((B,), bool))
        _, buf, _, _ = jax.lax.while_loop(cond, body, init)
        return buf

    fn = jax.jit(decode)
    if len(_cache) > 16:
        _cache.clear()
    _cache[key] = fn
    return fn


def greedy_generate(model: LLaMA, variables: Any, prompt_ids: Any, max_new_tokens: int,
                    eos_id: int | None, vocab_size: int | None = None) -> Any:
    """Greedy continuation of one prompt or a batch of prompts.

    Args:
      model: the LLaMA module (adapters, if any, are applied from `variables["lora"]`).
      variables: {"params": ..., "lora"?: ...}; passed to the jitted loop as an argument.
      prompt_ids: one prompt (1-D ints, e.g. `Tokenizer.encode(prompt, bos=True)`) or a
        sequence of prompts of any lengths.
      max_new_tokens: how many tokens to generate at most.
      eos_id: generation of a row stops at this id (not included in the output); None: never.
      vocab_size: only ids below this are generated (pass the tokenizer's size: the model's
        padded vocabulary may hold ids the tokenizer cannot decode); None: the model's vocab_size.

    Returns the new token ids (without the prompt, without EOS) as a 1-D int32 numpy array
    for one prompt, or a list of them for a batch.
    """
    single = len(prompt_ids) > 0 and np.ndim(prompt_ids[0]) == 0
    prompts = [np.asarray(p, np.int32).reshape(-1) for p in ([prompt_ids] if single else prompt_ids)]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("greedy_generate needs non-empty prompts")
    if max_new_tokens <= 0:
        empty = [np.zeros(0, np.int32) for _ in prompts]
        return empty[0] if single else empty
    lengths = np.array([len(p) for p in prompts])
    needed = int(lengths.max()) + max_new_tokens
    block = model.config.block_size
    if needed > block:
        raise ValueError(f"prompt of {lengths.max()} tokens + {max_new_tokens} new tokens exceeds the "
                         f"model's block_size {block}")
    T = min(-(-needed // _LENGTH_MULTIPLE) * _LENGTH_MULTIPLE, block)
    buf = np.zeros((len(prompts), T), np.int32)
    for b, p in enumerate(prompts):
        buf[b, :len(p)] = p
    eos = -1 if eos_id is None else int(eos_id)
    limit = model.config.vocab_size if vocab_size is None else min(int(vocab_size), model.config.padded_vocab_size)
    out = np.asarray(_decoder(model, int(max_new_tokens), eos, limit)(variables, jnp.asarray(buf),
                                                              jnp.asarray(lengths - 1, jnp.int32)))
    results = []
    for b, n in enumerate(lengths):
        new = out[b, n:n + max_new_tokens]
        stop = np.flatnonzero(new == eos)
        results.append(new[:stop[0]] if len(stop) else new)
    return results[0] if single else results
