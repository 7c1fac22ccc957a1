"""Weight-only int8 for decoding: frozen kernels stored as int8 with one float32 scale per
output channel, dequantized inside the matmul.

    W (in, out)  ~  q * scale,   q = round(W / scale) in [-127, 127],   scale = max_i |W[i, :]| / 127

`x @ W` is computed as `(x @ q.astype(dtype)) * scale`: the scale is per output column, so it
is applied to the product, and the kernel operand is a plain int8 -> bf16 convert, which XLA
can fuse into the GEMM on GPU (the weights then cross memory as int8: half the bytes of
bf16). The activations stay in the compute dtype (weight-only quantization, like lit-llama's
`--quantize llm.int8` in effect; no outlier handling).

`matmul="reduce"` computes the product of a few rows (decode steps) instead as one fused
multiply-and-sum over the input axis, int8 read straight from memory, no GEMM: the fallback
for small-batch decoding should the GEMM path not fuse the convert
(`bench/generate_throughput.py --int8_matmul dot,reduce` measures both).

An `Int8Kernel` is a pytree (its leaves q, then scale), so it passes through jit, sharding,
`jax.tree.map` and the stacked/per-layer layout conversions like the array it replaces; a
leading layer axis on q carries over to scale.
"""
from __future__ import annotations

import math
from typing import Any

import flax
import jax
import jax.numpy as jnp

Array = jax.Array
QUANTIZE_MODES = ("int8",)
INT8_MATMULS = ("dot", "reduce")
REDUCE_MAX_ROWS = 16  # "reduce" only for decode-sized inputs; a prefill's many rows want the GEMM


@flax.struct.dataclass
class Int8Kernel:
    """An int8 kernel (..., in, out), its float32 scales (..., out), and how to multiply by it."""

    q: Array
    scale: Array
    matmul: str = flax.struct.field(pytree_node=False, default="dot")

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    @property
    def nbytes(self) -> int:
        return self.q.size * self.q.dtype.itemsize + self.scale.size * self.scale.dtype.itemsize


def quantize_kernel(w: Array, matmul: str = "dot") -> Int8Kernel:
    """Per-output-channel symmetric int8 of w (..., in, out); the reduction runs in float32."""
    wf = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(wf), axis=-2) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)  # an all-zero column: any scale represents it exactly
    q = jnp.clip(jnp.round(wf / scale[..., None, :]), -127, 127).astype(jnp.int8)
    return Int8Kernel(q=q, scale=scale, matmul=matmul)


_quantize_jit = jax.jit(quantize_kernel, static_argnums=1)


def quantize_params(params: Any, mode: str = "int8", matmul: str = "dot") -> Any:
    """Every dense kernel (leaves named "kernel": the projections and lm_head) as an Int8Kernel;
    embeddings and norm scales unchanged. Leaf by leaf, on the device the leaf is on."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, got {mode!r}")
    if matmul not in INT8_MATMULS:
        raise ValueError(f"int8 matmul must be one of {INT8_MATMULS}, got {matmul!r}")

    def visit(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: (_quantize_jit(v, matmul) if k == "kernel" and not isinstance(v, (dict, Int8Kernel))
                        else visit(v)) for k, v in node.items()}
        return node
    return visit(dict(params))


def dense_dot(x: Array, kernel: Array | Int8Kernel, dtype: Any, out_dtype: Any = None) -> Array:
    """x @ kernel in `dtype` (accumulated to `out_dtype`, default `dtype`); dequantizes an Int8Kernel."""
    if isinstance(kernel, Int8Kernel):
        if kernel.matmul == "reduce" and math.prod(x.shape[:-1]) <= REDUCE_MAX_ROWS:
            y = jnp.sum(x.astype(jnp.float32)[..., :, None] * kernel.q.astype(jnp.float32), axis=-2)
        else:
            y = jnp.dot(x.astype(dtype), kernel.q.astype(dtype), preferred_element_type=jnp.float32)
        return (y * kernel.scale).astype(out_dtype or dtype)
    return jnp.dot(x.astype(dtype), kernel.astype(dtype), preferred_element_type=out_dtype)


def weight_bytes(params: Any) -> int:
    """Bytes of every array in a params tree (int8 kernels count as int8 + scales)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
