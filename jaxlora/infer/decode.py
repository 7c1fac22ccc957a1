"""Text generation with a KV cache: a prefill, then one-token decode steps, all on the device.

How `generate` runs:

1. Prompts of any lengths are right-padded into one (B, P) buffer. One jitted *prefill* runs
   them through the model, fills slots 0..P-1 of a preallocated KV cache of S slots and
   samples each row's first token from the logits at that row's own last prompt position
   (causal attention makes the padding after a position invisible to it).
2. One jitted *decode* program runs a `lax.while_loop` of one-token steps: each reads the
   weights once, writes every row's new k/v at one shared slot (P, P+1, ...: one in-place
   `dynamic_update_slice` per layer; the state, cache included, is donated), attends over
   the slots each row may see (its prompt, not its padding, and its generated tokens; RoPE
   has already placed every key at its row's true position, so slots need not be
   positions), samples, and stops after the requested tokens or when every row has
   produced EOS. No host round trip per token.

P and S are rounded up to multiples of LENGTH_MULTIPLE (P at most block_size), so a session
compiles a few programs: one prefill per (batch, P, S) and one decode per (batch, S); the
programs are cached by `functools.lru_cache` around `jax.jit`, keyed by the model and the
sampling settings. Params may arrive sharded over a mesh; jit follows their shardings.

Streaming (`on_tokens`): the decode program then runs `chunk` tokens per call; the next
chunk is queued before the previous chunk's tokens are read, so the device does not wait
for the host. A chunk costs one dispatch and one small device-to-host copy (tens of µs),
so chunks of 8-16 tokens stream smoothly at full speed; a per-token host callback inside the
loop would force a device-host synchronisation at every token instead.

Adapters: `prepare` merges them into the kernels once (functionally, `merge_lora`), or
leaves them unmerged (each step then also runs the small LoRA matmuls: what the trainer's
evaluation samples do, without a second copy of the weights). `prepare(quantize="int8")`
stores the frozen kernels as int8, "nf4" / "nf4-dq" as QLoRA's NF4 (`jaxlora.model.quantize`;
adapters then stay unmerged). Float and 8-bit gate and up kernels become one (C, 2, H) kernel
(`layouts.fuse_gate_up`, a `fused_mlp` model; unmerged adapters keep theirs): a token's two
largest products in one GEMM. Layouts: a model with
scan_layers=False (the fast GPU program: every layer's weights read once per token, no
slicing) wants per-layer frozen weights, which `prepare` makes once; stacked ones given to
it are sliced again on every call.
"""
from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.model.layouts import (
    can_fuse_gate_up,
    fuse_gate_up,
    layered,
    split_layers_on_device,
    stack_layers,
    unstack_layers,
)
from jaxlora.model.llama import STACKED, LLaMA, head_logits, init_cache, lm_head_kernel
from jaxlora.model.lora import merge_lora, merged_kernel
from jaxlora.model.quantize import Int8Kernel, NF4Kernel, quantize_params

Array = jax.Array
LENGTH_MULTIPLE = 64  # prompt and cache lengths are rounded up to this, so few programs are compiled
NO_EOS: tuple[int, ...] = ()  # no stop ids: rows run to max_new_tokens
STREAM_CHUNK = 16  # decode steps per device call when streaming


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from the logits (lit-llama's generate: top_k, then
    softmax(logits / temperature)). temperature 0 is greedy (argmax; top_k/top_p unused);
    top_k None: no limit; top_p 1.0: no nucleus cut (top_p < 1 keeps the smallest set of the
    most likely tokens whose probability reaches top_p, after the top_k cut)."""

    temperature: float = 0.8
    top_k: int | None = 200
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k <= 0:
            raise ValueError(f"top_k must be > 0 (or None for no limit), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = Sampling(temperature=0.0, top_k=None)


def sample_logits(logits: Array, key: Array, sampling: Sampling) -> Array:
    """Next token ids (B,) int32 from float logits (B, V)."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / sampling.temperature
    candidates = None  # the candidate logits, sorted descending (for the nucleus cut)
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        candidates = jax.lax.top_k(logits, sampling.top_k)[0]
        logits = jnp.where(logits < candidates[:, -1:], -jnp.inf, logits)
    if sampling.top_p < 1:
        if candidates is None:
            candidates = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(candidates, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # of the strictly more likely candidates
        n_keep = jnp.sum(mass_before < sampling.top_p, axis=-1)  # >= 1
        cutoff = jnp.take_along_axis(candidates, (n_keep - 1)[:, None], axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------- preparing weights

def prepare(model: LLaMA, variables: dict[str, Any], merge: bool = True, quantize: str | None = None,
            fuse_mlp: bool = True) -> tuple[LLaMA, dict[str, Any]]:
    """The model and variables to decode with: adapters merged into the kernels (merge=True,
    functionally, once) or kept separate; kernels quantized (quantize: a
    `jaxlora.model.quantize.QUANTIZE_MODES` mode; int8 quantizes the LM head too, NF4 keeps it);
    frozen weights in the layout `model` reads (per-layer for scan_layers=False, split on the
    device). With NF4, or kernels that arrive quantized (a quantized checkpoint), adapters
    stay unmerged, as QLoRA trained them: a LoRA update is mostly far below an NF4 step, so
    merged and rounded to 4 bits it would be lost. fuse_mlp: each block's gate and up kernels
    as one where they are float or 8-bit (a `fused_mlp` model, `layouts.fuse_gate_up`).

    Consumes `variables["params"]` (each kernel donated to its merge and quantization, deleted
    once split or fused, so the peak stays near the weights' size): do not use them afterwards.
    """
    params, lora = variables["params"], variables.get("lora")
    has_adapters = model.lora is not None and model.lora.r > 0 and bool(lora)
    arrived_quantized = any(isinstance(x, (Int8Kernel, NF4Kernel))
                            for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, (Int8Kernel, NF4Kernel))))
    merge = merge and not arrived_quantized and quantize in (None, "int8")
    with warnings.catch_warnings():  # CPU cannot donate; the copies are then transient
        warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
        if has_adapters and merge:
            lora = stack_layers(lora) if STACKED in params else unstack_layers(lora, model.config.n_layer)
            params = merge_lora(params, lora, model.lora, kernel_merge=_merge_kernel_consuming)
            model, lora = model.clone(lora=None), None
        elif not has_adapters:
            model, lora = model.clone(lora=None), None
        if quantize and not arrived_quantized:
            params = quantize_params(params, quantize, consume=True)
    params = split_layers_on_device(model, params)
    if fuse_mlp and can_fuse_gate_up(params):  # one product for gate and up (their adapters apart)
        params, model = fuse_gate_up(params), model.clone(fused_mlp=True)
    out = {"params": params}
    if lora is not None:
        out["lora"] = layered(model, lora)
    return model, out


# one kernel at a time, each old kernel donated: the peak is the weights plus one merged kernel,
# not plus all of them (a 30B model's q/k/v kernels alone are 16 GB in bf16)
_merge_kernel_consuming = jax.jit(merged_kernel, static_argnums=(3, 4), donate_argnums=0)


# ----------------------------------------------------------------------------- the programs

def _in_layout(model: LLaMA, variables: dict[str, Any]) -> dict[str, Any]:
    return {name: layered(model, tree) for name, tree in variables.items()}


def _for_decoding(model: LLaMA) -> tuple[Any, LLaMA]:
    """(the model's mesh, the model without it): the training's activation layout (rows split
    over data x fsdp) does not fit a few rows of decoding; the compiler lays those out itself."""
    return model.mesh, model.clone(mesh=None)


def _replicated(mesh: Any, *xs: Array) -> tuple[Array, ...]:
    """Results the host reads, whole on every device of the mesh the weights lie on: with
    weights sharded over several processes each process can then read them (no-op: no mesh)."""
    if mesh is None:
        return xs
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return tuple(jax.lax.with_sharding_constraint(x, whole) for x in xs)


def _is_eos(token: Array, eos_ids: tuple[int, ...]) -> Array:
    """Which rows' tokens are one of the stop ids (a few compares: the programs' shapes do not
    depend on how many ids there are)."""
    done = jnp.zeros(token.shape, bool)
    for e in eos_ids:
        done = done | (token == e)
    return done


def eos_tuple(eos_id: int | Sequence[int] | None) -> tuple[int, ...]:
    """generate's eos_id argument as the programs' key: None -> (), one id -> (id,), ids -> tuple."""
    if eos_id is None:
        return NO_EOS
    ids = [eos_id] if np.ndim(eos_id) == 0 else list(eos_id)
    return tuple(dict.fromkeys(int(i) for i in ids if int(i) >= 0))


def _next_token(variables: dict[str, Any], hidden: Array, key: Array, sampling: Sampling, vocab_limit: int) -> Array:
    logits = head_logits(hidden, lm_head_kernel(variables["params"]))[:, :vocab_limit]
    return sample_logits(logits, key, sampling)


@functools.lru_cache(maxsize=32)
def prefill_program(model: LLaMA, sampling: Sampling, vocab_limit: int, eos_ids: tuple[int, ...],
                    cache_len: int) -> Callable:
    """jit(prefill)(variables, tokens (B, P), lengths (B,), key) -> (state, first tokens (B,)).

    state = {cache, token: each row's newest token (not yet in the cache), pos: its position,
    slot: the cache slot the next step writes (P, then P+1, ...: the same for every row),
    valid: (B, S) the slots each row attends to (its prompt, then every generated token),
    done: row has produced EOS, key, step: tokens sampled so far}."""
    mesh, model = _for_decoding(model)

    def prefill(variables: dict, tokens: Array, lengths: Array, key: Array) -> tuple[dict, Array]:
        variables = _in_layout(model, variables)
        B, P = tokens.shape
        cache = init_cache(model, B, cache_len)
        hidden, cache = model.apply(variables, tokens, return_hidden=True, cache=cache)
        last = hidden[jnp.arange(B), lengths - 1]
        token = _next_token(variables, last, jax.random.fold_in(key, 0), sampling, vocab_limit)
        state = {"cache": cache, "token": token, "pos": lengths.astype(jnp.int32), "slot": jnp.asarray(P, jnp.int32),
                 "valid": jnp.arange(cache_len)[None, :] < lengths[:, None], "done": _is_eos(token, eos_ids),
                 "key": key, "step": jnp.ones((), jnp.int32)}
        return state, *_replicated(mesh, token)
    return jax.jit(prefill)


@functools.lru_cache(maxsize=32)
def decode_program(model: LLaMA, sampling: Sampling, vocab_limit: int, eos_ids: tuple[int, ...],
                   chunk: int) -> Callable:
    """jit(decode)(variables, state, limit) -> (state, tokens (B, chunk), n): up to
    min(chunk, limit) one-token steps in a while loop, fewer once every row is done; tokens
    of finished rows (and past n) are pad (EOS). The state is donated, and each step writes
    its k/v at one slot shared by all rows (one in-place update per layer, whatever the
    rows' positions)."""
    pad = eos_ids[0] if eos_ids else 0
    mesh, model = _for_decoding(model)

    def decode(variables: dict, state: dict, limit: Array) -> tuple[dict, Array, Array]:
        variables = _in_layout(model, variables)
        B = state["token"].shape[0]
        steps = jnp.minimum(limit, chunk)

        def cond(carry: tuple) -> Array:
            i, st, _ = carry
            return (i < steps) & ~jnp.all(st["done"])

        def body(carry: tuple) -> tuple:
            i, st, out = carry
            slot = st["slot"]
            valid = jax.lax.dynamic_update_slice(st["valid"], jnp.ones((B, 1), bool), (0, slot))
            hidden, cache = model.apply(variables, st["token"][:, None], positions=st["pos"][:, None],
                                        return_hidden=True, cache=st["cache"], cache_index=slot, kv_mask=valid)
            token = _next_token(variables, hidden[:, 0], jax.random.fold_in(st["key"], st["step"]), sampling,
                                vocab_limit)
            token = jnp.where(st["done"], pad, token)
            out = jax.lax.dynamic_update_slice(out, token[:, None], (0, i))
            st = {"cache": cache, "token": token, "pos": st["pos"] + 1, "slot": slot + 1, "valid": valid,
                  "done": st["done"] | _is_eos(token, eos_ids), "key": st["key"], "step": st["step"] + 1}
            return i + 1, st, out

        init = (jnp.zeros((), jnp.int32), state, jnp.full((B, chunk), pad, jnp.int32))
        n, state, out = jax.lax.while_loop(cond, body, init)
        return state, *_replicated(mesh, out, n)
    return jax.jit(decode, donate_argnums=1)


# ----------------------------------------------------------------------------- the API

def bucket(n: int, cap: int | None = None) -> int:
    """n rounded up to LENGTH_MULTIPLE (at most `cap`)."""
    rounded = -(-n // LENGTH_MULTIPLE) * LENGTH_MULTIPLE
    return rounded if cap is None else min(rounded, cap)


def _as_prompts(prompt_ids: Any) -> tuple[list[np.ndarray], bool]:
    single = len(prompt_ids) > 0 and np.ndim(prompt_ids[0]) == 0
    prompts = [np.asarray(p, np.int32).reshape(-1) for p in ([prompt_ids] if single else prompt_ids)]
    if not prompts:
        raise ValueError("no prompts given")
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        raise ValueError(f"empty prompt (prompt {empty[0]} has no tokens): give at least one token, e.g. BOS")
    return prompts, single


def generate(model: LLaMA, variables: dict[str, Any], prompt_ids: Any, max_new_tokens: int,
             sampling: Sampling = GREEDY, eos_id: int | Sequence[int] | None = None, vocab_size: int | None = None,
             seed: int = 0, chunk: int | None = None,
             on_tokens: Callable[[list[np.ndarray]], None] | None = None) -> list[np.ndarray]:
    """Continue a batch of prompts of any lengths; returns each row's new ids (1-D int32,
    without the prompt, cut before EOS).

    variables: {"params", "lora"?} (see `prepare`). eos_id: a row stops at this id, or at any
    of several (Llama 3 instruct: <|eot_id|> and <|end_of_text|>; not included); None: never.
    vocab_size: only ids below it are generated (the tokenizer's size; the padded vocabulary may hold ids it cannot decode); None: config.vocab_size.
    seed: the sampling key (same seed, prompts and settings: same tokens). chunk: decode
    steps per device call (None: all in one call, or STREAM_CHUNK with on_tokens). on_tokens: called
    with each row's newly arrived ids (possibly empty) as they come back from the device.
    """
    prompts, _ = _as_prompts(prompt_ids)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    cfg = model.config
    lengths = np.array([len(p) for p in prompts], np.int32)
    if int(lengths.max()) + max_new_tokens > cfg.block_size:
        raise ValueError(f"prompt of {int(lengths.max())} tokens + max_new_tokens {max_new_tokens} = "
                         f"{int(lengths.max()) + max_new_tokens} exceeds the model's context (block_size "
                         f"{cfg.block_size})")
    outputs: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens == 0:
        return [np.zeros(0, np.int32) for _ in prompts]
    eos = eos_tuple(eos_id)
    vocab_limit = cfg.vocab_size if vocab_size is None else min(int(vocab_size), cfg.padded_vocab_size)
    P = bucket(int(lengths.max()), cfg.block_size)
    S = bucket(P + max_new_tokens)  # prompts in slots 0..P-1, generated tokens after them
    tokens = np.zeros((len(prompts), P), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, :len(p)] = p
    finished = [False] * len(prompts)

    def take(new: np.ndarray) -> None:
        arrived = []
        for b, row in enumerate(new):
            got = []
            for t in row.tolist():
                if finished[b] or len(outputs[b]) + len(got) >= max_new_tokens:
                    break
                if t in eos:
                    finished[b] = True
                    break
                got.append(t)
            outputs[b].extend(got)
            arrived.append(np.asarray(got, np.int32))
        if on_tokens is not None:
            on_tokens(arrived)

    remaining = max_new_tokens - 1
    if chunk is None:  # all in one call (rounded up, so nearby lengths share a program), or streamed
        chunk = STREAM_CHUNK if on_tokens is not None else bucket(max(remaining, 1))
    with warnings.catch_warnings():  # CPU cannot donate the cache; it is then copied, as documented
        warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
        state, first = prefill_program(model, sampling, vocab_limit, eos, S)(
            variables, tokens, lengths, jax.random.key(seed))
        decode = decode_program(model, sampling, vocab_limit, eos, chunk)
        take(np.asarray(first)[:, None])
        queued: list[tuple[Array, Array]] = []
        while remaining > 0 and not all(finished):
            state, out, n = decode(variables, state, remaining)
            remaining -= chunk
            queued.append((out, n))
            if len(queued) > 1:  # read the previous chunk while this one runs
                out, n = queued.pop(0)
                take(np.asarray(out)[:, :int(n)])
        for out, n in queued:
            if not all(finished):
                take(np.asarray(out)[:, :int(n)])
    return [np.asarray(o, np.int32) for o in outputs]


def greedy_generate(model: LLaMA, variables: Any, prompt_ids: Any, max_new_tokens: int,
                    eos_id: int | Sequence[int] | None, vocab_size: int | None = None) -> Any:
    """Greedy continuation of one prompt (1-D ints) or a batch of prompts of any lengths.

    Adapters, if any, are applied unmerged from `variables["lora"]`. Returns the new ids
    (without the prompt, without EOS) as a 1-D int32 numpy array for one prompt, or a list
    of them for a batch. See `generate`.
    """
    prompts, single = _as_prompts(prompt_ids)
    out = generate(model, variables, prompts, max(int(max_new_tokens), 0), GREEDY, eos_id, vocab_size)
    return out[0] if single else out
