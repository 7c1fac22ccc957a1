"""Sharding as data: every variable names its logical axes once (in the model); a rules
table maps logical axes to mesh axes. A layout change is a table change.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with frozen weights sharded),
`tensor` (tensor parallel over heads / MLP width / vocabulary).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlora.model import LLaMA, logical_axes

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or axes, or None = replicated)
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("qkv", "tensor"),
    ("heads", "tensor"),
    ("layers", None),
    ("lora_group", None),
    ("lora_rank", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; data=-1 takes the devices the others leave."""
    devices = list(devices if devices is not None else jax.devices())
    if data == -1:
        if len(devices) % (fsdp * tensor):
            raise ValueError(f"{len(devices)} devices do not divide into fsdp={fsdp} x tensor={tensor}")
        data = len(devices) // (fsdp * tensor)
    if data * fsdp * tensor != len(devices):
        raise ValueError(f"mesh {data}x{fsdp}x{tensor} needs {data * fsdp * tensor} devices, have {len(devices)}")
    return Mesh(np.array(devices).reshape(data, fsdp, tensor), MESH_AXES)


def variable_shardings(model: LLaMA, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
                       as_run: bool = False) -> Any:
    """NamedShardings for {"params", "lora"}, from the model's logical axis names: in the
    stacked (stored) layout, or with as_run in the layout the model reads (per-layer weights
    for scan_layers=False; pass those to `jaxlora.model.split_layers_on_device`)."""
    return nn.logical_to_mesh_sharding(logical_axes(model, as_run), mesh, rules)


def batch_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> NamedSharding:
    """Sharding of (n_micro, micro_batch, T) token batches: micro-batch rows over the data axes."""
    return NamedSharding(mesh, PartitionSpec(None, dict(rules)["batch"], None))
