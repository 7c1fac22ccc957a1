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

import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

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
    """A frozen (..., in, *out) kernel in NF4, each (in, out) matrix quantized on its own (as
    bitsandbytes quantizes each Linear). absmax is float32 (..., *out, in/64), or with double
    quantization uint8 codes of that shape with `absmax_scale` (one float32 per 256 absmax
    values, in the stored row order) and `absmax_offset` (their mean). Leading axes (stacked
    layers) carry over to every leaf, so the layout conversions treat it like the array it
    replaces. `out_ndim`: output axes (2 for the q/k/v kernel split by query group under tensor
    parallelism, `jaxlora.model.layouts`); `rows` (int32 (..., *out), double quantization only):
    the stored row of each row of codes when a layout has re-ordered them, so each absmax code
    still finds its 256-block's scale (None: rows in stored order)."""

    codes: Array  # uint8 (..., *out, in/2)
    absmax: Array  # float32, or uint8 codes, (..., *out, in/64)
    absmax_scale: Array | None = None  # float32 (..., ceil(out*in/64/256))
    absmax_offset: Array | None = None  # float32 (...)
    rows: Array | None = None  # int32 (..., *out)
    out_ndim: int = flax.struct.field(pytree_node=False, default=1)

    @property
    def shape(self) -> tuple[int, ...]:
        lead = self.codes.ndim - 1 - self.out_ndim
        return (*self.codes.shape[:lead], 2 * self.codes.shape[-1], *self.codes.shape[lead:-1])

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


def quantize_nf4(kernel: Any, double_quant: bool = True, out_ndim: int = 1,
                 stored_order: tuple[Callable, Callable] | None = None) -> NF4Kernel:
    """NF4 of a (..., in, *out) kernel (numpy or jax, any float dtype), each (in, out) matrix
    quantized on its own; `in` must be a multiple of 64. The codes are computed where the
    kernel is (on its devices, by one jitted program; a kernel sharded by a NamedSharding gets
    codes and absmax sharded like it: `nf4_specs`); double quantization runs on the host (the
    absmax values are 1/64 of the weights; their mean is taken in float64), its block scales
    and offsets are replicated over the kernel's mesh.

    out_ndim: output axes (2: the split q/k/v kernel). stored_order: (to_stored, to_run) on the
    trailing output axes (numpy) when the columns are not in stored order: double quantization
    then runs over the stored order (its 256-blocks and mean are those of the stored kernel)
    and the kernel records each row's stored row. Codes and absmax are per column, the same
    in any order."""
    shape = tuple(np.shape(kernel))
    n_in = shape[len(shape) - 1 - out_ndim] if len(shape) > out_ndim else 0
    if n_in % BLOCK or not n_in:
        raise ValueError(f"NF4 needs the input dimension to be a multiple of {BLOCK}, got kernel shape {shape}")
    sharding = getattr(kernel, "sharding", None)
    mesh = sharding.mesh if isinstance(sharding, NamedSharding) else None
    abstract = jax.eval_shape(functools.partial(nf4_codes_and_absmax, out_ndim=out_ndim),
                              jax.ShapeDtypeStruct(shape, jnp.float32))
    placed = None
    if mesh is not None:
        specs = nf4_specs(NF4Kernel(*abstract, out_ndim=out_ndim), sharding.spec)
        placed = (NamedSharding(mesh, specs.codes), NamedSharding(mesh, specs.absmax))
    codes, absmax = _codes_and_absmax_program(placed, out_ndim)(kernel)
    if not double_quant:
        return NF4Kernel(codes=codes, absmax=absmax, out_ndim=out_ndim)
    host = np.asarray(multihost_utils.process_allgather(absmax, tiled=True))  # every process: the whole
    matrix = host.shape[host.ndim - 1 - out_ndim:]
    parts = [_double_quantize(a, stored_order) for a in host.reshape(-1, *matrix)]
    lead = host.shape[:host.ndim - 1 - out_ndim]
    leaves = [np.stack(x).reshape(lead + np.shape(x[0])) for x in zip(*parts)]
    absmax_codes, scale, offset, rows = leaves if stored_order is not None else (*leaves, None)
    host_kernel = NF4Kernel(codes=codes, absmax=absmax_codes, absmax_scale=scale, absmax_offset=offset, rows=rows,
                            out_ndim=out_ndim)
    if mesh is None:
        targets = jax.tree.map(lambda _: absmax.sharding, host_kernel)
    else:
        targets = jax.tree.map(lambda s: NamedSharding(mesh, s), nf4_specs(host_kernel, sharding.spec))
    return jax.tree.map(lambda x, where: x if isinstance(x, jax.Array) else put_host(x, where), host_kernel, targets)


def _double_quantize(absmax: np.ndarray, stored_order: tuple[Callable, Callable] | None) -> tuple[np.ndarray, ...]:
    """(codes, scale, offset[, rows]) of one matrix's absmax (*out, blocks), over its stored order."""
    if stored_order is None:
        return _quantize_absmax(absmax)
    to_stored, to_run = stored_order
    codes, scale, offset = _quantize_absmax(np.moveaxis(to_stored(np.moveaxis(absmax, -1, 0)), 0, -1))
    rows = to_run(np.arange(codes.shape[0], dtype=np.int32))
    return np.moveaxis(to_run(np.moveaxis(codes, -1, 0)), 0, -1), scale, offset, rows


def put_host(host: np.ndarray, sharding: NamedSharding) -> Array:
    """A host array (the same on every process) placed in `sharding`, which may span processes."""
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def nf4_specs(kernel: NF4Kernel, spec: PartitionSpec) -> NF4Kernel:
    """PartitionSpecs of `kernel`'s leaves (an NF4Kernel, or its abstract shapes) for a float
    kernel sharded by `spec` (..., in, *out): codes and absmax as the kernel, their (*out, in)
    axes sharded as its (*out, in) axes; block scales and offsets whole (a few KB)."""
    lead = kernel.codes.ndim - 1 - kernel.out_ndim
    axes = tuple(spec) + (None,) * (lead + 1 + kernel.out_ndim - len(spec))
    lead_axes, in_axis, out_axes = axes[:lead], axes[lead], axes[lead + 1:]
    rows = PartitionSpec(*lead_axes, *out_axes)
    return kernel.replace(
        codes=PartitionSpec(*lead_axes, *out_axes, in_axis), absmax=PartitionSpec(*lead_axes, *out_axes, in_axis),
        absmax_scale=None if kernel.absmax_scale is None else PartitionSpec(*lead_axes, None),
        absmax_offset=None if kernel.absmax_offset is None else PartitionSpec(*lead_axes),
        rows=None if kernel.rows is None else rows)


def stored_rows(kernel: NF4Kernel) -> Any:
    """int32 (..., *out): each row of `kernel`'s codes numbered in stored order (numpy or jax, as
    its codes), i.e. the `rows` of a kernel whose rows were never re-ordered."""
    xp = np if isinstance(kernel.codes, np.ndarray) else jnp
    out = kernel.codes.shape[kernel.codes.ndim - 1 - kernel.out_ndim:-1]
    return xp.broadcast_to(xp.arange(int(np.prod(out)), dtype=np.int32).reshape(out), kernel.codes.shape[:-1])


def block_problem(n_in: int, shards: int) -> str | None:
    """Why `n_in` inputs cannot be split over `shards` devices in whole NF4 blocks (None: they can):
    each device must hold whole blocks of 64, or its absmax values would straddle devices."""
    if n_in % (BLOCK * shards) == 0:
        return None
    return (f"{n_in} inputs over {shards} devices are {n_in / shards:g} each, not a multiple of the NF4 block "
            f"({BLOCK}); {n_in // BLOCK} blocks divide over {', '.join(map(str, _divisors(n_in // BLOCK)))} devices")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, min(n, 64) + 1) if n % d == 0]


@functools.cache
def _codes_and_absmax_program(shardings: tuple[NamedSharding, NamedSharding] | None, out_ndim: int) -> Any:
    return jax.jit(functools.partial(nf4_codes_and_absmax, out_ndim=out_ndim), out_shardings=shardings)


def nf4_codes_and_absmax(kernel: Array, out_ndim: int = 1) -> tuple[Array, Array]:
    """(uint8 codes (..., *out, in/2), float32 absmax (..., *out, in/64)) of a (..., in, *out) kernel."""
    w = jnp.moveaxis(jnp.asarray(kernel, jnp.float32), -1 - out_ndim, -1)  # (..., out, in): the torch weight
    blocks = w.reshape(*w.shape[:-1], w.shape[-1] // BLOCK, BLOCK)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    inverse = 1.0 / jnp.maximum(absmax, 1e-38)
    scaled = jnp.clip(blocks * inverse[..., None], -1, 1).reshape(w.shape)
    # the interval of the sorted midpoints holding each value, a value on a midpoint going below
    q = jnp.sum(scaled[..., None] > jnp.asarray(NF4_BOUNDS), axis=-1, dtype=jnp.uint8)
    return (q[..., 0::2] << 4) | q[..., 1::2], absmax


def block_absmax(kernel: NF4Kernel) -> Array:
    """The float32 (..., *out, in/64) absmax values (decoded when double quantized)."""
    if not kernel.double_quantized:
        return kernel.absmax
    decode = _decode_absmax
    for _ in range(kernel.absmax.ndim - 1 - kernel.out_ndim):  # one matrix at a time
        decode = jax.vmap(decode)
    return decode(kernel.absmax, kernel.absmax_scale, kernel.absmax_offset, kernel.rows)


def _decode_absmax(codes: Array, scale: Array, offset: Array, rows: Array | None) -> Array:
    """One matrix's absmax from its codes (*out, blocks): block b of stored row r has the scale of
    256-block (r * blocks + b) // 256. The index is computed, not gathered from a flattened
    array, so codes sharded on any axis decode where they lie."""
    blocks = codes.shape[-1]
    if rows is None:
        rows = jnp.arange(int(np.prod(codes.shape[:-1])), dtype=jnp.int32).reshape(codes.shape[:-1])
    index = (rows[..., None] * blocks + jnp.arange(blocks, dtype=jnp.int32)) // ABSMAX_BLOCK
    return jnp.asarray(DYNAMIC_MAP)[codes.astype(jnp.int32)] * scale[index] + offset


def dequantize_nf4(kernel: NF4Kernel, dtype: Any = jnp.float32) -> Array:
    """The (..., in, *out) kernel in `dtype`: code value x block absmax, in float32 as bitsandbytes."""
    codes = kernel.codes
    q = jnp.stack([codes >> 4, codes & 0xF], axis=-1).reshape(*codes.shape[:-1], -1, BLOCK)
    values = jnp.asarray(NF4_VALUES)[q.astype(jnp.int32)]
    w = (values * block_absmax(kernel)[..., None]).reshape(*codes.shape[:-1], 2 * codes.shape[-1])
    return jnp.moveaxis(w, -1, codes.ndim - 1 - kernel.out_ndim).astype(dtype)
