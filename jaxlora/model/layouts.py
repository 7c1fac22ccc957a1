"""Variable layouts: the one place that knows how stored variables differ from what a model reads.

Stored (canonical): layers stacked on one axis under "h", q/k/v fused in one kernel of
(C, C + 2 * n_kv_head * head_size) columns [q heads | k heads | v heads] (lit-llama's (C, 3C)
without grouped-query attention); what checkpoints, converters, the lit-llama/HF mappings and
the train state hold. Run layouts: per-layer ("h_0" ... "h_{n-1}") for a `scan_layers=False`
model, q/k/v split by query group for a `split_qkv` model (tensor parallelism; `QKVLayout`), and
gate|up in one kernel for a `fused_mlp` model (`fuse_gate_up`; decoding, and --fuse_mlp).

This module sits below the network (jaxlora.model.llama imports its q/k/v facts); it handles
LLaMA models only through their attributes.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxlora.config import FUSED_GATE_UP, GATE_UP, LLaMAConfig
from jaxlora.model.nf4 import NF4Kernel
from jaxlora.model.quantize import Int8Kernel, map_output_axes, quantize_kernel_as


Array = jax.Array
Model = nn.Module  # a jaxlora.model.llama.LLaMA (not imported: llama.py imports this module)
STACKED = "h"  # the scope of the stacked layers ("h_0", "h_1", ... when run per layer)

# ----------------------------------------------------------------------------- q/k/v columns
#
# Run layout of a split q/k/v kernel: (C, group + 2, run_kv * hs), group = n_head / run_kv.
# Along the last axis sit run_kv "query groups" of hs columns each; slot s < group of query
# group j holds q head j * group + s, slot `group` its k head, slot group + 1 its v head. Tensor
# parallelism splits the last axis, so a device holds whole query groups: its q heads and the
# k/v heads they read, and attention needs no communication. Without GQA (group 1, run_kv =
# n_head) this is lit-llama's (C, 3, C), a free reshape of the stored kernel. When the tensor
# axis does not divide n_kv_head, the k/v heads are replicated: run_kv = lcm(n_kv_head, tensor)
# and each k/v head appears run_kv / n_kv_head times (every device computes the k/v heads its
# q heads read, as Megatron-LM and vLLM do).


def qkv_columns(config: LLaMAConfig) -> dict[str, tuple[int, int]]:
    """Column ranges [start, stop) of q, k and v in the stored fused kernel (C, C + 2 * kv_size)."""
    q, kv = config.n_embd, config.kv_size
    return {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}


def run_kv_heads(config: LLaMAConfig, tensor: int = 1) -> int:
    """k/v heads the model runs with on a tensor axis of `tensor` devices: n_kv_head when the
    axis divides it, else lcm(n_kv_head, tensor) (each k/v head replicated); divides n_head
    whenever tensor does."""
    return math.lcm(config.n_kv_head, tensor)


@dataclass(frozen=True)
class QKVLayout:
    """The fused q/k/v kernel's stored columns and its split run layout (see above)."""

    n_head: int
    n_kv_head: int
    head_size: int
    run_kv: int  # k/v heads in the run layout (n_kv_head, or more when replicated)

    @property
    def group(self) -> int:
        return self.n_head // self.run_kv

    @property
    def run_shape(self) -> tuple[int, int]:
        return self.group + 2, self.run_kv * self.head_size

    @cached_property
    def index(self) -> np.ndarray:
        """(group + 2, run_kv * hs) stored column of each run column."""
        hs, q = self.head_size, self.n_head * self.head_size
        j = np.arange(self.run_kv)[:, None]  # query group
        d = np.arange(hs)[None, :]
        kv_head = j // (self.run_kv // self.n_kv_head)  # the stored k/v head a run head copies
        slots = [((j * self.group + s) * hs + d).reshape(-1) for s in range(self.group)]
        slots += [(q + kv_head * hs + d).reshape(-1), (q + (self.n_kv_head + kv_head) * hs + d).reshape(-1)]
        return np.stack(slots)

    @property
    def is_reshape(self) -> bool:
        """Whether the run layout is a plain reshape of the stored one (no GQA, no replication)."""
        return self.group == 1 and self.run_kv == self.n_kv_head

    def to_run(self, x: Any) -> Any:
        """(..., stored columns) -> (..., group + 2, run_kv * hs), for kernels and activations alike."""
        if self.is_reshape:
            return x.reshape(*x.shape[:-1], *self.run_shape)
        return _take_columns(x, self.index)

    def to_stored(self, x: Any) -> Any:
        """The inverse of to_run (a replicated k/v column is read from its first copy)."""
        if self.is_reshape:
            return x.reshape(*x.shape[:-2], -1)
        flat, index = x.reshape(*x.shape[:-2], -1), self.index.reshape(-1)
        first = np.unique(index, return_index=True)[1]  # sorted stored columns, where each first appears
        return _take_columns(flat, first)

    def split_run(self, y: Array) -> tuple[Array, Array, Array]:
        """Run-layout outputs (B, T, group + 2, run_kv * hs) -> q (B, T, n_head, hs), k and v
        (B, T, run_kv, hs); q head j * group + s is slot s of query group j."""
        B, T = y.shape[:2]
        q = y[..., :self.group, :].reshape(B, T, self.group, self.run_kv, self.head_size).swapaxes(2, 3)
        k, v = (y[..., s, :].reshape(B, T, self.run_kv, self.head_size) for s in (self.group, self.group + 1))
        return q.reshape(B, T, self.n_head, self.head_size), k, v

    def split_stored(self, y: Array) -> tuple[Array, Array, Array]:
        """Stored-layout outputs (B, T, q + 2 kv columns) -> q (B, T, n_head, hs), k and v (B, T, n_kv_head, hs)."""
        B, T = y.shape[:2]
        q_cols = self.n_head * self.head_size
        q, k, v = jnp.split(y, [q_cols, q_cols + self.n_kv_head * self.head_size], axis=-1)
        return (q.reshape(B, T, self.n_head, self.head_size), k.reshape(B, T, self.n_kv_head, self.head_size),
                v.reshape(B, T, self.n_kv_head, self.head_size))


def _take_columns(x: Any, index: np.ndarray) -> Any:
    """x[..., index] (index of any shape), on the host for numpy input, else on the device."""
    if isinstance(x, np.ndarray):
        return np.take(x, index, axis=-1)
    return jnp.take(x, jnp.asarray(index), axis=-1)


def qkv_layout(config: LLaMAConfig, tensor: int = 1) -> QKVLayout:
    """The q/k/v layout of `config` on a tensor axis of `tensor` devices."""
    return QKVLayout(config.n_head, config.n_kv_head, config.head_size, run_kv_heads(config, tensor))


def model_tensor(model: Model) -> int:
    """The tensor-parallel size `model` runs with (1 without a mesh)."""
    return 1 if model.mesh is None else int(dict(model.mesh.shape).get("tensor", 1))


def model_qkv_layout(model: Model) -> QKVLayout:
    return qkv_layout(model.config, model_tensor(model) if model.split_qkv else 1)

# ----------------------------------------------------------------------------- variable layouts
#
# Stacked (canonical): {"h": {...leaves of shape (n_layer, ...)}, "wte": ..., ...}; what
# checkpoints, converters, the lit-llama mapping and the train state hold. Per-layer:
# {"h_0": {...}, ..., "h_{n-1}": {...}, "wte": ..., ...}; what a scan_layers=False model reads.
# init_variables, abstract_variables and logical_axes always describe the stacked layout, so
# a seed gives the same weights whichever way the model runs.

_PER_LAYER = re.compile(rf"{STACKED}_(\d+)")


def canonical(model: Model) -> Model:
    """The same model with stacked (scanned) layers, fused q/k/v kernels and separate gate/up
    kernels: the layout variables are stored in."""
    if model.scan_layers and not model.split_qkv and not model.fused_mlp:
        return model
    return model.clone(scan_layers=True, split_qkv=False, fused_mlp=False)


QKV_KERNEL = ("attn", "c_attn", "kernel")  # the fused q/k/v kernel, under a layer


def splits_qkv(model: Model, path: tuple) -> bool:
    """Whether `model` reads the leaf at `path` (stacked or not) as (..., C, 3, C), not as stored."""
    return model.split_qkv and tuple(path[-3:]) == QKV_KERNEL


def qkv_in_run_layout(model: Model, path: tuple, x: Any) -> Any:
    """A leaf at `path` (ending in a layer's attn/c_attn/kernel, stacked or not) as `model`
    reads it: with `model.split_qkv`, (..., C, C + 2 kv) -> (..., C, group + 2, run_kv * hs)
    (`QKVLayout`; without GQA (C, 3C) -> (C, 3, C), a free reshape; on a device mesh the new
    layout moves the kernel once); a quantized kernel's leaves likewise, along their output
    axes (`quantize.map_output_axes`); anything else unchanged."""
    if not splits_qkv(model, path):
        return x
    layout = model_qkv_layout(model)
    if isinstance(x, (Int8Kernel, NF4Kernel)):
        return x if x.out_ndim == 2 else map_output_axes(x, layout.to_run, 2, keep_rows=not layout.is_reshape)
    cfg = model.config
    return layout.to_run(x) if x.shape[-1] == cfg.n_embd + 2 * cfg.kv_size else x


def qkv_in_stored_layout(model: Model, path: tuple, x: Any) -> Any:
    """The inverse of `qkv_in_run_layout` (a replicated k/v column from its first copy)."""
    if not splits_qkv(model, path):
        return x
    layout = model_qkv_layout(model)
    if isinstance(x, (Int8Kernel, NF4Kernel)):
        return x if x.out_ndim == 1 else map_output_axes(x, layout.to_stored, 1)
    return layout.to_stored(x) if tuple(x.shape[-2:]) == layout.run_shape else x


def quantize_in_run_layout(model: Model, path: tuple, kernel: Any, mode: str, consume: bool = False) -> Any:
    """A float kernel placed as `model` reads it, quantized in `mode` where it lies: the same
    leaves as quantizing the stored kernel and moving them to the run layout (codes, absmax and
    int8 scales are per column; nf4-dq's second level runs over the stored order)."""
    layout = model_qkv_layout(model)
    if not (splits_qkv(model, path) and tuple(kernel.shape[-2:]) == layout.run_shape):
        return quantize_kernel_as(kernel, mode, consume)
    order = None if layout.is_reshape else (layout.to_stored, layout.to_run)
    return quantize_kernel_as(kernel, mode, consume, out_ndim=2, stored_order=order)


def _split_qkv_kernels(model: Model, tree: Mapping[str, Any]) -> dict[str, Any]:
    if not model.split_qkv:
        return dict(tree)
    flat = traverse_util.flatten_dict(tree)
    return traverse_util.unflatten_dict({path: qkv_in_run_layout(model, path, x) for path, x in flat.items()})


def unstack_layers(tree: Mapping[str, Any], n_layer: int) -> dict[str, Any]:
    """Stacked -> per-layer (slices of each stacked leaf). Trees without "h" come back unchanged."""
    if STACKED not in tree:
        return dict(tree)
    out = {k: v for k, v in tree.items() if k != STACKED}
    for i in range(n_layer):
        out[f"{STACKED}_{i}"] = jax.tree.map(lambda x, i=i: x[i], tree[STACKED])
    return out


def stack_layers(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Per-layer -> stacked. Trees without h_0, h_1, ... come back unchanged."""
    names = sorted((k for k in tree if _PER_LAYER.fullmatch(k)), key=lambda k: int(k.split("_")[-1]))
    if not names:
        return dict(tree)
    if [int(k.split("_")[-1]) for k in names] != list(range(len(names))):
        raise ValueError(f"per-layer variables must be {STACKED}_0..{STACKED}_{len(names) - 1}, got {names}")
    out = {k: v for k, v in tree.items() if k not in names}
    out[STACKED] = jax.tree.map(lambda *xs: jnp.stack(xs), *(tree[k] for k in names))
    return out


def layered(model: Model, tree: Mapping[str, Any]) -> dict[str, Any]:
    """A variable collection in the layout `model` reads, from either layout. Inside jit
    this slices stacked frozen weights on every call; convert them once beforehand with
    `split_layers_on_device` (adapters are small: converting them per step costs nothing)."""
    tree = stack_layers(tree) if model.scan_layers else unstack_layers(tree, model.config.n_layer)
    return _split_qkv_kernels(model, tree)


def layer(x: Any, i: int) -> Any:
    """Layer i of a stacked leaf (an array or a quantized kernel)."""
    return jax.tree.map(lambda a: a[i], x)


def split_layers_on_device(model: Model, params: Mapping[str, Any], shardings: Mapping[str, Any] | None = None,
                           ) -> dict[str, Any]:
    """Frozen weights in `model`'s layout, converted on the device one stacked leaf at a time.

    Consumes `params`: each stacked leaf is deleted as soon as it is sliced, so the peak is
    the weights plus their largest stacked leaf, not twice the weights. Do not use the
    argument afterwards. shardings: the per-layer params' shardings (from
    `jaxlora.parallel.sharding.variable_shardings(model, mesh, as_run=True)["params"]`); None lets
    the compiler choose (a single device: that device).
    """
    if model.scan_layers or STACKED not in params:
        if not model.split_qkv or STACKED not in params:
            return layered(model, params)
        out = traverse_util.flatten_dict(params)  # scanned: only the q/k/v kernel changes layout
        path = (STACKED,) + QKV_KERNEL
        target = traverse_util.flatten_dict(shardings)[path] if shardings is not None else None
        stacked = out[path]
        out[path] = jax.jit(lambda x: qkv_in_run_layout(model, path, x), out_shardings=target)(stacked)
        _free(stacked)
        return traverse_util.unflatten_dict(out)
    n = model.config.n_layer
    flat = traverse_util.flatten_dict(params[STACKED])
    targets = traverse_util.flatten_dict(shardings[f"{STACKED}_0"]) if shardings is not None else {}
    pieces = {}
    for path in list(flat):
        target = targets.get(path)
        split = jax.jit(lambda x, path=path: tuple(qkv_in_run_layout(model, path, layer(x, i)) for i in range(n)),
                        out_shardings=None if target is None else (target,) * n)
        stacked = flat.pop(path)
        pieces[path] = split(stacked)
        _free(stacked)
    out = {k: v for k, v in params.items() if k != STACKED}
    out.update({f"{STACKED}_{i}": traverse_util.unflatten_dict({p: v[i] for p, v in pieces.items()})
                for i in range(n)})
    return out


def _free(tree: Any) -> None:
    """Delete a consumed input's arrays now. Donating them would not free them: a buffer is
    reused only by an output of the same shape, and a split or fused layout's outputs never
    match; and the caller's tree keeps every old array alive until the whole conversion is done
    (the peak would be twice the weights, not the weights plus one leaf)."""
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array) and not leaf.is_deleted():
            leaf.delete()


# ----------------------------------------------------------------------------- gate and up fused
#
# A `fused_mlp` model's layout (decoding; training with --fuse_mlp): a block's gate (c_fc1) and
# up (c_fc2) kernels, each (..., C, H), as one kernel FUSED_GATE_UP (..., C, 2, H): one product
# reads both. Quantized kernels fuse values and per-channel scales alike (out_ndim 2); NF4
# kernels stay apart.

def _fuse_pair(gate: Any, up: Any) -> Any:
    if isinstance(gate, Int8Kernel):
        qt = None if gate.qt is None or up.qt is None else jnp.stack([gate.qt, up.qt], axis=-3)
        return Int8Kernel(jnp.stack([gate.q, up.q], axis=-2), jnp.stack([gate.scale, up.scale], axis=-2),
                          out_ndim=2, qt=qt)
    return jnp.stack([gate, up], axis=-2)


@functools.lru_cache(maxsize=None)
def _fuse_program(target: Any) -> Any:
    """The two kernels' fusion, placed at `target` (None: where the compiler puts it, following
    its inputs)."""
    return jax.jit(_fuse_pair, out_shardings=target)


def can_fuse_gate_up(params: Mapping[str, Any]) -> bool:
    """Whether every block's gate/up kernels can be fused: plain or 8-bit (int8, fp8) ones, one
    output axis each."""
    kernels = [x for path, x in traverse_util.flatten_dict(params).items()  # quantized kernels are leaves
               if len(path) >= 3 and path[-3:-1] in (("mlp", GATE_UP[0]), ("mlp", GATE_UP[1]))]
    return bool(kernels) and all(not isinstance(k, NF4Kernel) and getattr(k, "out_ndim", 1) == 1 for k in kernels)


def fuse_gate_up(params: Mapping[str, Any], shardings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`params` (stacked or per-layer) with each block's gate and up kernels fused into one
    FUSED_GATE_UP kernel, for a `fused_mlp` model. Consumes the two kernels (deleted a block at a
    time: the peak is the weights plus one fused kernel); check `can_fuse_gate_up` first.
    shardings: the fused model's params shardings (float kernels are placed there; None, or
    quantized kernels: where the compiler puts them, following the two kernels)."""
    def visit(node: Mapping[str, Any], where: Any) -> dict[str, Any]:
        out = {}
        for key, value in node.items():
            sub = where.get(key) if isinstance(where, Mapping) else None
            if key == "mlp" and all(name in value for name in GATE_UP):
                mlp = {k: v for k, v in value.items() if k not in GATE_UP}
                gate, up = (value[name]["kernel"] for name in GATE_UP)
                target = None if isinstance(gate, Int8Kernel) or sub is None else sub[FUSED_GATE_UP[-1]]["kernel"]
                mlp[FUSED_GATE_UP[-1]] = {"kernel": _fuse_program(target)(gate, up)}
                _free((gate, up))
                out[key] = mlp
            elif isinstance(value, Mapping):
                out[key] = visit(value, sub)
            else:
                out[key] = value
        return out
    return visit(params, shardings)


def gate_up_apart(path: tuple, kernel: Any) -> list[tuple[tuple, Any]]:
    """The inverse of `fuse_gate_up` for one leaf: [(path, leaf)] back in the stored modules
    (c_fc1, c_fc2) for a fused kernel at path .../mlp/c_fc/kernel, else [(path, kernel)]."""
    if tuple(path[-3:-1]) != FUSED_GATE_UP:
        return [(path, kernel)]
    def half(g: int) -> Any:
        if isinstance(kernel, Int8Kernel):
            qt = None if kernel.qt is None else kernel.qt[..., g, :, :]
            return Int8Kernel(kernel.q[..., g, :], kernel.scale[..., g, :], out_ndim=1, qt=qt)
        return kernel[..., g, :]
    return [((*path[:-2], name, path[-1]), half(g)) for g, name in enumerate(GATE_UP)]


def init_variables(model: Model, rng: Array, seq_len: int = 8) -> dict[str, Any]:
    """Random {"params", "lora"} in the stacked layout, unboxed (plain arrays), built inside jit."""
    dummy = jnp.zeros((1, seq_len), jnp.int32)
    return jax.jit(lambda key: nn.unbox(canonical(model).init({"params": key}, dummy)))(rng)


def init_adapters(model: Model, rng: Array) -> dict[str, Any]:
    """Fresh adapters (A random, B zero), stacked layout; the frozen weights' initialisers are
    dropped by XLA (their results are unused), so nothing of the base's size is allocated."""
    dummy = jnp.zeros((1, 8), jnp.int32)
    return jax.jit(lambda key: nn.unbox(canonical(model).init({"params": key}, dummy)).get("lora", {}))(rng)


def abstract_variables(model: Model, as_run: bool = False) -> dict[str, Any]:
    """Shapes and dtypes of every variable (jax.ShapeDtypeStruct), allocating nothing: stacked
    layout, or with as_run the layout the model reads."""
    source = model if as_run else canonical(model)
    return nn.unbox(jax.eval_shape(lambda: source.init({"params": jax.random.key(0)}, jnp.zeros((1, 8), jnp.int32))))


def logical_axes(model: Model, as_run: bool = False) -> dict[str, Any]:
    """PartitionSpecs of logical axis names for every variable (for sharding rules): stacked
    layout, or with as_run the layout the model reads (per-layer for scan_layers=False)."""
    source = model if as_run else canonical(model)
    boxed = jax.eval_shape(lambda: source.init({"params": jax.random.key(0)}, jnp.zeros((1, 8), jnp.int32)))
    return nn.get_partition_spec(boxed)


def run_layout_pieces(model: Model, path: tuple) -> list[tuple[tuple, int | None]]:
    """Where a stored leaf (stacked layers, fused q/k/v) goes in `model`'s layout:
    [(path there, layer taken from the stacked leaf or None for all of it)]."""
    if path[0] != STACKED or model.scan_layers:
        return [(path, None)]
    return [((f"{STACKED}_{i}",) + path[1:], i) for i in range(model.config.n_layer)]
