"""Sharding as data: every variable names its logical axes once (in the model); a rules
table maps logical axes to mesh axes. A layout change is a table change.

Mesh axes: `data` (pure data parallel: every device holds the whole frozen model), `fsdp`
(data parallel with the frozen weights sharded over the devices and gathered layer by layer
for use), `tensor` (tensor parallel over heads / MLP width / vocabulary). Batch rows are
split over data x fsdp; the weights over fsdp (their `embed` axis) and tensor.

Which layout when (LoRA: frozen weights have no gradients, so data parallelism costs only the
adapters' all-reduce, a few MB): `data` over every device while the model fits on one
device; beyond that, shard the weights (`default_mesh_shape`).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlora.config import LLaMAConfig
from jaxlora.errors import MeshError
from jaxlora.model.layouts import abstract_variables, logical_axes, splits_qkv
from jaxlora.model.llama import STACKED, LLaMA
from jaxlora.model.nf4 import block_problem
from jaxlora.model.quantize import quantizes

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or axes, or None = replicated)
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("qkv", "tensor"),
    ("heads", "tensor"),
    ("norm", None),
    ("layers", None),
    ("lora_group", None),
    ("lora_rank", None),
    # activations (jaxlora.model.llama.ACT_*): rows split like the batch, features like the weights' outputs
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
)


def parse_mesh(spec: str | Mapping[str, int] | None) -> dict[str, int]:
    """'data=2,fsdp=2,tensor=2' -> {"data": 2, "fsdp": 2, "tensor": 2}; axes left out are 1,
    except `data`, which takes the devices the others leave (-1). None/'' -> {} (the default)."""
    if spec is None or spec == "":
        return {}
    if isinstance(spec, Mapping):
        items = dict(spec)
    else:
        items = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, sep, value = part.partition("=")
            if not sep:
                raise MeshError(f"--mesh {spec!r}: {part!r} is not AXIS=SIZE (axes: {', '.join(MESH_AXES)})")
            try:
                items[name.strip()] = int(value)
            except ValueError:
                raise MeshError(f"--mesh {spec!r}: size of {name.strip()!r} is not an integer: {value!r}") from None
    unknown = [k for k in items if k not in MESH_AXES]
    if unknown:
        raise MeshError(f"--mesh: unknown axes {unknown}; the axes are {', '.join(MESH_AXES)}")
    bad = {k: v for k, v in items.items() if v < 1 and not (k == "data" and v == -1)}
    if bad:
        raise MeshError(f"--mesh: axis sizes must be >= 1 (data may be -1: the rest), got {bad}")
    return {"data": items.get("data", -1), "fsdp": items.get("fsdp", 1), "tensor": items.get("tensor", 1)}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: every device of every process);
    data=-1 takes the devices the others leave. A mesh smaller than the device count (it must
    divide it) takes the first devices. Devices are laid out process by process, so `tensor`
    (then `fsdp`) stays inside a host, where the links are fastest."""
    devices = list(devices if devices is not None else jax.devices())
    devices.sort(key=lambda d: (getattr(d, "process_index", 0), getattr(d, "id", 0)))
    n = len(devices)
    if data == -1:
        if n % (fsdp * tensor):
            raise MeshError(f"fsdp={fsdp} x tensor={tensor} = {fsdp * tensor} does not divide the {n} devices")
        data = n // (fsdp * tensor)
    size = data * fsdp * tensor
    if size > n:
        raise MeshError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor}: the mesh needs {size} devices, there "
                        + (f"is {n}" if n == 1 else f"are {n}"))
    if n % size:
        raise MeshError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} = {size} devices does not divide the "
                        f"{n} devices there are")
    return Mesh(np.array(devices[:size]).reshape(data, fsdp, tensor), MESH_AXES)


def mesh_from_spec(spec: str | Mapping[str, int] | None, config: LLaMAConfig, param_bytes: int = 2,
                   devices: Sequence[Any] | None = None) -> Mesh:
    """The run's mesh: `spec` ('data=D,fsdp=F,tensor=T'), or the default layout for `config`
    on these devices (`default_mesh_shape`); checked against the model (`check_mesh`)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = parse_mesh(spec) or default_mesh_shape(config, devices, param_bytes)
    mesh = make_mesh(**shape, devices=devices)
    check_mesh(mesh, config)
    return mesh


def device_memory_bytes(device: Any) -> int | None:
    """Memory of one device (None where the backend does not say, e.g. CPU)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return (stats or {}).get("bytes_limit")


def peak_memory_bytes() -> int | None:
    """The highest peak memory use of this process's devices so far (None where the backend
    does not say, e.g. CPU)."""
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    return max((p for p in peaks if p), default=None)


def host_memory_bytes() -> int | None:
    """Memory the host has available now (Linux), for CPU runs."""
    try:
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# Frozen weights may take this share of a device's memory before they are sharded; the
# rest is for activations (7B at 8 x 512 with dots_no_batch remat: ~13 GB), adapters,
# optimizer state and the compiler's buffers.
WEIGHT_SHARE = 0.55


def default_mesh_shape(config: LLaMAConfig, devices: Sequence[Any], param_bytes: int = 2) -> dict[str, int]:
    """Data parallel over every device while the frozen weights fit one device (no weight
    traffic at all); otherwise tensor parallel over the fewest devices of one host that hold
    them, the rest data parallel; past one host, fsdp over hosts as well.

    Why tensor before fsdp: frozen weights have no gradients, so tensor parallelism moves only
    activations, while fsdp re-gathers every weight for each micro-batch, and XLA hoists those
    gathers out of the gradient-accumulation loop (65B with fsdp=2 ran out of memory on two
    141 GB H200s, where tensor=2 trained at 49% MFU; docs/benchmarks.md)."""
    n = len(devices)
    limit = device_memory_bytes(devices[0])
    need = config.num_params() * param_bytes
    if limit is None or need <= WEIGHT_SHARE * limit:
        return {"data": n, "fsdp": 1, "tensor": 1}

    def fits(shards: int) -> bool:
        return need / shards <= WEIGHT_SHARE * limit

    per_host = sum(1 for d in devices if d.process_index == devices[0].process_index)
    tensors = [t for t in range(2, per_host + 1) if per_host % t == 0 and n % t == 0 and not _misfit(config, 1, t)]
    for t in tensors:
        if fits(t):
            return {"data": n // t, "fsdp": 1, "tensor": t}
    t = max(tensors, default=1)
    rest = n // t
    fsdp = next((f for f in range(2, rest + 1) if rest % f == 0 and not _misfit(config, f, t) and fits(t * f)), rest)
    return {"data": rest // fsdp, "fsdp": fsdp, "tensor": t}


def check_mesh(mesh: Mesh | Mapping[str, int], config: LLaMAConfig) -> None:
    """Refuse a mesh (or a mesh shape) whose axes do not divide the model's sizes, naming both numbers."""
    shape = mesh.shape if isinstance(mesh, Mesh) else mesh
    problem = _misfit(config, shape["fsdp"], shape["tensor"])
    if problem:
        raise MeshError(problem)


def _misfit(config: LLaMAConfig, fsdp: int, tensor: int) -> str | None:
    """What the fsdp and tensor axis sizes fail to divide (None: they fit the model). The k/v
    heads need not divide: those the tensor axis does not divide are replicated
    (jaxlora.model.layouts.run_kv_heads), which needs only tensor to divide n_head."""
    for name, size in (("n_head", config.n_head), ("n_hidden (MLP width)", config.n_hidden),
                       ("padded_vocab_size", config.padded_vocab_size)):
        if size % tensor:
            kv = f" (n_kv_head={config.n_kv_head})" if name == "n_head" and config.n_kv_head != config.n_head else ""
            return f"tensor={tensor} does not divide {name}={size}{kv}"
    if config.n_embd % fsdp:
        return f"fsdp={fsdp} does not divide n_embd={config.n_embd}"
    return None


def check_quantized_mesh(model: LLaMA, mesh: Mesh, mode: str, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES
                         ) -> None:
    """Refuse a mesh that would split an NF4 kernel's input axis inside its blocks of 64 (its
    codes and block scales are sharded like the kernel, and each device must hold whole
    blocks); naming the kernel and the numbers. int8 is per output channel: any split works."""
    if mode not in ("nf4", "nf4-dq"):
        return
    shapes = traverse_util.flatten_dict(abstract_variables(model, as_run=True)["params"])
    shardings = traverse_util.flatten_dict(variable_shardings(model, mesh, rules, as_run=True)["params"])
    problems = {}
    for path, sharding in shardings.items():
        if not quantizes(path, mode, head=False):
            continue
        shape = shapes[path].shape
        axis = len(shape) - (3 if splits_qkv(model, path) else 2)  # the input (contraction) axis
        name = "/".join(p if not p.startswith(f"{STACKED}_") else f"{STACKED}_*" for p in path)
        problem = block_problem(shape[axis], shape[axis] // sharding.shard_shape(shape)[axis])
        if problem:
            problems.setdefault(name, f"{name} (input axis over {sharding.spec[axis]}): {problem}")
    if problems:
        raise MeshError(f"--quantize {mode} on mesh {describe(mesh)}: " + "; ".join(problems.values())
                        + ". Choose fsdp/tensor sizes that keep whole blocks on each device, or --quantize int8")


def batch_shards(mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> int:
    """How many ways batch rows are split (data x fsdp with the default rules)."""
    axes = dict(rules)["batch"]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return math.prod(mesh.shape[a] for a in axes)


def variable_shardings(model: LLaMA, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
                       as_run: bool = False) -> Any:
    """NamedShardings for {"params", "lora"}, from the model's logical axis names: in the
    stacked (stored) layout, or with as_run in the layout the model reads (per-layer weights
    for scan_layers=False, q/k/v split for split_qkv; pass those to `jaxlora.weights.load.load_params`
    or `jaxlora.model.layouts.split_layers_on_device`)."""
    return nn.logical_to_mesh_sharding(logical_axes(model, as_run), mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> NamedSharding:
    """Sharding of (n_micro, micro_batch, T) token batches: micro-batch rows over the data axes."""
    return NamedSharding(mesh, PartitionSpec(None, dict(rules)["batch"], None))


def eval_batch_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> NamedSharding:
    """Sharding of (batch, T) evaluation batches: rows over the data axes."""
    return NamedSharding(mesh, PartitionSpec(dict(rules)["batch"], None))


def host_to_global(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Host arrays holding the whole (global) batch -> global device arrays; each process
    transfers only the rows its own devices hold."""
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index])
            for k, v in batch.items()}


def local_rows(sharding: NamedSharding, n_micro: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """For a training batch (n_micro, rows, T) laid out by `sharding`: (fill, count) masks over
    its n_micro * rows rows, the rows this process's devices hold and those it is the
    lowest-numbered process to hold (so that every row is counted once)."""
    shape = (n_micro, rows, 1)
    me = jax.process_index()
    fill = np.zeros((n_micro, rows), bool)
    owner = np.full((n_micro, rows), np.iinfo(np.int32).max)
    for device, index in sharding.devices_indices_map(shape).items():
        owner[index[:2]] = np.minimum(owner[index[:2]], device.process_index)
        if device.process_index == me:
            fill[index[:2]] = True
    return fill.reshape(-1), (owner == me).reshape(-1)


def describe(mesh: Mesh) -> str:
    shape = " x ".join(f"{name}={size}" for name, size in mesh.shape.items())
    kinds = sorted({d.device_kind for d in mesh.devices.flat})
    hosts = len({d.process_index for d in mesh.devices.flat})
    return f"{shape} over {mesh.devices.size} {'/'.join(kinds)} device(s) on {hosts} host(s)"
