"""The engine's device sink: any `LeafReader` (a jaxlora array tree, a lit-llama `.pth` or an HF
directory through its mapping) straight into device arrays, in the layout a model reads and
each in its sharding.

Per-layer targets are built from the regions their shards hold (`jax.make_array_from_callback`).
A stacked target is filled on the device one layer at a time (each layer placed, then written
into the stacked buffer by a donating update, waited for so that the layer's buffers go before
the next is read), and wte / lm_head in row blocks likewise, so the
host never holds more than one layer of one tensor (or one 64 MiB block), whatever the source,
and a device holds its shards plus one layer's.
What the run layout is (per-layer or stacked, q/k/v split or fused) is asked of
`jaxlora.model.layouts`; nothing here knows its shapes.
"""
from __future__ import annotations

import functools
import threading
import warnings
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxlora.model.layouts import qkv_in_run_layout, run_layout_pieces, splits_qkv
from jaxlora.model.llama import STACKED, LLaMA
from jaxlora.weights import jaxlora_dir as cio
from jaxlora.weights.engine import LeafReader, Path_, block_rows


def layer_sharding(sharding: Any) -> Any:
    """The sharding of one layer of a stacked leaf placed by `sharding` (its leading axis dropped)."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
    return sharding


def run_shape(model: LLaMA, path: Path_, shape: tuple[int, ...], dtype: Any) -> tuple[int, ...]:
    """The shape `model` reads a stored leaf (or layer) of `shape` in (layouts.py decides)."""
    return jax.eval_shape(functools.partial(qkv_in_run_layout, model, path), jax.ShapeDtypeStruct(shape, dtype)).shape


def place_direct(reader: LeafReader, model: LLaMA, path: Path_, layer: int | None, sharding: Any,
                 dtype: np.dtype) -> jax.Array:
    """A stored leaf (or its layer `layer`) as `model` reads it, placed in `sharding` from the
    regions its shards hold: each process reads only those, each distinct region once. A leaf
    whose run layout differs (split q/k/v) is read with its last (output) axis whole, re-laid
    out by layouts.py, then cut (layouts re-lay only that axis)."""
    shape = reader.shapes()[path][0]
    shape = shape if layer is None else shape[1:]
    lead, keep = (() if layer is None else (layer,)), len(shape) - 1
    split = splits_qkv(model, path)
    cache: dict[Any, np.ndarray] = {}
    lock = threading.Lock()

    def read(index: tuple[slice, ...]) -> np.ndarray:
        if not split:
            return reader.read(path, lead + tuple(index)).astype(dtype, copy=False)
        value = reader.read(path, lead + tuple(index[:keep]) + (slice(None),)).astype(dtype, copy=False)
        return np.asarray(qkv_in_run_layout(model, path, value))[(slice(None),) * keep + tuple(index[keep:])]

    def region(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple((s.start, s.stop, s.step) for s in index)
        with lock:
            hit = cache.get(key)
        if hit is None:
            hit = read(index)
            with lock:
                cache[key] = hit
        return hit

    return jax.make_array_from_callback(run_shape(model, path, shape, dtype), sharding, region)


@functools.lru_cache(maxsize=None)
def updater(sharding: Any, stacked: bool) -> Any:
    """buf, x, start -> buf with x written at `start` (a layer index when stacked, else the
    block's first row/column offsets), in `sharding`, buf donated."""
    if stacked:
        return jax.jit(lambda buf, x, i: jax.lax.dynamic_update_index_in_dim(buf, x, i, 0), donate_argnums=0,
                       out_shardings=sharding)
    return jax.jit(lambda buf, x, start: jax.lax.dynamic_update_slice(buf, x, start), donate_argnums=0,
                   out_shardings=sharding)


def zeros(shape: tuple[int, ...], dtype: Any, sharding: Any) -> jax.Array:
    """A zero buffer made on the devices. The zero comes in as an argument: a constant would be
    folded by the compiler into a literal of the whole buffer, on the host."""
    return jax.jit(lambda z: jnp.broadcast_to(z, shape), out_shardings=sharding)(np.zeros((), dtype))


def replicated(sharding: Any) -> Any:
    return NamedSharding(sharding.mesh, PartitionSpec()) if isinstance(sharding, NamedSharding) else sharding


DEVICE_BLOCK_BYTES = 8 << 20  # wte / lm_head go to the devices in blocks of this (a block is held ~3 times)


def place_blocks(reader: LeafReader, path: Path_, sharding: Any, dtype: np.dtype) -> jax.Array:
    """An unlayered 2-D leaf (wte, lm_head) filled on the device in blocks along its longer
    axis, so the host holds a few blocks, never the whole table."""
    shape = reader.shapes()[path][0]
    axis = 0 if shape[0] >= shape[1] else 1
    buf, update = zeros(shape, dtype, sharding), updater(sharding, False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
        for r0, r1 in block_rows(shape[axis], shape[1 - axis] * dtype.itemsize, DEVICE_BLOCK_BYTES):
            where = (slice(r0, r1), slice(None)) if axis == 0 else (slice(None), slice(r0, r1))
            block = jax.device_put(reader.read(path, where).astype(dtype, copy=False), replicated(sharding))
            buf = update(buf, block, (r0, 0) if axis == 0 else (0, r0)).block_until_ready()  # frees `block`
    return buf


def place_stacked(reader: LeafReader, model: LLaMA, path: Path_, sharding: Any, dtype: np.dtype) -> jax.Array:
    """A stacked leaf in `sharding`, filled on the device layer by layer (donating updates:
    the device holds the leaf plus one layer; the host one layer)."""
    shape = reader.shapes()[path][0]
    full = (shape[0], *run_shape(model, path, shape[1:], dtype))
    buf = zeros(full, dtype, sharding)
    per_layer, update = layer_sharding(sharding), updater(sharding, True)
    with warnings.catch_warnings():  # CPU cannot donate: the copy is then transient
        warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
        for i in range(shape[0]):
            buf = update(buf, place_direct(reader, model, path, i, per_layer, dtype), i).block_until_ready()
    return buf


def host_budget(shape: tuple[int, ...], dtype: np.dtype, stacked: bool) -> int:
    """What a shard may take on the host when read directly: one layer, or one stored chunk."""
    layer = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize if stacked else 0
    return max(layer, cio.MAX_CHUNK_BYTES)


def shard_bytes(shape: tuple[int, ...], dtype: np.dtype, sharding: Any) -> int:
    return int(np.prod(sharding.shard_shape(shape), dtype=np.int64)) * dtype.itemsize


def to_device(reader: LeafReader, model: LLaMA, targets: Mapping[Path_, Any], dtype: Any = None,
              transform: Callable[[Path_, jax.Array], Any] | None = None) -> dict[Path_, Any]:
    """Sink: every leaf of `reader` in `model`'s run layout, {run path: array in targets[run path]}
    (targets: the flattened run-layout shardings). dtype: cast on the host (None keeps the
    stored). Shards within the host budget (a layer, or a chunk) are read directly; larger
    ones (a stacked leaf or a whole wte on few devices) are filled on the device piece by piece.
    transform(run path, array): applied to each leaf once placed (e.g. quantization)."""
    placed = {}
    for path, (shape, stored_dtype) in reader.shapes().items():
        dt = np.dtype(stored_dtype if dtype is None else dtype)
        stacked = path[0] == STACKED
        for run_path, layer in run_layout_pieces(model, path):
            target = targets[run_path]
            full = run_shape(model, path, shape if layer is None else shape[1:], dt)
            if layer is not None or shard_bytes(full, dt, target) <= host_budget(shape, dt, stacked):
                placed[run_path] = place_direct(reader, model, path, layer, target, dt)
            elif stacked:
                placed[run_path] = place_stacked(reader, model, path, target, dt)
            elif len(shape) == 2:
                placed[run_path] = place_blocks(reader, path, target, dt)
            else:
                placed[run_path] = place_direct(reader, model, path, layer, target, dt)
            if transform is not None:
                placed[run_path] = transform(run_path, placed[run_path])
    return placed
