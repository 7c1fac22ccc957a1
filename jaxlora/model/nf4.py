"""NF4 (4-bit NormalFloat) frozen weights with QLoRA's conventions, code for code with bitsandbytes.

A kernel here is (in, out), the transpose of a torch Linear weight W (out, in). Quantization
reads W in row-major order, so each block of 64 weights runs along `in`, the contraction axis:
the block is divided by its absolute maximum (absmax) and each weight rounded to the nearest
of 16 NormalFloat values (quantiles of a normal distribution, exact zero included); two codes
share a byte, the first in the high nibble. Stored: codes (out, in/2) uint8 and one float32
absmax per block, 4.5 bits per weight.

Double quantization (QLoRA's, bitsandbytes' `compress_statistics=True`) stores the absmax
values as 8-bit codes of bitsandbytes' signed dynamic map, in blocks of 256 around their mean:
one uint8 per 64 weights plus one float32 per 16,384 weights, ~4.13 bits per weight.

Bitsandbytes' layouts flatten to ours: its packed codes (out*in/2, 1) are our codes
row-major, its absmax (out*in/64,) ours. Tests compare both with bitsandbytes' own quantizer.
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

BLOCK = 64  # weights per absmax (QLoRA's blocksize)
ABSMAX_BLOCK = 256  # absmax values per second-level scale in double quantization

# The 16 NF4 values (QLoRA, Dettmers et al. 2023, Appendix E), as float32.
NF4_VALUES = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)
# A value rounds to the code whose interval holds it; midpoints computed in float32 as the
# reference quantizer does, a value on a midpoint going to the lower code.
NF4_BOUNDS = (NF4_VALUES[:-1] + NF4_VALUES[1:]) / np.float32(2)
# The largest rounding error of a normalised weight: half the widest gap between NF4 values.
NF4_MAX_ERROR = float(np.max(np.diff(NF4_VALUES))) / 2


def dynamic_map(exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """The signed dynamic 8-bit map of bitsandbytes' blockwise quantizer (256 sorted values in
    [-1, 1]): for each decade 10^-6 .. 10^0, the midpoints of an even split of [0.1, 1] scaled
    to it, more points in the larger decades, both signs, plus 0 and 1. Computed in float64 and
    rounded once; bitsandbytes' float32 construction lands within one float32 step of it."""
    mantissa_bits = total_bits - 1
    values: list[float] = []
    for i in range(exponent_bits):
        points = 2 ** (i + mantissa_bits - exponent_bits) + 1
        edges = np.linspace(0.1, 1.0, points)
        mids = (edges[:-1] + edges[1:]) / 2
        scale = 10.0 ** (-(exponent_bits - 1) + i)
        values += list(scale * mids) + list(-scale * mids)
    values += [0.0, 1.0]
    assert len(values) == 2 ** total_bits, len(values)
    return np.sort(np.asarray(values, np.float32))


DYNAMIC_MAP = dynamic_map()


@flax.struct.dataclass
class NF4Kernel:
    """A frozen (..., in, out) kernel in NF4, each (in, out) matrix quantized on its own (as
    bitsandbytes quantizes each Linear). absmax is float32 (..., out, in/64), or with double
    quantization uint8 codes of that shape with `absmax_scale` (one float32 per 256 absmax
    values, row-major) and `absmax_offset` (their mean). Leading axes (stacked layers) carry
    over to every leaf, so the layout conversions treat it like the array it replaces."""

    codes: Array  # uint8 (..., out, in/2)
    absmax: Array  # float32, or uint8 codes, (..., out, in/64)
    absmax_scale: Array | None = None  # float32 (..., ceil(out*in/64/256))
    absmax_offset: Array | None = None  # float32 (...)

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, out, half = self.codes.shape
        return (*lead, 2 * half, out)

    @property
    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self))

    @property
    def double_quantized(self) -> bool:
        return self.absmax_scale is not None


def _nearest(values: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Index of the interval of sorted `bounds` that holds each value (ties: the lower one)."""
    return np.searchsorted(bounds, values, side="left")


def _quantize_absmax(absmax: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uint8 codes, float32 scale per 256 values, float32 offset) of the flattened absmax."""
    flat = absmax.reshape(-1)
    offset = np.float32(flat.mean(dtype=np.float64))
    centred = flat - offset
    pad = (-len(centred)) % ABSMAX_BLOCK
    blocks = np.pad(centred, (0, pad)).reshape(-1, ABSMAX_BLOCK)
    scale = np.abs(blocks).max(axis=1)
    normed = blocks / np.maximum(scale, np.float32(1e-38))[:, None]
    mids = (DYNAMIC_MAP[:-1] + DYNAMIC_MAP[1:]) / np.float32(2)
    codes = _nearest(normed.reshape(-1)[:len(flat)], mids).astype(np.uint8)
    return codes.reshape(absmax.shape), scale.astype(np.float32), offset


def quantize_nf4(kernel: Any, double_quant: bool = True) -> NF4Kernel:
    """NF4 of a (..., in, out) kernel (numpy or jax, any float dtype), each (in, out) matrix
    quantized on its own; `in` must be a multiple of 64. The codes are computed where the
    kernel is (on its device, by one jitted program); double quantization runs on the host
    (the absmax values are 1/64 of the weights; their mean is taken in float64)."""
    shape = tuple(np.shape(kernel))
    if len(shape) < 2 or shape[-2] % BLOCK:
        raise ValueError(f"NF4 needs the input dimension to be a multiple of {BLOCK}, got kernel shape {shape}")
    codes, absmax = _codes_and_absmax(kernel)
    if not double_quant:
        return NF4Kernel(codes=codes, absmax=absmax)
    host = np.asarray(jax.device_get(absmax))
    parts = [_quantize_absmax(a) for a in host.reshape(-1, *host.shape[-2:])]
    lead = host.shape[:-2]
    stacked = [np.stack(leaves).reshape(lead + np.shape(leaves[0])) for leaves in zip(*parts)]
    sharding = getattr(absmax, "sharding", None)
    absmax_codes, scale, offset = (jax.device_put(x, sharding) if i == 0 else jnp.asarray(x)
                                   for i, x in enumerate(stacked))
    return NF4Kernel(codes=codes, absmax=absmax_codes, absmax_scale=scale, absmax_offset=offset)


@jax.jit
def _codes_and_absmax(kernel: Array) -> tuple[Array, Array]:
    """(uint8 codes (..., out, in/2), float32 absmax (..., out, in/64)) of a (..., in, out) kernel."""
    w = jnp.swapaxes(jnp.asarray(kernel, jnp.float32), -1, -2)  # (..., out, in): the torch weight
    *lead, out, n_in = w.shape
    blocks = w.reshape(*lead, out, n_in // BLOCK, BLOCK)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    inverse = 1.0 / jnp.maximum(absmax, 1e-38)
    scaled = jnp.clip(blocks * inverse[..., None], -1, 1).reshape(*lead, out, n_in)
    # the interval of the sorted midpoints holding each value, a value on a midpoint going below
    q = jnp.sum(scaled[..., None] > jnp.asarray(NF4_BOUNDS), axis=-1, dtype=jnp.uint8)
    return (q[..., 0::2] << 4) | q[..., 1::2], absmax


def block_absmax(kernel: NF4Kernel) -> Array:
    """The float32 (..., out, in/64) absmax values (decoded when double quantized)."""
    if not kernel.double_quantized:
        return kernel.absmax
    *lead, out, blocks = kernel.absmax.shape
    n = out * blocks
    flat = jnp.asarray(DYNAMIC_MAP)[kernel.absmax.reshape(*lead, n).astype(jnp.int32)]
    scale = jnp.repeat(kernel.absmax_scale, ABSMAX_BLOCK, axis=-1)[..., :n]
    return (flat * scale + kernel.absmax_offset[..., None]).reshape(kernel.absmax.shape)


def dequantize_nf4(kernel: NF4Kernel, dtype: Any = jnp.float32) -> Array:
    """The (..., in, out) kernel in `dtype`: code value x block absmax, in float32 as bitsandbytes."""
    *lead, out, half = kernel.codes.shape
    q = jnp.stack([kernel.codes >> 4, kernel.codes & 0xF], axis=-1).reshape(*lead, out, -1, BLOCK)
    values = jnp.asarray(NF4_VALUES)[q.astype(jnp.int32)]
    w = (values * block_absmax(kernel)[..., None]).reshape(*lead, out, 2 * half)
    return jnp.swapaxes(w, -1, -2).astype(dtype)
