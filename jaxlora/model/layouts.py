"""Variable layouts: the one place that knows how stored variables differ from what a model reads.

Stored (canonical): layers stacked on one axis under "h", q/k/v fused in one (C, 3C) kernel;
what checkpoints, converters, the lit-llama/HF mappings and the train state hold. Run layouts:
per-layer ("h_0" ... "h_{n-1}") for a `scan_layers=False` model, and q/k/v split at head
boundaries, (C, 3, C), for a `split_qkv` model (tensor parallelism).
"""
from __future__ import annotations

import re
import warnings
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxlora.model.llama import STACKED, LLaMA

Array = jax.Array

# ----------------------------------------------------------------------------- variable layouts
#
# Stacked (canonical): {"h": {...leaves of shape (n_layer, ...)}, "wte": ..., ...}; what
# checkpoints, converters, the lit-llama mapping and the train state hold. Per-layer:
# {"h_0": {...}, ..., "h_{n-1}": {...}, "wte": ..., ...}; what a scan_layers=False model reads.
# init_variables, abstract_variables and logical_axes always describe the stacked layout, so
# a seed gives the same weights whichever way the model runs.

_PER_LAYER = re.compile(rf"{STACKED}_(\d+)")


def canonical(model: LLaMA) -> LLaMA:
    """The same model with stacked (scanned) layers and fused q/k/v kernels: the layout
    variables are stored in."""
    return model if model.scan_layers and not model.split_qkv else model.clone(scan_layers=True, split_qkv=False)


QKV_KERNEL = ("attn", "c_attn", "kernel")  # the fused q/k/v kernel, under a layer


def splits_qkv(model: LLaMA, path: tuple) -> bool:
    """Whether `model` reads the leaf at `path` (stacked or not) as (..., C, 3, C), not as stored."""
    return model.split_qkv and tuple(path[-3:]) == QKV_KERNEL


def qkv_in_run_layout(model: LLaMA, path: tuple, x: Any) -> Any:
    """A leaf at `path` (ending in a layer's attn/c_attn/kernel, stacked or not) as `model`
    reads it: with `model.split_qkv`, (..., C, 3C) -> (..., C, 3, C) (a free reshape; on a
    device mesh the new layout moves the kernel once); anything else unchanged."""
    if splits_qkv(model, path) and x.shape[-1] == 3 * model.config.n_embd:
        return x.reshape(*x.shape[:-1], 3, model.config.n_embd)
    return x


def _split_qkv_kernels(model: LLaMA, tree: Mapping[str, Any]) -> dict[str, Any]:
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


def layered(model: LLaMA, tree: Mapping[str, Any]) -> dict[str, Any]:
    """A variable collection in the layout `model` reads, from either layout. Inside jit
    this slices stacked frozen weights on every call; convert them once beforehand with
    `split_layers_on_device` (adapters are small: converting them per step costs nothing)."""
    tree = stack_layers(tree) if model.scan_layers else unstack_layers(tree, model.config.n_layer)
    return _split_qkv_kernels(model, tree)


def split_layers_on_device(model: LLaMA, params: Mapping[str, Any], shardings: Mapping[str, Any] | None = None,
                           ) -> dict[str, Any]:
    """Frozen weights in `model`'s layout, converted on the device one stacked leaf at a time.

    Consumes `params`: each stacked leaf is donated to the program that slices it, so the
    peak is the weights plus their largest stacked leaf, not twice the weights. Do not use
    the argument afterwards. shardings: the per-layer params' shardings (from
    `jaxlora.parallel.sharding.variable_shardings(model, mesh, as_run=True)["params"]`); None lets
    the compiler choose (a single device: that device).
    """
    if model.scan_layers or STACKED not in params:
        if not model.split_qkv or STACKED not in params:
            return layered(model, params)
        out = traverse_util.flatten_dict(params)  # scanned: only the q/k/v kernel changes layout
        path = (STACKED,) + QKV_KERNEL
        target = traverse_util.flatten_dict(shardings)[path] if shardings is not None else None
        out[path] = jax.jit(lambda x: qkv_in_run_layout(model, path, x), donate_argnums=0,
                            out_shardings=target)(out[path])
        return traverse_util.unflatten_dict(out)
    n = model.config.n_layer
    flat = traverse_util.flatten_dict(params[STACKED])
    targets = traverse_util.flatten_dict(shardings[f"{STACKED}_0"]) if shardings is not None else {}
    pieces = {}
    with warnings.catch_warnings():  # CPU cannot donate; the copy is then transient, as documented
        warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
        for path in list(flat):
            target = targets.get(path)
            split = jax.jit(lambda x, path=path: tuple(qkv_in_run_layout(model, path, x[i]) for i in range(n)),
                            donate_argnums=0, out_shardings=None if target is None else (target,) * n)
            pieces[path] = split(flat.pop(path))  # drop our reference so the donated buffer can go
    out = {k: v for k, v in params.items() if k != STACKED}
    out.update({f"{STACKED}_{i}": traverse_util.unflatten_dict({p: v[i] for p, v in pieces.items()})
                for i in range(n)})
    return out


def init_variables(model: LLaMA, rng: Array, seq_len: int = 8) -> dict[str, Any]:
    """Random {"params", "lora"} in the stacked layout, unboxed (plain arrays), built inside jit."""
    dummy = jnp.zeros((1, seq_len), jnp.int32)
    return jax.jit(lambda key: nn.unbox(canonical(model).init({"params": key}, dummy)))(rng)


def init_adapters(model: LLaMA, rng: Array) -> dict[str, Any]:
    """Fresh adapters (A random, B zero), stacked layout; the frozen weights' initialisers are
    dropped by XLA (their results are unused), so nothing of the base's size is allocated."""
    dummy = jnp.zeros((1, 8), jnp.int32)
    return jax.jit(lambda key: nn.unbox(canonical(model).init({"params": key}, dummy)).get("lora", {}))(rng)


def abstract_variables(model: LLaMA) -> dict[str, Any]:
    """Shapes and dtypes of every variable, stacked layout (jax.ShapeDtypeStruct), allocating nothing."""
    return nn.unbox(jax.eval_shape(lambda: canonical(model).init({"params": jax.random.key(0)},
                                                                 jnp.zeros((1, 8), jnp.int32))))


def logical_axes(model: LLaMA, as_run: bool = False) -> dict[str, Any]:
    """PartitionSpecs of logical axis names for every variable (for sharding rules): stacked
    layout, or with as_run the layout the model reads (per-layer for scan_layers=False)."""
    source = model if as_run else canonical(model)
    boxed = jax.eval_shape(lambda: source.init({"params": jax.random.key(0)}, jnp.zeros((1, 8), jnp.int32)))
    return nn.get_partition_spec(boxed)


def run_layout_pieces(model: LLaMA, path: tuple) -> list[tuple[tuple, int | None]]:
    """Where a stored leaf (stacked layers, fused q/k/v) goes in `model`'s layout:
    [(path there, layer taken from the stacked leaf or None for all of it)]."""
    if path[0] != STACKED or model.scan_layers:
        return [(path, None)]
    return [((f"{STACKED}_{i}",) + path[1:], i) for i in range(model.config.n_layer)]
