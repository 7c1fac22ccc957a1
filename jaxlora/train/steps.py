"""The jitted training and evaluation steps.

Gradients are taken with respect to the `lora` collection only; the frozen `params` are a
plain argument (never closed over: a closure would embed them as constants). One step
consumes a batch of shape (n_micro, micro_batch, T) and accumulates gradients over the
micro-batches with `lax.scan`; the loss is the mean over every non-ignored token of the
whole batch (not an average of micro-batch means).

A packed batch (jaxlora.train.data.Batcher(packing=True)) also carries segment_ids and
positions: the model attends within a sample only, no target crosses from one sample to the
next (`shift_targets`), and micro-batches of padding alone (past `used_micro`) are skipped.
"""
from __future__ import annotations

import math

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from jaxlora.model.layouts import layered
from jaxlora.model.llama import LLaMA, head_logits, lm_head_kernel
from jaxlora.train.data import IGNORE_INDEX

Array = jax.Array


@flax.struct.dataclass
class TrainState:
    step: Array
    lora: Any
    opt_state: Any
    rng: Array


def init_train_state(lora: Any, optimizer: optax.GradientTransformation, seed: int = 0,
                     rng_impl: str | None = None) -> TrainState:
    """Step 0. rng_impl: a jax PRNG implementation for dropout ('threefry2x32', 'rbg', ...;
    None = jax's default). 'rbg' draws dropout masks with XLA's RngBitGenerator, much
    cheaper on GPU than threefry."""
    return TrainState(step=jnp.zeros((), jnp.int32), lora=lora, opt_state=optimizer.init(lora),
                      rng=jax.random.key(seed, impl=rng_impl))


def shift_targets(labels: Array, segment_ids: Array | None = None) -> Array:
    """Next-token targets aligned with positions: targets[:, t] = labels[:, t+1], last = ignore.
    segment_ids (packed samples): also ignore a target in another segment than its position's
    (a sample's last token does not predict the next sample's first)."""
    pad = jnp.full(labels.shape[:-1] + (1,), IGNORE_INDEX, labels.dtype)
    targets = jnp.concatenate([labels[..., 1:], pad], axis=-1)
    if segment_ids is None:
        return targets
    same = jnp.concatenate([segment_ids[..., 1:] == segment_ids[..., :-1], pad == 0], axis=-1)
    return jnp.where(same, targets, IGNORE_INDEX)


# The most logits one loss chunk forms: 4096 tokens of LLaMA-1's 32,000-word vocabulary (the
# GPU profile's loss_chunk), 0.5 GB in float32; larger vocabularies get fewer tokens a chunk.
MAX_CHUNK_LOGITS = 4096 * 32000
# A chunk may hold up to 5% more than that when it spares one: 4,096 tokens of Llama 3's 128,256
# words go as 4 x 1,024 tokens, not 5 x 1,021 with 1,009 rows of padding (a quarter more head work).
CHUNK_SLACK = 1.05


def loss_chunk_tokens(n: int, vocab: int, chunk_tokens: int) -> int:
    """Tokens a loss chunk takes for n tokens: 0 (the whole batch at once) when chunk_tokens <= 0 or
    one chunk holds them all, else n split evenly into the fewest chunks of at most chunk_tokens
    tokens and MAX_CHUNK_LOGITS logits (each with CHUNK_SLACK)."""
    if chunk_tokens <= 0:
        return 0
    cap = max(1, min(chunk_tokens, MAX_CHUNK_LOGITS // vocab))
    n_chunks = math.ceil(n / math.floor(cap * CHUNK_SLACK))
    return 0 if n_chunks <= 1 else math.ceil(n / n_chunks)


def token_nll_sum(hidden: Array, head_kernel: Array, targets: Array, chunk_tokens: int = 0) -> tuple[Array, Array]:
    """Sum of next-token cross-entropy over non-ignored targets, and their count.

    hidden (B, T, C) final normed states; head_kernel (C, V); targets (B, T), -1 = ignore.
    With chunk_tokens > 0 the logits are formed (and, in the backward pass, re-formed)
    one chunk of tokens at a time, so float32 logits for the whole batch never exist; a chunk
    holds about MAX_CHUNK_LOGITS logits at most (Llama 3's 128k vocabulary: ~1k tokens a chunk;
    `loss_chunk_tokens`).
    """
    C = hidden.shape[-1]
    h = hidden.reshape(-1, C)
    t = targets.reshape(-1)
    chunk_tokens = loss_chunk_tokens(h.shape[0], head_kernel.shape[-1], chunk_tokens)
    kernel = head_kernel.astype(hidden.dtype)

    def chunk_loss(h_c: Array, t_c: Array) -> Array:
        logits = head_logits(h_c, kernel)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, jnp.maximum(t_c, 0)[:, None], axis=-1)[:, 0]
        return jnp.sum(jnp.where(t_c != IGNORE_INDEX, lse - picked, 0.0))

    count = jnp.sum(t != IGNORE_INDEX)
    n = h.shape[0]
    if chunk_tokens <= 0 or chunk_tokens >= n:
        return chunk_loss(h, t), count
    n_chunks = -(-n // chunk_tokens)
    pad = n_chunks * chunk_tokens - n
    h = jnp.pad(h, ((0, pad), (0, 0))).reshape(n_chunks, chunk_tokens, C)
    t = jnp.pad(t, (0, pad), constant_values=IGNORE_INDEX).reshape(n_chunks, chunk_tokens)

    def body(total: Array, xs: tuple[Array, Array]) -> tuple[Array, None]:
        return total + jax.checkpoint(chunk_loss)(*xs), None
    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (h, t))
    return total, count


def make_loss_fn(model: LLaMA, chunk_tokens: int = 0) -> Callable[..., tuple[Array, Array]]:
    """loss_sum(lora, params, input_ids, labels, rng, segment_ids=None, positions=None) ->
    (summed token NLL, token count); segment_ids and positions (B, T) for packed samples.

    lora and params may come in either layout (jaxlora.model.layouts.layered); for a model with
    scan_layers=False pass params already split (split_layers_on_device), else every step
    re-slices the stacked weights."""
    use_dropout = model.lora is not None and model.lora.dropout > 0

    def loss_sum(lora: Any, params: Any, input_ids: Array, labels: Array, rng: Array | None,
                 segment_ids: Array | None = None, positions: Array | None = None) -> tuple[Array, Array]:
        rngs = {"dropout": rng} if use_dropout and rng is not None else {}
        variables = {"params": layered(model, params), "lora": layered(model, lora)}
        hidden = model.apply(variables, input_ids, deterministic=not rngs, positions=positions,
                             return_hidden=True, rngs=rngs, segment_ids=segment_ids)
        return token_nll_sum(hidden, lm_head_kernel(params), shift_targets(labels, segment_ids), chunk_tokens)
    return loss_sum


def make_train_step(model: LLaMA, optimizer: optax.GradientTransformation, chunk_tokens: int = 0,
                    donate: bool = True, shardings: tuple | None = None,
                    ) -> Callable[[TrainState, Any, dict[str, Array]], tuple[TrainState, dict]]:
    """A jitted train_step(state, params, batch) -> (state, metrics).

    batch: {"input_ids", "labels"} of shape (n_micro, micro_batch, T); packed: also "segment_ids",
    "positions" (same shape); its micro-batches of padding alone are skipped. metrics: loss (mean
    token NLL over the whole batch), tokens (non-ignored count), grad_norm.
    shardings: (state, params, batch, replicated) shardings on a mesh (jaxlora.train.build): the
    step then takes and returns exactly those; None lets jit follow its inputs.
    """
    loss_sum = make_loss_fn(model, chunk_tokens)
    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

    def train_step(state: TrainState, params: Any, batch: dict[str, Array]) -> tuple[TrainState, dict]:
        step_rng = jax.random.fold_in(state.rng, state.step)
        n_micro = batch["input_ids"].shape[0]

        def micro(carry: tuple, xs: tuple) -> tuple[tuple, None]:
            grads, total, count = carry
            ids, labels, i, *packed = xs
            (nll, cnt), g = grad_fn(state.lora, params, ids, labels, jax.random.fold_in(step_rng, i), *packed)
            return (jax.tree.map(jnp.add, grads, g), total + nll, count + cnt), None

        zeros = jax.tree.map(jnp.zeros_like, state.lora)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
        xs = (batch["input_ids"], batch["labels"], jnp.arange(n_micro))
        if "segment_ids" in batch:
            used = jnp.any(batch["segment_ids"] > 0, axis=(1, 2))
            xs, micro = xs + (batch["segment_ids"], batch["positions"]), skip_unused(micro, used)
        (grads, total, count), _ = jax.lax.scan(micro, init, xs)
        denom = jnp.maximum(count, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.lora)
        lora = optax.apply_updates(state.lora, updates)
        metrics = {"loss": total / denom, "tokens": count, "grad_norm": optax.tree.norm(grads)}
        return state.replace(step=state.step + 1, lora=lora, opt_state=opt_state), metrics

    donate_argnums = (0,) if donate else ()
    if shardings is None:
        return jax.jit(train_step, donate_argnums=donate_argnums)
    state_sh, params_sh, batch_sh, rep = shardings
    return jax.jit(train_step, in_shardings=(state_sh, params_sh, batch_sh), out_shardings=(state_sh, rep),
                   donate_argnums=donate_argnums)


def skip_unused(micro: Callable, used: Array) -> Callable:
    """`micro` for the micro-batches i with used[i]; for the others (padding alone) the carry
    unchanged, nothing computed."""
    def guarded(carry: tuple, xs: tuple) -> tuple[tuple, None]:
        return jax.lax.cond(used[xs[2]], micro, lambda c, _: (c, None), carry, xs)
    return guarded


def make_eval_step(model: LLaMA, chunk_tokens: int = 0, shardings: tuple | None = None,
                   ) -> Callable[[Any, Any, dict[str, Array]], tuple[Array, Array]]:
    """A jitted eval_step(lora, params, batch (B, T)) -> (summed NLL, token count), no dropout.
    shardings: (lora, params, batch, replicated) shardings on a mesh, or None."""
    loss_sum = make_loss_fn(model, chunk_tokens)

    def eval_step(lora: Any, params: Any, batch: dict[str, Array]) -> tuple[Array, Array]:
        return loss_sum(lora, params, batch["input_ids"], batch["labels"], None)
    if shardings is None:
        return jax.jit(eval_step)
    lora_sh, params_sh, batch_sh, rep = shardings
    return jax.jit(eval_step, in_shardings=(lora_sh, params_sh, batch_sh), out_shardings=(rep, rep))
