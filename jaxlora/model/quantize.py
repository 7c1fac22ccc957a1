"""Quantized frozen kernels: weight-only int8 for decoding, NF4 (QLoRA) for training and
decoding; `dense_dot` is the one product every layer calls, whatever its kernel holds.

NF4 (`jaxlora.model.nf4`): 4-bit codes and block scales; the product dequantizes the kernel in
the compute dtype right before the matmul, and its backward does so again instead of keeping
the dequantized kernel for the backward pass (a custom VJP): no bf16 copy of a layer's weights
outlives its product, so the frozen weights' memory stays ~4.1-4.5 bits per weight.

Int8: frozen kernels stored as int8 with one float32 scale per output channel.

    W (in, out)  ~  q * scale,   q = round(W / scale) in [-127, 127],   scale = max_i |W[i, :]| / 127

The rounding error is uniform in +-scale/2, so a kernel of Gaussian weights is reproduced to
~0.9% relative (max |W| of a 4096-11008-row column is ~4 std): each int8 matmul's output is
off by ~0.9% of its norm, against ~0.2% for bf16 weights. The activations stay in the
compute dtype (weight-only, like lit-llama's `--quantize llm.int8` in effect; no outlier
handling). The scale is per output column, so it is applied to the product, never to the
kernel: x @ (q * s) == (x @ q) * s. The product is `x @ q.astype(dtype)` with float32
accumulation: XLA on GPU fuses the int8 -> bf16 convert into its Triton GEMM's operand load, so
the weights cross memory as int8. At one row that GEMM is poor (7B, H200, jax 0.11.2: 6.3 ms of
matmul per step, slower than bf16's 3.7), at eight rows good (2.8 ms): decode-sized products are
padded to GPU_MIN_GEMM_ROWS rows (`rows_padded_dot`), which makes int8 batch-1 decoding 1.2x
bf16's (docs/benchmarks.md). A fused multiply-and-sum formulation (XLA's column reduction,
reading int8 once) was measured too and dropped: 5.0 ms per step at batch 1.

An `Int8Kernel` is a pytree (its leaves q, then scale), so it passes through jit, sharding,
`jax.tree.map` and the stacked/per-layer layout conversions like the array it replaces; a
leading layer axis on q carries over to scale.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxlora.config import FUSED_GATE_UP
from jaxlora.model.fp8 import E4M3, E4M3_MAX, forward_layout, fp8_product, fp8_product_transposed
from jaxlora.model.nf4 import (
    ABSMAX_BLOCK,
    NF4Kernel,
    dequantize_nf4,
    nf4_codes_and_absmax,
    nf4_specs,
    quantize_nf4,
    stored_rows,
)

Array = jax.Array
QUANTIZE_MODES = ("int8", "nf4", "nf4-dq", "fp8")  # nf4-dq: NF4 with double-quantized block scales (QLoRA)
# Per-channel scaled 8-bit kernels (`Int8Kernel`) and their largest value: int8 values multiplied in
# the compute dtype, or e4m3 values multiplied in FP8 (`jaxlora.model.fp8`).
EIGHT_BIT = {"int8": 127.0, "fp8": E4M3_MAX}
# On GPU a product of fewer rows (a decode step) is padded to this many: XLA's GEMMs for 8 rows read
# the kernel faster than its one-row kernels (7B, H200, 2026-11-28: bf16 250.7 vs 235.5 tok/s at
# batch 1, int8 296.1 vs 146.8), and the padding rows cost no memory traffic. 1: no padding.
GPU_MIN_GEMM_ROWS = 8


@flax.struct.dataclass
class Int8Kernel:
    """An 8-bit kernel (..., in, *out), int8 or float8_e4m3fn (`--quantize fp8`: its products run
    in FP8), and its float32 scales (..., *out); out_ndim: output axes (2 for the q/k/v kernel
    split by query group, as NF4Kernel's)."""

    q: Array
    scale: Array
    out_ndim: int = flax.struct.field(pytree_node=False, default=1)
    qt: Array | None = None  # fp8 only, optional: q again as (..., *out, in) (`fp8.forward_layout`)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    @property
    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in (self.q, self.scale, self.qt) if x is not None)


QuantizedKernel = Int8Kernel | NF4Kernel


def _quantize(w: Array, out_ndim: int = 1, mode: str = "int8") -> Int8Kernel:
    """Per-output-channel symmetric 8-bit values of w (..., in, *out), int8 or e4m3 (`EIGHT_BIT`);
    the reduction runs in float32."""
    wf = w.astype(jnp.float32)
    in_axis = wf.ndim - 1 - out_ndim
    scale = jnp.max(jnp.abs(wf), axis=in_axis) / EIGHT_BIT[mode]
    scale = jnp.where(scale > 0, scale, 1.0)  # an all-zero column: any scale represents it exactly
    scaled = wf / jnp.expand_dims(scale, in_axis)
    q = jnp.clip(jnp.round(scaled), -127, 127).astype(jnp.int8) if mode == "int8" else scaled.astype(E4M3)
    return Int8Kernel(q=q, scale=scale, out_ndim=out_ndim)


quantize_kernel = jax.jit(_quantize, static_argnums=(1, 2))


@functools.cache
def _int8_program(shardings: Int8Kernel | None, consume: bool, out_ndim: int, mode: str) -> Any:
    return jax.jit(functools.partial(_quantize, out_ndim=out_ndim, mode=mode), out_shardings=shardings,
                   donate_argnums=0 if consume else ())


def int8_specs(kernel: Int8Kernel, spec: PartitionSpec) -> Int8Kernel:
    """PartitionSpecs of an Int8Kernel's leaves for a float kernel sharded by `spec`: the int8
    values as the kernel, each output channel's scale with its column."""
    axes = tuple(spec) + (None,) * (kernel.q.ndim - len(spec))
    lead = kernel.q.ndim - 1 - kernel.out_ndim
    qt = None if kernel.qt is None else PartitionSpec(*axes[:lead], *axes[lead + 1:], axes[lead])
    return kernel.replace(q=PartitionSpec(*axes), scale=PartitionSpec(*axes[:lead], *axes[lead + 1:]), qt=qt)


def quantized_specs(kernel: QuantizedKernel, spec: PartitionSpec) -> QuantizedKernel:
    """The PartitionSpecs of a quantized kernel's leaves (or of its abstract shapes) when the
    float kernel it stands for is sharded by `spec`: sharded like it (`int8_specs`, `nf4_specs`)."""
    return int8_specs(kernel, spec) if isinstance(kernel, Int8Kernel) else nf4_specs(kernel, spec)


def quantized_shardings_like(kernel: QuantizedKernel, sharding: Any) -> Any:
    """The shardings of `kernel`'s leaves for a float kernel in `sharding` (a NamedSharding; any
    other sharding is used for every leaf)."""
    if not isinstance(sharding, NamedSharding):
        return jax.tree.map(lambda _: sharding, kernel)
    return jax.tree.map(lambda s: NamedSharding(sharding.mesh, s), quantized_specs(kernel, sharding.spec))


def map_output_axes(kernel: QuantizedKernel, fn: Callable[[Any], Any], out_ndim: int, keep_rows: bool = False
                    ) -> QuantizedKernel:
    """`kernel` with its output columns re-laid out by fn, which maps the trailing output axes of
    an array (..., *out) to (..., *new_out) (len(new_out) = out_ndim), numpy or jax; the layout
    conversions of `jaxlora.model.layouts` use it. keep_rows: a double-quantized NF4 kernel
    records each new row's stored row (`NF4Kernel.rows`), needed when fn re-orders rows; else
    the rows are taken to be in stored order."""
    if isinstance(kernel, Int8Kernel):
        return Int8Kernel(q=fn(kernel.q), scale=fn(kernel.scale), out_ndim=out_ndim)

    def rows_last(x: Any) -> Any:  # (..., *out, k) -> fn over out -> (..., *new_out, k)
        xp = np if isinstance(x, np.ndarray) else jnp
        return xp.moveaxis(fn(xp.moveaxis(x, -1, -1 - kernel.out_ndim)), -1 - out_ndim, -1)

    rows = None
    if keep_rows and kernel.double_quantized:
        rows = fn(stored_rows(kernel) if kernel.rows is None else kernel.rows)
    return kernel.replace(codes=rows_last(kernel.codes), absmax=rows_last(kernel.absmax), rows=rows,
                          out_ndim=out_ndim)


def kernel_leaves(kernel: QuantizedKernel) -> list[tuple[str, Any]]:
    """[(field name, leaf)] of a quantized kernel's present leaves, in field order (how quantized
    checkpoints name them: .../kernel/codes, .../kernel/absmax, ...)."""
    return [(f.name, getattr(kernel, f.name)) for f in dataclasses.fields(kernel)
            if f.metadata.get("pytree_node", True) and getattr(kernel, f.name) is not None]


def kernel_from_leaves(mode: str, leaves: dict[str, Any]) -> QuantizedKernel:
    """The quantized kernel (stored layout) of `mode` made of its named leaves (`kernel_leaves`)."""
    return Int8Kernel(**leaves) if mode in EIGHT_BIT else NF4Kernel(**leaves)


def abstract_quantized(shape: tuple[int, ...], mode: str) -> QuantizedKernel:
    """The leaves' shapes and dtypes (jax.ShapeDtypeStruct) of a (..., in, out) kernel quantized
    in `mode`, computing nothing (quantized checkpoints are checked against these)."""
    check_mode(mode)
    kernel = jax.ShapeDtypeStruct(tuple(shape), jnp.float32)
    if mode in EIGHT_BIT:
        return jax.eval_shape(functools.partial(_quantize, mode=mode), kernel)
    codes, absmax = jax.eval_shape(functools.partial(nf4_codes_and_absmax, out_ndim=1), kernel)
    if mode == "nf4":
        return NF4Kernel(codes=codes, absmax=absmax)
    lead, n_absmax = shape[:-2], absmax.shape[-1] * absmax.shape[-2]
    return NF4Kernel(codes=codes, absmax=jax.ShapeDtypeStruct(absmax.shape, jnp.uint8),
                     absmax_scale=jax.ShapeDtypeStruct((*lead, -(-n_absmax // ABSMAX_BLOCK)), jnp.float32),
                     absmax_offset=jax.ShapeDtypeStruct(tuple(lead), jnp.float32))


def check_mode(mode: str) -> None:
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, got {mode!r}")


def quantizes(path: tuple[str, ...], mode: str, head: bool | None = None) -> bool:
    """Whether `mode` quantizes the params leaf at `path`: the dense kernels; lm_head only with
    `head` (default: for int8, which decoding uses; QLoRA keeps the LM head in the compute
    dtype, and training keeps it for every mode)."""
    check_mode(mode)
    with_head = mode == "int8" if head is None else head
    return path[-1] == "kernel" and (with_head or path[0] != "lm_head")


def quantize_kernel_as(kernel: Array, mode: str, consume: bool = False, out_ndim: int = 1,
                       stored_order: tuple[Callable, Callable] | None = None) -> QuantizedKernel:
    """One float kernel (..., in, *out) in `mode`, on its devices, its leaves sharded like it
    (`quantized_specs`); consume: donate it to the int8 program. out_ndim, stored_order: for a
    kernel whose columns a run layout has re-laid out (`quantize_nf4`; int8 is per column)."""
    if mode not in EIGHT_BIT:
        return quantize_nf4(kernel, mode == "nf4-dq", out_ndim, stored_order)
    sharding = getattr(kernel, "sharding", None)
    placed = None
    if isinstance(sharding, NamedSharding):
        abstract = jax.eval_shape(functools.partial(_quantize, out_ndim=out_ndim, mode=mode),
                                  jax.ShapeDtypeStruct(kernel.shape, kernel.dtype))
        placed = quantized_shardings_like(abstract, sharding)
    return _int8_program(placed, consume, out_ndim, mode)(kernel)


def quantize_params(params: Any, mode: str = "int8", consume: bool = False, head: bool | None = None) -> Any:
    """The params with every leaf `quantizes` names quantized; embeddings and norm scales
    unchanged. Leaf by leaf, each on its device; consume: release each float kernel as soon as
    it is quantized (int8: donated; `params` is not usable afterwards), so the peak is the
    weights plus one quantized kernel."""
    check_mode(mode)

    def visit(node: Any, prefix: tuple[str, ...]) -> Any:
        out = {}
        for k, v in node.items():
            path = (*prefix, k)
            if isinstance(v, dict):
                out[k] = visit(v, path)
            elif is_float_kernel(v) and quantizes(path, mode, head):
                fused = tuple(path[-3:-1]) == FUSED_GATE_UP  # (C, 2, H): a column per (gate|up, h)
                out[k] = quantize_kernel_as(v, mode, consume, out_ndim=2 if fused else 1)
                if consume and isinstance(node, dict):
                    node[k] = None  # drop the float kernel now, not when the whole tree is done
            else:
                out[k] = v
        return out
    return visit(params, ())


@functools.cache
def _forward_layout_program(out_ndim: int) -> Any:
    return jax.jit(functools.partial(forward_layout, out_ndim=out_ndim))


def _is_quantized(x: Any) -> bool:
    return isinstance(x, (Int8Kernel, NF4Kernel))


def with_forward_layouts(params: Any) -> Any:
    """`params` with every FP8 kernel also held in its forward product's layout (`Int8Kernel.qt`:
    one transpose each, on its devices, once), so no step transposes it again; other leaves as they are."""
    def attach(k: Any) -> Any:
        if isinstance(k, Int8Kernel) and k.q.dtype == E4M3 and k.qt is None:
            return k.replace(qt=_forward_layout_program(k.out_ndim)(k.q))
        return k
    return jax.tree.map(attach, params, is_leaf=_is_quantized)


def without_forward_layouts(params: Any) -> Any:
    """`params` without the FP8 kernels' second layout (what a quantized checkpoint stores)."""
    return jax.tree.map(lambda k: k.replace(qt=None) if isinstance(k, Int8Kernel) else k, params,
                        is_leaf=_is_quantized)


def is_float_kernel(x: Any) -> bool:
    """A plain (unquantized) kernel array."""
    return not isinstance(x, (dict, Int8Kernel, NF4Kernel))


def rows_padded_dot(x: Array, kernel: Array, out_dtype: Any = None, min_rows: int | None = None) -> Array:
    """x (..., in) @ kernel (in, *out) -> (..., *out), x padded to at least `min_rows` rows first
    and the padding dropped from the result (None: GPU_MIN_GEMM_ROWS on GPU, 1 elsewhere)."""
    if min_rows is None:
        min_rows = GPU_MIN_GEMM_ROWS if jax.default_backend() == "gpu" else 1
    rows = math.prod(x.shape[:-1])
    if rows >= min_rows:
        return _dot(x, kernel, out_dtype)
    x2 = jnp.pad(x.reshape(rows, x.shape[-1]), ((0, min_rows - rows), (0, 0)))
    return _dot(x2, kernel, out_dtype)[:rows].reshape(*x.shape[:-1], *kernel.shape[1:])


def _dot(x: Array, kernel: Array, out_dtype: Any) -> Array:
    if kernel.ndim == 2:
        return jnp.dot(x, kernel, preferred_element_type=out_dtype)
    return jnp.tensordot(x, kernel, axes=1, preferred_element_type=out_dtype)  # kernel (in, *out)


def dense_dot(x: Array, kernel: Array | QuantizedKernel, dtype: Any, out_dtype: Any = None) -> Array:
    """x @ kernel in `dtype` (accumulated to `out_dtype`, default `dtype`). A quantized kernel
    goes through `frozen_dot`, whose backward rebuilds the kernel instead of keeping it."""
    if isinstance(kernel, (Int8Kernel, NF4Kernel)):
        return frozen_dot(x.astype(dtype), kernel, jnp.dtype(dtype), jnp.dtype(out_dtype or dtype))
    return rows_padded_dot(x.astype(dtype), kernel.astype(dtype), out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def frozen_dot(x: Array, kernel: QuantizedKernel, dtype: Any, out_dtype: Any) -> Array:
    """x (..., in) @ kernel (in, *out) for a quantized frozen kernel. int8: x @ q in `dtype` (XLA
    fuses the convert into the GEMM's operand load), scaled per output channel after; NF4: x @
    dequantized kernel. The backward (gradient for x only: the kernel is frozen) dequantizes
    again, so no float copy of the kernel is kept between the forward and backward passes."""
    if isinstance(kernel, Int8Kernel) and kernel.q.dtype == E4M3:
        return fp8_product(x, kernel.q, kernel.scale, kernel.out_ndim, out_dtype, kernel.qt)
    if isinstance(kernel, Int8Kernel):
        y = rows_padded_dot(x, kernel.q.astype(dtype), jnp.float32)
        return (y * kernel.scale).astype(out_dtype)
    return rows_padded_dot(x, dequantize_nf4(kernel, dtype), out_dtype)


def _frozen_dot_fwd(x: Array, kernel: QuantizedKernel, dtype: Any, out_dtype: Any) -> tuple[Array, Any]:
    return frozen_dot(x, kernel, dtype, out_dtype), kernel


def _frozen_dot_bwd(dtype: Any, out_dtype: Any, kernel: QuantizedKernel, g: Array) -> tuple[Array, None]:
    # The barrier keeps XLA from merging this dequantization with the forward's (common
    # subexpressions): merged, the float kernel would live from the forward to the backward pass
    # (7B, H200: 19.1 GiB compiled for NF4 at 4x256 against 16.1 for bf16).
    kernel = jax.lax.optimization_barrier(kernel)
    if isinstance(kernel, Int8Kernel) and kernel.q.dtype == E4M3:
        return fp8_product_transposed(g, kernel.q, kernel.scale, kernel.out_ndim, dtype), None
    if isinstance(kernel, Int8Kernel):  # g @ (q * scale).T == (g * scale) @ q.T
        g_scaled = (g.astype(jnp.float32) * kernel.scale).astype(dtype)
        return _dot_transposed(g_scaled, kernel.q.astype(dtype), kernel.out_ndim, dtype), None
    return _dot_transposed(g.astype(dtype), dequantize_nf4(kernel, dtype), kernel.out_ndim, dtype), None


def _dot_transposed(g: Array, kernel: Array, out_ndim: int, dtype: Any) -> Array:
    """g (..., *out) @ kernel (in, *out).T -> (..., in)."""
    if out_ndim == 1:
        return jnp.dot(g, kernel.T, preferred_element_type=dtype)
    g_axes, k_axes = tuple(range(g.ndim - out_ndim, g.ndim)), tuple(range(1, 1 + out_ndim))
    return jax.lax.dot_general(g, kernel, ((g_axes, k_axes), ((), ())), preferred_element_type=dtype)


frozen_dot.defvjp(_frozen_dot_fwd, _frozen_dot_bwd)


def dequantize(kernel: Int8Kernel) -> Array:
    """The float32 kernel an Int8Kernel stands for (q * scale), for checks."""
    return kernel.q.astype(jnp.float32) * jnp.expand_dims(kernel.scale, kernel.scale.ndim - kernel.out_ndim)


def dequantize_any(kernel: QuantizedKernel, dtype: Any = jnp.float32) -> Array:
    """The float kernel a quantized one stands for, in `dtype` (what the product multiplies by)."""
    if isinstance(kernel, Int8Kernel):
        return dequantize(kernel).astype(dtype)
    return dequantize_nf4(kernel, dtype)


dequantize_program = jax.jit(dequantize_any, static_argnums=1)  # one program per shape: host-side readers


def weight_bytes(params: Any) -> int:
    """Bytes of every array in a params tree (int8 kernels count as int8 + scales)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
