"""FP8 frozen products (`--quantize fp8`): the frozen GEMMs of a LoRA layer in FP8 (Hopper and later).

The kernel is stored like int8's (`jaxlora.model.quantize.Int8Kernel`: one float32 scale per
output channel), its values float8_e4m3fn instead of int8:
    W ~ q * scale,   q = W / scale,   scale = max_i |W[i, :]| / 448 (e4m3's largest value).
Unlike int8, which only stores the weights in 8 bits and multiplies in bf16, both operands of
the product go to FP8, which tensor cores multiply at twice bf16's rate:

    forward      x @ W   = (xq @ q) * sx * scale,   xq = x / sx in e4m3, sx = max |x_row| / 448
    backward     g @ W.T = (gq @ q.T) * sg,         gq = (g * scale) / sg in e4m3, sg = max |row| / 448

with one scale per row of x or g (a token), found on the fly (current scaling: nothing to carry
between steps, unlike delayed scaling's amax history), and the product accumulated in float32
by the GEMM, which writes the product in the compute dtype (a float32 output would double the
traffic of the scaling pass after it). Per-row and per-channel scales factor out of the sum
exactly, so they are applied to the product afterwards, where XLA fuses them into its consumer. Gradients use e4m3 too: with a scale per row, e5m2's wider range
(the usual choice for per-tensor scaled gradients) buys nothing and costs a mantissa bit
(measured on random data: 5.3% error against 2.7%). The error is e4m3's rounding (2^-4
relative at most) of both operands: ~3% of a product's norm (tests state the bounds). Only the
frozen products change; the adapters, their gradients and the optimizer stay as they were.
"""
from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0  # its largest finite value
# XLA's GPU compiler gives many GEMMs to Triton. With the kernels in one layout, its e4m3 products
# (a transpose fused into the GEMM) ran at 250-680 TFLOP/s on an H200 (jax 0.11.2, 7B's products;
# bench/fp8_gemm_check.py), below bf16's ~770; cuBLASLt's FP8 GEMM ran them at 920-1,330. Such a
# process sends every GEMM to cuBLAS(Lt) (`xla_flags_for`): the 7B step ran 1.26-1.37x bf16's.
# With the kernels in both layouts (`forward_layout`) XLA's defaults are faster still: Llama 3.1 8B
# on an H200 (2026-12-02, eighth session) ran 2.5-2.9% faster with q,v and 4.3-15.5% with all seven
# targets (at 4 x 256 the cuBLAS-only step was launch-bound: 78% of it busy), so those keep them.
CUBLAS_GEMMS = "--xla_gpu_enable_triton_gemm=false"
# Tokens a device's micro-batch needs for FP8 to pay, as measured (H200, 2026-12-02, cuBLASLt):
# 1,024 (7B at 4 x 256) ran 1.26x bf16; smaller micro-batches were not measured.
FASTER_FROM_TOKENS = 1024


def forward_layout(q: Array, out_ndim: int) -> Array:
    """q (..., in, *out) as (..., *out, in): the contracted axis of the forward product last.
    cuBLASLt's FP8 GEMMs on Hopper take both operands with the contracted axis innermost, so the
    forward product of an (in, out) kernel transposes it every step (the input gradient, which
    contracts `out`, takes it as stored); a kernel kept in both layouts (`Int8Kernel.qt`,
    train.py --fp8_both_layouts) skips that for one more byte a weight."""
    return jnp.moveaxis(q, q.ndim - 1 - out_ndim, -1)


def xla_flags_for(quantize: str | None, xla_flags: str, both_layouts: bool = False) -> str:
    """XLA_FLAGS for a process whose frozen products are `quantize`: with fp8 kernels in one layout,
    Triton GEMMs off (`CUBLAS_GEMMS`) unless the flags already choose; else unchanged (fp8 kernels
    in both layouts run faster with XLA's defaults). Takes effect only if set before JAX starts its
    backend; ignored off GPUs."""
    if quantize != "fp8" or both_layouts or "xla_gpu_enable_triton_gemm" in xla_flags:
        return xla_flags
    return f"{xla_flags} {CUBLAS_GEMMS}".strip()


def set_xla_flags(quantize: str | None, env: MutableMapping[str, str], both_layouts: bool = False) -> bool:
    """Put `xla_flags_for`'s XLA_FLAGS in `env` (the process environment, before JAX starts);
    whether they changed."""
    flags = env.get("XLA_FLAGS", "")
    wanted = xla_flags_for(quantize, flags, both_layouts)
    if wanted != flags:
        env["XLA_FLAGS"] = wanted
    return wanted != flags


def rows_to_fp8(x: Array, n_axes: int = 1) -> tuple[Array, Array]:
    """x (..., *row) as e4m3 with one float32 scale per row over its last `n_axes` axes (the scale
    keeps them as size-1 axes): x ~ xq * s."""
    xf = x.astype(jnp.float32)
    s = jnp.max(jnp.abs(xf), axis=tuple(range(x.ndim - n_axes, x.ndim)), keepdims=True) / E4M3_MAX
    s = jnp.where(s > 0, s, 1.0)
    return (xf / s).astype(E4M3), s


def fp8_product(x: Array, q: Array, scale: Array, out_ndim: int, out_dtype: Any, qt: Array | None = None) -> Array:
    """x (..., in) @ (q * scale) with q (in, *out) e4m3, scale (*out,): FP8 operands, float32
    accumulation, scales applied to the product. qt: the same values as (*out, in)
    (`forward_layout`), which the GEMM takes as they are; from q it transposes them first."""
    xq, sx = rows_to_fp8(x)
    if qt is not None:
        y = jax.lax.dot_general(xq, qt, (((x.ndim - 1,), (out_ndim,)), ((), ())), preferred_element_type=out_dtype)
    else:
        y = jax.lax.dot_general(xq, q, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=out_dtype)
    sx = sx.reshape(*sx.shape, *(1,) * (out_ndim - 1))
    return (y.astype(jnp.float32) * sx * scale).astype(out_dtype)


def fp8_product_transposed(g: Array, q: Array, scale: Array, out_ndim: int, dtype: Any) -> Array:
    """g (..., *out) @ (q * scale).T -> (..., in), the input gradient of `fp8_product`."""
    gq, sg = rows_to_fp8(g.astype(jnp.float32) * scale, out_ndim)
    g_axes, q_axes = tuple(range(g.ndim - out_ndim, g.ndim)), tuple(range(1, 1 + out_ndim))
    y = jax.lax.dot_general(gq, q, ((g_axes, q_axes), ((), ())), preferred_element_type=dtype)
    return (y.astype(jnp.float32) * sg.reshape(*sg.shape[:g.ndim - out_ndim], 1)).astype(dtype)
