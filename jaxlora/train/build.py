"""One training run's compiled pieces, built once and shared by train.py, the benchmark and
the tests, so the step that is measured is the step that ships.

`build_run(spec, mesh)` (a `jaxlora.train.spec.RunSpec`) reads the base model's architecture, builds the model, puts the
frozen weights straight into their shards on `mesh` (random, a jaxlora checkpoint directory,
a lit-llama .pth or an HF directory, in the layout the model reads; no device holds more
than its shards), creates
the adapters and optimizer state sharded by the same rules table, and jits the train and
eval steps with explicit input and output shardings.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from jaxlora.config import LLaMAConfig, LoRAConfig
from jaxlora.errors import MeshError
from jaxlora.model.layouts import can_fuse_gate_up, fuse_gate_up, init_adapters, quantize_in_run_layout
from jaxlora.model.llama import LLaMA
from jaxlora.model.quantize import quantizes, with_forward_layouts
from jaxlora.parallel import sharding as shd
from jaxlora.train.optim import learning_rate_schedule, make_optimizer
from jaxlora.train.settings import PRECISIONS
from jaxlora.train.spec import RunSpec
from jaxlora.train.steps import (
    TrainState,
    init_train_state,
    make_eval_step,
    make_train_step,
)
from jaxlora.weights.load import (
    base_quantization,
    describe_base,
    load_adapters,
    load_params,
    read_base_config,
)
from jaxlora.weights.quantized import check_mode as check_quantized_mode
from jaxlora.weights.quantized import record

__all__ = ["Run", "RunShardings", "build_run", "state_shardings", "init_lora"]


@dataclass(frozen=True)
class RunShardings:
    """Where every array of a run lives: frozen weights (in the layout the model reads), the
    train state, (n_micro, rows, T) training batches and (rows, T) evaluation batches."""

    params: Any
    state: Any
    batch: NamedSharding
    eval_batch: NamedSharding
    replicated: NamedSharding


@dataclass
class Run:
    """A model with its weights and state on a mesh, and the jitted steps that train it."""

    config: LLaMAConfig
    lora_config: LoRAConfig
    model: LLaMA
    mesh: Mesh
    params: Any
    state: TrainState
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    train_step: Callable[[TrainState, Any, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]
    eval_step: Callable[[Any, Any, dict[str, jax.Array]], tuple[jax.Array, jax.Array]]
    shardings: RunShardings
    base_desc: str
    micro_rows: int  # rows of one micro-batch over the whole mesh
    quantized: dict[str, str] | None = None  # the frozen kernels' {"mode", "dtype"} (None: float)

    def batch(self, host: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """A training batch (n_micro, micro_rows, T) from host arrays onto the mesh (packed: with its
        segment_ids and positions)."""
        keys = [k for k in ("input_ids", "labels", "segment_ids", "positions") if k in host]
        return shd.host_to_global({k: host[k] for k in keys}, self.shardings.batch)

    def eval_batch(self, host: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """An evaluation batch (micro_rows, T) onto the mesh."""
        return shd.host_to_global({k: host[k] for k in ("input_ids", "labels")}, self.shardings.eval_batch)


def init_lora(model: LLaMA, seed: int) -> Any:
    """Fresh adapters for a run's seed (stacked layout)."""
    return init_adapters(model, jax.random.fold_in(jax.random.key(seed), 0x10A))


# ----------------------------------------------------------------------------- shardings

def initial_state(spec: RunSpec, model: LLaMA, optimizer: optax.GradientTransformation, shardings: Any,
                  base: str, log: Callable[[str], None]) -> TrainState:
    """The run's first state, in its shards: adapters from `spec.init_adapters` (read for this base,
    the same host arrays in every process) or fresh ones drawn from the seed; optimizer at zero."""
    def start(lora: Any) -> TrainState:
        return init_train_state(lora, optimizer, spec.seed, spec.speed.rng_impl)
    if not spec.init_adapters:
        return jax.jit(lambda: start(init_lora(model, spec.seed)), out_shardings=shardings)()
    lora_config, lora = load_adapters(spec.init_adapters, model.config, base)
    mine, theirs = spec.lora, lora_config
    if (mine.r, mine.alpha, mine.targets) != (theirs.r, theirs.alpha, theirs.targets):  # settings took theirs
        raise ValueError(f"--init_adapters {spec.init_adapters}: r={theirs.r}, alpha={theirs.alpha:g}, targets "
                         f"{','.join(theirs.targets)}; this run has r={mine.r}, alpha={mine.alpha:g}, targets "
                         f"{','.join(mine.targets)}")
    log(f"adapters: starting from {spec.init_adapters} (r={theirs.r}, alpha={theirs.alpha:g}, "
        f"{','.join(theirs.targets)})")
    return jax.jit(start, out_shardings=shardings)(jax.device_put(jax.device_get(lora), shardings.lora))


def state_shardings(optimizer: optax.GradientTransformation, lora_shardings: Any, mesh: Mesh) -> Any:
    """TrainState shardings: adapters as the rules say, each optimizer moment like its adapter,
    counters and the PRNG key replicated."""
    abstract_lora = jax.tree.map(lambda s: jax.ShapeDtypeStruct((), jnp.float32), lora_shardings)
    opt_state = jax.eval_shape(optimizer.init, abstract_lora)
    opt_shardings = optax.tree_map_params(optimizer, lambda _, s: s, opt_state, lora_shardings,
                                          transform_non_params=lambda _: shd.replicated(mesh))
    rep = shd.replicated(mesh)
    return TrainState(step=rep, lora=lora_shardings, opt_state=opt_shardings, rng=rep)


# ----------------------------------------------------------------------------- the builder

def fit_micro_batch(batch_size: int, micro_batch_size: int, shards: int, log: Callable[[str], None]) -> int:
    """Rows per batch shard per micro-batch: `micro_batch_size`, or the largest smaller one with
    which the mesh's micro-batches fill `batch_size` exactly (a 16-sample demo batch on 4 shards:
    4 rows each)."""
    if batch_size % shards:
        raise MeshError(f"batch_size {batch_size} does not divide over the mesh's {shards} batch shards "
                        "(data x fsdp)")
    micro = min(micro_batch_size, batch_size // shards)
    while (batch_size // shards) % micro:
        micro -= 1
    if micro != micro_batch_size:
        total = micro_batch_size * shards
        why = (f"= {total} > batch_size {batch_size}" if total > batch_size
               else f"= {total} does not divide batch_size {batch_size}")
        log(f"micro_batch_size: {micro_batch_size} rows per shard x {shards} shards {why}; using {micro}")
    return micro


def frozen_quantizer(mode: str, model: LLaMA) -> Callable[[tuple, Any], Any]:
    """The loading transform of `--quantize mode`: each dense kernel (not the LM head) quantized
    on its devices as soon as it is placed, in the layout `model` reads and sharded like the
    float kernel (`jaxlora.model.quantize.quantized_specs`), so the float weights never exist whole."""
    def quantize(path: tuple, leaf: Any) -> Any:
        return quantize_in_run_layout(model, path, leaf, mode) if quantizes(path, mode, head=False) else leaf
    return quantize


def build_run(spec: RunSpec, mesh: Mesh | None = None, max_steps: int | None = None,
              config: LLaMAConfig | None = None, log: Callable[[str], None] = lambda msg: None) -> Run:
    """Model, sharded weights and state, and jitted steps of run `spec` on `mesh`.

    mesh: None builds `spec.batch.mesh` (or the default layout) over every device.
    max_steps: the run's length (decaying schedules need it); config: an architecture to use
    instead of the base's (the benchmark's shallower variants; random weights only).
    """
    speed, layout = spec.speed, spec.batch
    compute_dtype, storage_dtype = PRECISIONS[speed.precision]
    base_config, kind = read_base_config(spec.base.path, spec.base.preset)
    if config is not None and kind != "random":
        raise ValueError("a config override needs random base weights (--pretrained_path none)")
    config = config or base_config
    if mesh is None:
        mesh = shd.mesh_from_spec(layout.mesh, config, jnp.dtype(storage_dtype).itemsize)
    if layout.max_seq_length > config.block_size:
        raise ValueError(f"max_seq_length {layout.max_seq_length} exceeds the model's block_size {config.block_size}")
    shd.check_mesh(mesh, config)
    micro = fit_micro_batch(layout.batch_size, layout.micro_batch_size, shd.batch_shards(mesh), log)
    micro_rows = micro * shd.batch_shards(mesh)

    model = LLaMA(config, spec.lora, dtype=compute_dtype, param_dtype=storage_dtype, lora_dtype=jnp.float32,
                  attention=speed.attention, remat=speed.remat, scan_layers=speed.scan_layers,
                  scan_unroll=min(speed.scan_unroll, config.n_layer),
                  mesh=mesh if mesh.devices.size > 1 else None, rules=shd.DEFAULT_RULES,
                  split_qkv=mesh.shape["tensor"] > 1,  # q/k/v split at head boundaries over tensor
                  fused_mlp=speed.fuse_mlp)
    stored = shd.variable_shardings(model, mesh)
    as_run = shd.variable_shardings(model, mesh, as_run=True)
    loading = model.clone(fused_mlp=False)  # weights arrive with gate and up apart, fused below
    quantized = speed.quantize != "none"
    stored_quantized = base_quantization(kind, spec.base.path)  # a quantized checkpoint serves its own mode
    check_quantized_mode(spec.base.path, stored_quantized, speed.quantize)
    if quantized:
        shd.check_quantized_mesh(loading, mesh, speed.quantize)
    params = load_params(loading, kind, spec.base.path, spec.seed, storage_dtype,
                         shd.variable_shardings(loading, mesh, as_run=True)["params"],
                         frozen_quantizer(speed.quantize, loading) if quantized else None)
    if speed.quantize == "fp8" and speed.fp8_both_layouts:
        params = with_forward_layouts(params)
    if speed.fuse_mlp:
        if not can_fuse_gate_up(params):
            raise ValueError(f"--fuse_mlp needs float, int8 or fp8 gate/up kernels, not --quantize {speed.quantize}")
        params = fuse_gate_up(params, as_run["params"])
    # quantized leaves lie where quantize_in_run_layout put them (sharded like their kernels)
    params_sh = jax.tree.map(lambda x: x.sharding, params) if quantized else as_run["params"]

    opt = spec.optimizer
    schedule = learning_rate_schedule(opt.learning_rate, opt.warmup_steps, opt.schedule,
                                      total_steps=max_steps if opt.schedule != "constant" else None)
    optimizer = make_optimizer(schedule, weight_decay=opt.weight_decay, grad_clip=opt.grad_clip or None)
    state_sh = state_shardings(optimizer, stored["lora"], mesh)
    base_desc = describe_base(kind, spec.base.path, spec.base.preset, spec.seed)
    state = initial_state(spec, model, optimizer, state_sh, base_desc, log)

    rep = shd.replicated(mesh)
    shardings = RunShardings(params=params_sh, state=state_sh, batch=shd.batch_sharding(mesh),
                             eval_batch=shd.eval_batch_sharding(mesh), replicated=rep)
    train_step = make_train_step(model, optimizer, chunk_tokens=speed.loss_chunk,
                                 shardings=(state_sh, shardings.params, shardings.batch, rep))
    eval_step = make_eval_step(model, chunk_tokens=speed.loss_chunk,
                               shardings=(state_sh.lora, shardings.params, shardings.eval_batch, rep))
    log(f"mesh: {shd.describe(mesh)}; micro-batch {micro} rows per batch shard "
        f"({micro_rows} over the mesh), {layout.batch_size // micro_rows} per optimizer step")
    return Run(config=config, lora_config=spec.lora, model=model, mesh=mesh, params=params, state=state,
               optimizer=optimizer, schedule=schedule, train_step=train_step, eval_step=eval_step,
               shardings=shardings, base_desc=base_desc,
               micro_rows=micro_rows,
               quantized=stored_quantized or (record(speed.quantize, storage_dtype) if quantized else None))
