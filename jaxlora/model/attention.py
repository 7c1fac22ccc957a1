"""Attention kernels: causal self-attention for training and prefill, by implementation, with
packed samples (segment ids), and attention over a KV cache for decoding.

Every implementation computes the same function: softmax(q k^T / sqrt(hs)) v, causal, and with
segment ids (B, T) a token attends only to the earlier tokens of its own segment. Segments are
contiguous runs of equal ids, as `jaxlora.train.data` lays packed rows out (1, 2, ... per sample,
0 for the padding tail); padding tokens attend among themselves, so every output is finite.

- 'xla': jax.nn.dot_product_attention, the segments as a dense (B, 1, T, T) mask; the reference.
- 'cudnn': cuDNN flash attention through jax.nn.dot_product_attention; packed rows give it the
  segment mask as a (B, 1, T, T) bias.
- 'cudnn-ragged': packed rows through JAX's cuDNN call with its packed ("ragged") layout: each
  row's segments given as lengths and offsets, so the kernel skips the masked blocks
  (`cudnn_segment_attention`; unpacked rows as 'cudnn'); where that is not available (a JAX
  without it, a GPU before Hopper) the bias path. Not the default: measured on one H200
  (2026-12-02, JAX 0.11.2, cuDNN 9.19, B=2, T=2048, 32 heads, fwd+bwd) it took 1.77 ms against
  the bias path's 1.63 and 4.1 GiB of temporaries against 0.08 (64 segment slots per row: cuDNN
  keeps softmax statistics per slot), accurate to the same 5e-3 as the bias path.
- 'pallas': JAX's Pallas flash attention for GPUs (Triton), which reads segment ids itself.
- 'splash': JAX's splash attention for TPUs (Pallas), causal mask and segment ids, native GQA.
Pallas kernels run through Pallas's interpreter off their own backend (slow: tests only).
"""
from __future__ import annotations

import inspect
import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as pallas_gpu_attention
from jax.experimental.pallas.ops.tpu import splash_attention as splash

try:  # JAX's cuDNN attention call itself: jax.nn.dot_product_attention does not expose packing
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_fused
except ImportError:  # pragma: no cover - a JAX without it: packed rows take the bias path
    cudnn_fused = None

Array = jax.Array

ATTENTION_IMPLS = ("auto", "xla", "cudnn", "cudnn-ragged", "pallas", "splash")
# Before jax-ml/jax#39521 (merged after JAX 0.11.0) a packed cuDNN call with fewer k/v heads than
# q heads strode k/v by the q head count; older JAX gets k/v repeated to every q head instead.
CUDNN_PACKED_GQA = jax.__version_info__ >= (0, 11, 1)
SPLASH_LANES = 128  # splash's blocks are multiples of this; T is padded up to one


def pick_attention(impl: str, dtype: Any) -> str:
    """'auto' -> splash on a TPU; cuDNN flash attention on a GPU with 16-bit compute; else XLA."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    if backend == "tpu":
        return "splash"
    return "cudnn" if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla"


def causal_attention(q: Array, k: Array, v: Array, impl: str, segments: Array | None = None,
                     max_segments: int | None = None) -> Array:
    """Causal softmax attention of q (B, T, H, hs) over k, v (B, T, K, hs), K dividing H (query
    head h reads k/v head h // (H / K)); segments (B, T): packed samples (see the module
    docstring). impl: a resolved name of ATTENTION_IMPLS (not 'auto'). max_segments: cuDNN's
    packed layout only (`cudnn_segment_attention`)."""
    if impl == "pallas":
        return pallas_attention(q, k, v, segments)
    if impl == "splash":
        return splash_attention(q, k, v, segments)
    if impl == "cudnn-ragged" and segments is not None:
        return cudnn_segment_attention(q, k, v, segments, max_segments)
    impl = "cudnn" if impl == "cudnn-ragged" else impl
    if segments is None:  # k/v may have fewer heads: native GQA (cuDNN too)
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
    return masked_attention(q, k, v, segments, impl)


def masked_attention(q: Array, k: Array, v: Array, segments: Array, impl: str) -> Array:
    """jax.nn.dot_product_attention with the segments as a dense mask (cuDNN: a (B, 1, T, T) bias
    that costs its memory traffic and skips no block)."""
    same = segments[:, None, :, None] == segments[:, None, None, :]  # (B, 1, T, T)
    return jax.nn.dot_product_attention(q, k, v, mask=same, is_causal=True, implementation=impl)


# --------------------------------------------------------------------------- cuDNN, packed layout


def packed_max_segments(length: int) -> int:
    """The default static number of segment slots per row of `length` tokens for cuDNN's packed
    layout: one per 32 tokens, at least 2, at most 64 (rows of 2048: 64). Each slot costs
    softmax statistics of (B, H, T) floats and kernel blocks that exit at once."""
    return max(2, min(64, length // 32))


def segment_runs(segments: Array, max_segments: int) -> tuple[Array, Array, Array]:
    """Each row's runs of equal segment ids in the form of cuDNN's packed layout (JAX's
    fused_attention_stablehlo.dot_product_attention): `lengths` (B, M) int32, the tokens of run j
    of a row; `offsets` (B, M + 1) int32, the token where it starts; slots past a row's runs hold
    -1 in both (the extra offsets column is always -1). M = max_segments. `runs` (B,): how many
    runs each row has; in a row with more than M, the last slot takes the rest of the row (its
    runs would see each other: callers check `runs`), so every token always lies in a slot."""
    B, T = segments.shape
    starts = jnp.concatenate([jnp.ones((B, 1), bool), segments[:, 1:] != segments[:, :-1]], axis=1)
    first = jax.vmap(lambda s: jnp.nonzero(s, size=max_segments, fill_value=T)[0])(starts)  # (B, M)
    ends = jnp.concatenate([first[:, 1:], jnp.full((B, 1), T, first.dtype)], axis=1)
    used = first < T
    lengths = jnp.where(used, ends - first, -1).astype(jnp.int32)
    offsets = jnp.where(used, first, -1).astype(jnp.int32)
    offsets = jnp.concatenate([offsets, jnp.full((B, 1), -1, jnp.int32)], axis=1)
    return lengths, offsets, starts.sum(axis=1, dtype=jnp.int32)


def cudnn_packing_available() -> bool:
    """Whether this JAX's cuDNN attention call takes packed segments (q_offsets, kv_offsets)."""
    if cudnn_fused is None:
        return False
    return "q_offsets" in inspect.signature(cudnn_fused.dot_product_attention).parameters


def cudnn_packed_attention(q: Array, k: Array, v: Array, lengths: Array, offsets: Array) -> Array:
    """cuDNN flash attention over packed segments (`segment_runs`' lengths and offsets): causal
    within each segment, blocks outside every segment never computed. Hopper or later, bf16 or
    fp16; raises NotImplementedError (while tracing) where cuDNN cannot run it."""
    H, K = q.shape[2], k.shape[2]
    if K != H and not CUDNN_PACKED_GQA:
        k, v = (jnp.repeat(t, H // K, axis=2) for t in (k, v))
    return cudnn_fused.dot_product_attention(
        q, k, v, None, None, lengths, lengths, offsets, offsets, scale=1.0 / math.sqrt(q.shape[-1]),
        mask_type=cudnn_fused.MaskType.PADDING_CAUSAL, qkv_layout="BTNH")


def cudnn_segment_attention(q: Array, k: Array, v: Array, segments: Array, max_segments: int | None = None,
                            ) -> Array:
    """cuDNN attention over packed rows: the packed layout with `max_segments` slots a row
    (default `packed_max_segments`), or, in a batch where some row has more segments, the bias
    path (lax.cond; that branch is rematerialised in the backward pass rather than keeping its
    (B, 1, T, T) bias). Where the packed layout is unavailable: the bias path, with a note."""
    M = max_segments or packed_max_segments(q.shape[1])
    if M < 2:
        raise ValueError(f"max_segments must be at least 2 (one slot turns cuDNN's packing off), got {M}")
    if not cudnn_packing_available():
        _note("this JAX's cuDNN attention takes no packed segments: packed rows use a mask bias")
        return masked_attention(q, k, v, segments, "cudnn")
    lengths, offsets, runs = segment_runs(segments, M)
    bias_path = jax.checkpoint(lambda q, k, v, s, n, o: masked_attention(q, k, v, s, "cudnn"))
    try:
        return jax.lax.cond(jnp.any(runs > M), bias_path, lambda q, k, v, s, n, o: cudnn_packed_attention(
            q, k, v, n, o), q, k, v, segments, lengths, offsets)
    except NotImplementedError as e:  # cuDNN's checks while tracing: GPU generation, dtype, head size
        _note(f"cuDNN's packed layout is unavailable here ({e}): packed rows use a mask bias")
        return masked_attention(q, k, v, segments, "cudnn")


def _note(message: str) -> None:
    """Warn once per call site (Python's default warning filter), not once per traced layer."""
    warnings.warn(message, RuntimeWarning, stacklevel=3)


# --------------------------------------------------------------------------- Pallas kernels


def pallas_attention(q: Array, k: Array, v: Array, segments: Array | None) -> Array:
    """JAX's Pallas flash attention (GPU kernel; interpreted elsewhere) with segment ids. Its
    kernel wants as many k/v heads as q heads: grouped k/v are repeated (HF's repeat_kv order)."""
    H, K, T = q.shape[2], k.shape[2], q.shape[1]
    k, v = (jnp.repeat(t, H // K, axis=2) for t in (k, v))
    block = min(128, T)  # the kernel's blocks must divide T
    sizes = pallas_gpu_attention.BlockSizes(block_q=block, block_k=block, block_q_dkv=min(32, T),
                                           block_kv_dkv=min(32, T), block_q_dq=min(32, T), block_kv_dq=min(32, T))
    return pallas_gpu_attention.mha(q, k, v, segments, sm_scale=1.0 / math.sqrt(q.shape[-1]), causal=True,
                                    block_sizes=sizes, interpret=jax.default_backend() != "gpu")


def splash_attention(q: Array, k: Array, v: Array, segments: Array | None) -> Array:
    """JAX's splash attention (TPU kernel; interpreted elsewhere): a causal mask whose fully
    masked blocks are skipped, segment ids, grouped k/v read in place. T is padded up to a
    multiple of 128 (the tail as a segment of its own: causal attention never lets a real token
    see it) and cut off again; the kernel takes one row with heads first, so rows are vmapped."""
    T, H, hs = q.shape[1:]
    padded = -(-T // SPLASH_LANES) * SPLASH_LANES
    widths = ((0, 0), (0, padded - T), (0, 0), (0, 0))
    q, k, v = (jnp.pad(t, widths).swapaxes(1, 2) for t in (q * (1.0 / math.sqrt(hs)), k, v))  # (B, heads, T, hs)
    ids = None
    if segments is not None:
        segments = jnp.pad(segments, ((0, 0), (0, padded - T)), constant_values=-1)
        ids = splash.SegmentIds(q=segments, kv=segments)
    kernel = _splash_kernel(H, padded, jax.default_backend() != "tpu")
    return jax.vmap(kernel)(q, k, v, ids).swapaxes(1, 2)[:, :T]


def _splash_kernel(heads: int, length: int, interpret: bool) -> Any:
    """A splash kernel for (heads, length), built in the trace that calls it: its mask tables are
    that trace's constants (a kernel kept across traces would carry their tracers out)."""
    block = next(b for b in (512, 256, SPLASH_LANES) if length % b == 0)
    # the fused backward: one kernel for dq, dk and dv (one pass over the blocks, not two)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, use_fused_bwd_kernel=True)
    mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * heads)
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


# --------------------------------------------------------------------------- decoding


def write_kv(cache: dict, k: Array, v: Array, slot: Array | int) -> dict:
    """The cache {"k", "v"} (B, K, S, hs) with k and v (B, T, K, hs) written at slots
    slot..slot+T-1 of every row: one in-place update each (the cache is donated)."""
    return {name: jax.lax.dynamic_update_slice(cache[name], new.swapaxes(1, 2).astype(cache[name].dtype),
                                               (0, 0, slot, 0)) for name, new in (("k", k), ("v", v))}


def cached_attention(q: Array, k: Array, v: Array, kv_mask: Array) -> Array:
    """softmax(q k^T / sqrt(hs)) v over the cached slots kv_mask (B, S) marks; q (B, T, H, hs),
    k and v (B, K, S, hs), K dividing H (query head h reads k/v head h // (H / K), as HF's
    repeat_kv): heads before slots, so both products batch over leading axes (no transposed
    copy of the cache per step). Scores and softmax (`softmax_one_pass`) in float32."""
    B, T, H, hs = q.shape
    K = k.shape[1]
    q = q.reshape(B, T, K, H // K, hs)
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(hs)
    scores = jnp.where(kv_mask[:, None, None, None, :], scores, -jnp.inf)
    probs = softmax_one_pass(scores).astype(v.dtype)
    y = jnp.einsum("bkgts,bksd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return y.reshape(B, T, H, hs).astype(q.dtype)


def softmax_one_pass(scores: Array) -> Array:
    """softmax over the last axis, its max and normaliser from one variadic reduction (a running
    max and a sum rescaled to it, as online softmax keeps them). Decoding's scores put the slot
    axis last but not minor in memory, so XLA runs jax.nn.softmax's max and sum as two kernels;
    here they are one: 64 kernels fewer a Llama 3.1 8B step at batch 1, the step's attention -33 /
    -21 µs of ~385 in two calls (one H200, 2026-12-02, bench/decode_attention_check.py). Equal to
    jax.nn.softmax up to float rounding of the rescaled sum (~1e-6 relative)."""
    def combine(a: tuple, b: tuple) -> tuple:
        (m1, l1), (m2, l2) = a, b
        m = jnp.maximum(m1, m2)
        safe = jnp.where(m == -jnp.inf, 0.0, m)  # everything masked so far: both sums are 0
        return m, l1 * jnp.exp(m1 - safe) + l2 * jnp.exp(m2 - safe)
    axis = scores.ndim - 1
    m, total = jax.lax.reduce((scores, jnp.ones_like(scores)), (jnp.array(-jnp.inf, scores.dtype),
                              jnp.array(0.0, scores.dtype)), combine, (axis,))
    return jnp.exp(scores - jnp.expand_dims(m, axis)) / jnp.expand_dims(total, axis)
