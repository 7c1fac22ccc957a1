"""FP8 frozen kernels: the frozen products of a LoRA layer run as FP8 GEMMs (Hopper and later).

A kernel (in, out) is stored as float8_e4m3fn with one float32 scale per output channel,
    W ~ q * scale,   q = W / scale,   scale = max_i |W[i, :]| / 448 (e4m3's largest value),
like int8 (`jaxlora.model.quantize`) but with 3 mantissa bits on a floating grid. Unlike int8,
which only stores the weights in 8 bits and multiplies in bf16, both operands of the product
go to FP8, which the tensor cores multiply at twice bf16's rate:

    forward      x @ W   = (xq @ q) * sx * scale,   xq = x / sx in e4m3, sx = max |x_row| / 448
    backward     g @ W.T = (gq @ q.T) * sg,         gq = (g * scale) / sg in e4m3, sg = max |row| / 448

with one scale per row of x or g (a token), found on the fly (current scaling: nothing to carry
between steps, unlike delayed scaling's amax history), and the product accumulated in float32
by the GEMM. Per-row and per-channel scales factor out of the sum exactly, so they are applied
to the product afterwards. Gradients use e4m3 too: with a scale per row, e5m2's wider range
(the usual choice for per-tensor scaled gradients) buys nothing and costs a mantissa bit
(measured on random data: 5.3% error against 2.7%). The error is e4m3's rounding (2^-4
relative at most) of both operands: ~3% of a product's norm (tests state the bounds).
Only the frozen products change; the adapters, their gradients and the optimizer stay as they
were. NeMo's and Transformer Engine's FP8 LoRA recipes make the same split.
"""
from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp

Array = jax.Array
E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0  # its largest finite value


@flax.struct.dataclass
class Fp8Kernel:
    """An e4m3 kernel (..., in, out) and its float32 scales (..., out)."""

    q: Array
    scale: Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    @property
    def nbytes(self) -> int:
        return self.q.size * self.q.dtype.itemsize + self.scale.size * self.scale.dtype.itemsize


def _quantize_fp8(w: Array) -> Fp8Kernel:
    wf = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(wf), axis=-2) / E4M3_MAX
    scale = jnp.where(scale > 0, scale, 1.0)  # an all-zero column: any scale represents it exactly
    return Fp8Kernel(q=(wf / scale[..., None, :]).astype(E4M3), scale=scale)


quantize_fp8 = jax.jit(_quantize_fp8)


def dequantize_fp8(kernel: Fp8Kernel) -> Array:
    """The float32 kernel an Fp8Kernel stands for (q * scale), for checks and merged exports."""
    return kernel.q.astype(jnp.float32) * kernel.scale[..., None, :]


def rows_to_fp8(x: Array, dtype: Any, largest: float) -> tuple[Array, Array]:
    """x (..., n) as `dtype` (largest finite value `largest`) with one float32 scale per row
    (..., 1): x ~ xq * s."""
    xf = x.astype(jnp.float32)
    s = jnp.max(jnp.abs(xf), axis=-1, keepdims=True) / largest
    s = jnp.where(s > 0, s, 1.0)
    return (xf / s).astype(dtype), s


def matmul_fp8(a: Array, b: Array, contract_b: int) -> Array:
    """a (..., k) @ b over b's axis `contract_b`, FP8 operands, float32 out."""
    dims = (((a.ndim - 1,), (contract_b,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def fp8_dot(x: Array, kernel: Fp8Kernel, out_dtype: Any) -> Array:
    """x @ kernel with both operands in FP8 (module docstring); gradient for x only."""
    xq, sx = rows_to_fp8(x, E4M3, E4M3_MAX)
    return (matmul_fp8(xq, kernel.q, 0) * sx * kernel.scale).astype(out_dtype)


def _fp8_dot_fwd(x: Array, kernel: Fp8Kernel, out_dtype: Any) -> tuple[Array, Any]:
    return fp8_dot(x, kernel, out_dtype), (kernel, jnp.zeros((0,), x.dtype))


def _fp8_dot_bwd(out_dtype: Any, residuals: tuple, g: Array) -> tuple[Array, None]:
    kernel, x_dtype_marker = residuals
    gq, sg = rows_to_fp8(g.astype(jnp.float32) * kernel.scale, E4M3, E4M3_MAX)
    return (matmul_fp8(gq, kernel.q, 1) * sg).astype(x_dtype_marker.dtype), None


fp8_dot.defvjp(_fp8_dot_fwd, _fp8_dot_bwd)
