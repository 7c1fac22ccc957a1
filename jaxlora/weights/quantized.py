"""Quantized jaxlora checkpoints: frozen weights saved as a run holds them (NF4 codes and block
scales, or int8 values and scales), loaded back onto the devices without quantizing again, and
read dequantized by the exports.

A quantized checkpoint is a jaxlora checkpoint directory (`jaxlora.weights.jaxlora_dir`) whose
config.json records {"quantized": {"mode": "nf4", "dtype": "bfloat16"}} (the mode, and the dtype
of the float weights that were quantized) and whose params/ holds, in the stored layout (layers
stacked, q/k/v fused), each quantized kernel's leaves under its path: h/attn/c_attn/kernel/codes,
.../absmax (and .../absmax_scale, .../absmax_offset with nf4-dq; int8: .../q, .../scale); NF4
codes as bitsandbytes lays them out, one row per output column. Embeddings, norms and the LM
head stay float. Leaves move one layer of one kernel at a time, as every weights move does.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils

from jaxlora.errors import CheckpointError
from jaxlora.model.layouts import (
    gate_up_apart,
    qkv_in_run_layout,
    qkv_in_stored_layout,
    run_layout_pieces,
)
from jaxlora.model.llama import STACKED, LLaMA
from jaxlora.model.nf4 import put_host
from jaxlora.model.quantize import (
    Int8Kernel,
    NF4Kernel,
    QuantizedKernel,
    dequantize_program,
    kernel_from_leaves,
    kernel_leaves,
    quantize_kernel_as,
    quantized_shardings_like,
    quantizes,
    without_forward_layouts,
)
from jaxlora.weights import jaxlora_dir as cio
from jaxlora.weights.device import layer_sharding, to_device, updater, zeros
from jaxlora.weights.engine import KernelTransform, LeafReader, Path_, Where

__all__ = ["MERGE_INTO", "DequantizedReader", "check_mode", "load_quantized", "merge_plan", "record", "requantized",
           "save_quantized"]


def record(mode: str, dtype: Any) -> dict[str, str]:
    """config.json's "quantized" entry: the mode and the float dtype that was quantized."""
    return {"mode": mode, "dtype": jnp.dtype(dtype).name}


def check_mode(directory: str | os.PathLike, stored: dict[str, str] | None, wanted: str | None) -> None:
    """A quantized checkpoint serves only its own mode (its float weights are gone): CheckpointError
    naming both modes otherwise. wanted None / 'none': the float weights were asked for."""
    wanted = None if wanted in (None, "none") else wanted
    if stored is None or stored["mode"] == wanted:
        return
    if wanted is None:
        raise CheckpointError(f"{directory}: holds {stored['mode']}-quantized frozen weights; load it with "
                              f"--quantize {stored['mode']} (its float weights are not stored)")
    raise CheckpointError(f"{directory}: holds {stored['mode']}-quantized frozen weights, --quantize {wanted} was "
                          f"asked for; use --quantize {stored['mode']}, or quantize the float weights as {wanted}")


# ----------------------------------------------------------------------------- writing

def _gather(x: jax.Array) -> np.ndarray:
    """The whole array on the host of every process (all processes must call it)."""
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _stored(path: Path_) -> tuple[Path_, int | None]:
    """(stored path, layer) of a run path: h_3/... -> (h/..., 3)."""
    if path[0].startswith(f"{STACKED}_") and path[0][len(STACKED) + 1:].isdigit():
        return (STACKED,) + path[1:], int(path[0][len(STACKED) + 1:])
    return path, None


def save_quantized(directory: str | os.PathLike, model: LLaMA, params: Mapping[str, Any], quantized: dict[str, str],
                   overwrite: bool = False) -> Path:
    """Write frozen weights in `model`'s run layout (per-layer or stacked, q/k/v split or not;
    kernels quantized as `quantized["mode"]`) as a quantized checkpoint, atomically: one layer
    of one leaf at a time, moved to the stored layout on the devices, gathered to the host
    (every process must call this; the first writes)."""
    directory = Path(directory).absolute()
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} already exists; pass --overwrite to replace it")
    expected = cio.expected_variables(model.config, None, quantized["mode"])[cio.PARAMS_DIR]
    flat = traverse_util.flatten_dict(dict(without_forward_layouts(params)))  # a run-time copy, not stored
    pieces = {}
    apart = [piece for run_path, value in flat.items() for piece in gate_up_apart(run_path, value)]
    for run_path, value in apart:
        path, layer = _stored(run_path)
        value = qkv_in_stored_layout(model, run_path, value)
        named = kernel_leaves(value) if isinstance(value, (Int8Kernel, NF4Kernel)) else [(None, value)]
        for key, leaf in named:
            pieces.setdefault(path if key is None else path + (key,), []).append((layer, leaf))
    if set(pieces) != set(expected):
        raise CheckpointError(f"{directory}: the weights are not {quantized['mode']}-quantized as expected "
                              f"(unexpected {sorted(set(pieces) - set(expected))[:3]}, missing "
                              f"{sorted(set(expected) - set(pieces))[:3]})")
    primary = jax.process_index() == 0
    with cio.staged_directory(directory, overwrite) if primary else contextlib.nullcontext() as tmp:
        writer = cio.ArrayTreeWriter(tmp / cio.PARAMS_DIR, {p: (e.shape, e.dtype) for p, e in expected.items()}) \
            if primary else None
        for path, parts in pieces.items():
            for layer, leaf in parts:
                _write_leaf(writer, path, layer, leaf)
        if primary:
            writer.close()
            cio.write_config(tmp, model.config, None, quantized=quantized)
    return directory


def _write_leaf(writer: Any, path: Path_, layer: int | None, leaf: jax.Array) -> None:
    """One run-layout leaf (one layer, or a stacked leaf layer by layer) into the stored leaf."""
    if layer is not None:
        host = _gather(leaf)
        if writer is not None:
            writer.write(path, host, layer)
    elif cio.is_layered(path):
        for i in range(leaf.shape[0]):
            host = _gather(leaf[i])
            if writer is not None:
                writer.write(path, host, i)
    else:
        host = _gather(leaf)
        if writer is not None:
            writer.write(path, host)


# ----------------------------------------------------------------------------- reading

def kernel_groups(shapes: Mapping[Path_, Any]) -> dict[Path_, list[str]]:
    """{kernel path: its leaf names} of a quantized checkpoint's leaves (paths .../kernel/NAME)."""
    groups: dict[Path_, list[str]] = {}
    for path in shapes:
        if len(path) > 1 and path[-2] == "kernel":
            groups.setdefault(path[:-1], []).append(path[-1])
    return groups


def read_kernel(reader: LeafReader, path: Path_, names: list[str], mode: str, where: Where = None) -> QuantizedKernel:
    """The quantized kernel at `path` (stored layout, numpy leaves), whole or one layer."""
    return kernel_from_leaves(mode, {name: reader.read(path + (name,), where) for name in names})


class _FloatLeaves:
    """A quantized checkpoint's float leaves alone (a LeafReader)."""

    def __init__(self, reader: LeafReader, skip: set[Path_]) -> None:
        self.reader, self.skip = reader, skip

    def shapes(self) -> dict[Path_, tuple[tuple[int, ...], np.dtype]]:
        return {p: v for p, v in self.reader.shapes().items() if p not in self.skip}

    def read(self, path: Path_, where: Where = None) -> np.ndarray:
        return self.reader.read(path, where)


def load_quantized(reader: LeafReader, model: LLaMA, targets: Mapping[Path_, Any], mode: str,
                   dtype: Any = None) -> dict[Path_, Any]:
    """A quantized checkpoint's params onto the devices in `model`'s run layout: {run path:
    leaf}, float leaves cast to `dtype` and placed in targets[run path] (the float layout's
    shardings), quantized kernels moved to the run layout on the host one layer at a time and
    their leaves sharded like the float kernel (`quantized_specs`); never quantized again."""
    groups = kernel_groups(reader.shapes())
    skip = {k + (name,) for k, names in groups.items() for name in names}
    placed = to_device(_FloatLeaves(reader, skip), model, targets, dtype)
    for path, names in groups.items():
        for run_path, layer in run_layout_pieces(model, path):
            if layer is not None:
                host = qkv_in_run_layout(model, run_path, read_kernel(reader, path, names, mode, layer))
                placed[run_path] = _place(host, quantized_shardings_like(host, targets[run_path]))
            else:
                placed[run_path] = _place_stacked(reader, model, path, names, mode, targets[run_path])
    return placed


def _place(host: QuantizedKernel, shardings: Any) -> QuantizedKernel:
    return jax.tree.map(lambda x, where: put_host(np.asarray(x), where), host, shardings)


def _place_stacked(reader: LeafReader, model: LLaMA, path: Path_, names: list[str], mode: str, target: Any
                   ) -> QuantizedKernel:
    """A stacked quantized kernel filled on the devices layer by layer (the host holds one layer)."""
    n = reader.shapes()[path + (names[0],)][0][0]

    def host_layer(i: int) -> QuantizedKernel:
        return qkv_in_run_layout(model, path, read_kernel(reader, path, names, mode, i))

    first = host_layer(0)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct((n, *x.shape), x.dtype), first)
    shardings = quantized_shardings_like(shapes, target)
    per_layer = jax.tree.map(layer_sharding, shardings)
    buffers = jax.tree.map(lambda s, where: zeros(s.shape, s.dtype, where), shapes, shardings)
    with warnings.catch_warnings():  # CPU cannot donate: the copy is then transient
        warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
        for i in range(n):
            piece = _place(first if i == 0 else host_layer(i), per_layer)
            buffers = jax.tree.map(lambda buf, x, where, i=i: updater(where, True)(buf, x, i).block_until_ready(),
                                   buffers, piece, shardings)
    return buffers


# ----------------------------------------------------------------------------- dequantized views

class DequantizedReader:
    """A quantized checkpoint's params/ read as float weights (a LeafReader): each kernel
    dequantized on the CPU, one layer at a time, in the dtype its weights were quantized from
    (what the run multiplied by, up to that rounding); the other leaves as stored."""

    def __init__(self, reader: LeafReader, quantized: dict[str, str], config: Any) -> None:
        self.reader, self.mode = reader, quantized["mode"]
        self.dtype = np.dtype(jnp.dtype(quantized["dtype"]))
        self.groups = kernel_groups(reader.shapes())
        floats = cio.expected_variables(config, None)[cio.PARAMS_DIR]
        self._shapes = {p: v for p, v in reader.shapes().items() if p[:-1] not in self.groups}
        self._shapes.update({p: (tuple(floats[p].shape), self.dtype) for p in self.groups})

    def shapes(self) -> dict[Path_, tuple[tuple[int, ...], np.dtype]]:
        return dict(self._shapes)

    def read(self, path: Path_, where: Where = None) -> np.ndarray:
        if path not in self.groups:
            return self.reader.read(path, where)
        layer, rest = (where, ()) if where is None or isinstance(where, (int, np.integer)) else (where[0], where[1:])
        kernel = read_kernel(self.reader, path, self.groups[path], self.mode, layer)
        with jax.default_device(jax.devices("cpu")[0]):
            value = np.asarray(dequantize_program(jax.tree.map(jnp.asarray, kernel)))
        return value[tuple(rest)].astype(self.dtype) if rest else value.astype(self.dtype)


MERGE_INTO = ("trained", "original")  # a merged export's base kernels: as the adapters were trained, or as stored


def merge_plan(base: Any, base_quantized: dict[str, str] | None, adapters: Any,
               adapters_quantized: dict[str, str] | None, merge_into: str = "trained"
               ) -> tuple[KernelTransform | None, str | None]:
    """What a merged export folds the adapters into: (MergedView's base_kernels, a line saying so,
    or None when nothing is quantized). Adapters trained on a quantized base ("quantized" in
    their config.json) are merged by default into the kernels they were trained against: each
    float kernel quantized and dequantized as in training; "original" merges into the float
    weights instead (the difference: README, "On a smaller card"). A quantized checkpoint as the
    base is read dequantized (`DequantizedReader`): its float weights are not stored."""
    if merge_into not in MERGE_INTO:
        raise ValueError(f"merge_into must be one of {MERGE_INTO}, got {merge_into!r}")
    if base_quantized is not None:
        mode = base_quantized["mode"]
        if merge_into == "original":
            raise CheckpointError(f"{base}: stores its frozen weights {mode}-quantized only: there are no original "
                                  "float weights to merge into (merge into the dequantized ones: --merge_into trained)")
        if adapters_quantized is not None and adapters_quantized["mode"] != mode:
            raise CheckpointError(f"{adapters}: adapters trained on a {adapters_quantized['mode']}-quantized base, but "
                                  f"{base} holds {mode}-quantized weights; merge them into a base quantized as "
                                  f"{adapters_quantized['mode']} (or its float weights)")
        return None, f"adapters merged into the {mode}-dequantized kernels of {base}, written as float"
    if adapters_quantized is None:
        return None, None
    mode = adapters_quantized["mode"]
    if merge_into == "original":
        return None, (f"adapters merged into the original float kernels of {base}, not the {mode}-dequantized ones "
                      "they were trained on (--merge_into trained)")
    return as_trained(adapters_quantized), (
        f"adapters merged into {base}'s kernels {mode}-quantized and dequantized as in training (from "
        f"{adapters_quantized['dtype']}), written as float; --merge_into original merges into the float weights")


def as_trained(quantized: dict[str, str]) -> KernelTransform:
    """MergedView's base_kernels for adapters trained on a `quantized` base: each kernel the run
    quantized, requantized (one whole layer at a time); the LM head as stored."""
    def base_kernel(path: Path_, where: Where, kernel: np.ndarray) -> np.ndarray:
        if not quantizes(path, quantized["mode"], head=False):
            return kernel.astype(np.float32)
        if not isinstance(where, (int, np.integer)):
            raise ValueError(f"{'/'.join(path)}: a requantized kernel is read one whole layer at a time, got {where}")
        return requantized(kernel, quantized)
    return base_kernel


def requantized(kernel: np.ndarray, quantized: dict[str, str]) -> np.ndarray:
    """float32 (in, out): what a run with `--quantize mode` multiplied by in place of one layer's
    float kernel: cast to the run's storage dtype, quantized, dequantized (on the CPU)."""
    with jax.default_device(jax.devices("cpu")[0]):
        stored = jnp.asarray(kernel).astype(quantized["dtype"])
        return np.asarray(dequantize_program(quantize_kernel_as(stored, quantized["mode"])))
