"""One training run's compiled pieces, built once and shared by train.py, the benchmark and
the tests, so the step that is measured is the step that ships.

`build_run(args, mesh)` reads the base model's architecture, builds the model, puts the
frozen weights straight into their shards on `mesh` (random, a jaxlora checkpoint directory,
a lit-llama .pth or an HF directory, in the layout the model reads; no device holds more
than its shards), creates
the adapters and optimizer state sharded by the same rules table, and jits the train and
eval steps with explicit input and output shardings.
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding

from jaxlora import sharding as shd
from jaxlora.config import LLaMAConfig, LoRAConfig
from jaxlora.model import (STACKED, LLaMA, abstract_variables, canonical, init_adapters, qkv_in_run_layout,
                           splits_qkv)
from jaxlora.optim import learning_rate_schedule, make_optimizer
from jaxlora.settings import PRECISIONS, RANDOM_BASE, TrainArgs
from jaxlora.steps import TrainState, init_train_state, make_eval_step, make_train_step

__all__ = ["Run", "RunShardings", "build_run", "read_base_config", "state_shardings", "init_lora"]


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

    def batch(self, host: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """A training batch (n_micro, micro_rows, T) from host arrays onto the mesh."""
        return shd.host_to_global({k: host[k] for k in ("input_ids", "labels")}, self.shardings.batch)

    def eval_batch(self, host: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """An evaluation batch (micro_rows, T) onto the mesh."""
        return shd.host_to_global({k: host[k] for k in ("input_ids", "labels")}, self.shardings.eval_batch)


def init_lora(model: LLaMA, seed: int) -> Any:
    """Fresh adapters for a run's seed (stacked layout)."""
    return init_adapters(model, jax.random.fold_in(jax.random.key(seed), 0x10A))


# ----------------------------------------------------------------------------- the base model

def read_base_config(pretrained_path: str | None, preset: str | None) -> tuple[LLaMAConfig, str]:
    """The frozen model's architecture, without reading its weights: (config, kind), kind one
    of 'random', 'jaxlora', 'hf', 'lit'. With `preset`, the weights must match it (errors name
    the file and key)."""
    from jaxlora import checkpoint_io
    from jaxlora.formats import lit_llama
    from jaxlora.formats.torch_stream import TorchZipReader

    preset_cfg = LLaMAConfig.from_name(preset) if preset else None
    if pretrained_path is None or str(pretrained_path).lower() in RANDOM_BASE:
        if preset_cfg is None:
            raise ValueError("random base weights need a preset (--preset)")
        return preset_cfg, "random"
    path = Path(pretrained_path)
    if path.is_dir() and not checkpoint_io.is_jaxlora_checkpoint(path):
        from jaxlora.formats import hf_files
        if not hf_files.is_hf_dir(path):
            raise FileNotFoundError(f"--pretrained_path {path}: a directory but neither a jaxlora checkpoint "
                                    f"({checkpoint_io.CONFIG_FILE} and {checkpoint_io.PARAMS_DIR}/) nor a Hugging "
                                    "Face LLaMA directory (config.json and *.safetensors or pytorch_model*.bin)")
        config = hf_files.read_hf_config(path)
        _check_preset(config, preset_cfg, preset, path / hf_files.HF_CONFIG)
        return config, "hf"
    if path.is_dir():
        config, _ = checkpoint_io.read_config(path)
        _check_preset(config, preset_cfg, preset, path / checkpoint_io.CONFIG_FILE)
        return config, "jaxlora"
    if not path.is_file():
        raise FileNotFoundError(f"--pretrained_path {path}: no such file or directory")
    with TorchZipReader(path) as reader:
        shapes = reader.shapes()
    if preset_cfg is None:
        return lit_llama.infer_config(shapes, str(path)), "lit"
    try:
        lit_llama.check_state_dict(shapes, lit_llama.base_maps(preset_cfg), preset_cfg.n_layer, str(path))
    except lit_llama.StateDictError as e:
        c = preset_cfg
        raise lit_llama.StateDictError(f"{e} -- the weights do not fit preset {preset!r} (n_layer={c.n_layer}, "
                                       f"n_embd={c.n_embd}, padded_vocab_size={c.padded_vocab_size}); check "
                                       "--preset") from e
    return preset_cfg, "lit"


def _check_preset(config: LLaMAConfig, preset_cfg: LLaMAConfig | None, preset: str | None, source: Path) -> None:
    from jaxlora.errors import CheckpointError
    # the preset fixes the shape; norm epsilon and RoPE base are the weights' own (HF LLaMA-1: eps 1e-6)
    if preset_cfg is not None and dataclasses.replace(config, norm_eps=preset_cfg.norm_eps,
                                                      rope_base=preset_cfg.rope_base) != preset_cfg:
        diffs = [f"{k}: checkpoint has {v}, preset {preset} has {getattr(preset_cfg, k)}"
                 for k, v in config.to_dict().items() if getattr(preset_cfg, k) != v]
        raise CheckpointError(f"{source}: does not match preset {preset!r} (" + "; ".join(diffs) + ")")


def load_params(model: LLaMA, kind: str, pretrained_path: str | None, seed: int, param_dtype: Any,
                shardings: Mapping[str, Any]) -> dict[str, Any]:
    """Frozen weights in the layout `model` reads (per-layer or stacked layers, q/k/v split
    or fused), each placed in `shardings` (that layout's) as it is read: a checkpoint's stacked
    leaf goes to the devices layer by layer, so no device holds more than its shards (splitting
    after loading would need a second copy of the largest stacked leaf: 15 GiB per GPU for 65B
    over tensor=2). Pass `canonical(model)` and its shardings for the stored layout."""
    if kind == "random":
        return random_params(model, seed, shardings)
    targets = traverse_util.flatten_dict(shardings)
    placed = {}
    if kind == "jaxlora":
        from jaxlora import checkpoint_io
        _, _, reader = checkpoint_io.open_item(pretrained_path, checkpoint_io.PARAMS_DIR)
        for path, (shape, _) in reader.shapes().items():
            for run_path, layer in run_layout_pieces(model, path):
                placed[run_path] = _read_in_run_layout(model, reader, path, shape, layer, targets[run_path],
                                                       param_dtype)
        return traverse_util.unflatten_dict(placed)
    from jaxlora.formats.hf_files import load_hf
    from jaxlora.formats.lit_files import load_lit_llama

    def place(leaf: np.ndarray, path: tuple) -> None:  # a whole stacked leaf on the host, read from the file
        for run_path, layer in run_layout_pieces(model, path):
            piece = leaf if layer is None else leaf[layer]
            placed[run_path] = jax.device_put(qkv_in_run_layout(model, path, piece), targets[run_path])

    load = load_hf if kind == "hf" else load_lit_llama
    load(pretrained_path, param_dtype=param_dtype, config=model.config, place=place)
    return traverse_util.unflatten_dict(placed)


def run_layout_pieces(model: LLaMA, path: tuple) -> list[tuple[tuple, int | None]]:
    """Where a stored leaf (stacked layers, fused q/k/v) goes in `model`'s layout:
    [(path there, layer taken from the stacked leaf or None for all of it)]."""
    if path[0] != STACKED or model.scan_layers:
        return [(path, None)]
    return [((f"{STACKED}_{i}",) + path[1:], i) for i in range(model.config.n_layer)]


def _read_in_run_layout(model: LLaMA, reader: Any, path: tuple, shape: tuple, layer: int | None, sharding: Any,
                        dtype: Any) -> jax.Array:
    """A stored leaf (or one layer of it) read straight into `sharding` in `model`'s layout:
    each process reads only the regions its devices hold, each distinct region once (with
    split q/k/v, (.., C, 3, C) regions of the stored (.., C, 3C) leaf: one read per q/k/v part)."""
    lead = () if layer is None else (layer,)
    shape, C = shape[len(lead):], model.config.n_embd
    split = splits_qkv(model, path)
    run_shape = (*shape[:-1], 3, C) if split else shape
    read: dict[tuple, np.ndarray] = {}  # replicas of a region are read once

    def region(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in read:
            read[key] = _read_region(index)
        return read[key]

    def _read_region(index: tuple[slice, ...]) -> np.ndarray:
        if split:
            *rest, parts, cols = index
            start, stop, _ = cols.indices(C)
            value = np.stack([reader.read(path, lead + tuple(rest) + (slice(g * C + start, g * C + stop),))
                              for g in range(*parts.indices(3))], axis=-2)
        else:
            value = reader.read(path, lead + tuple(index))
        return value if dtype is None else value.astype(dtype, copy=False)
    return jax.make_array_from_callback(run_shape, sharding, region)


def random_params(model: LLaMA, seed: int, shardings: Mapping[str, Any]) -> dict[str, Any]:
    """Random frozen weights (the model's init distributions: N(0, 0.02) kernels and embedding
    table, unit norm scales) made directly in the layout `model` reads (per-layer or stacked,
    q/k/v split or fused), each placed in `shardings` (that layout's) by its own program: no
    device ever holds more than its shards. (Drawing them stacked and splitting them after
    needs a second copy of the largest stacked leaf: 15 GiB per GPU at 65B over tensor=2.)

    Every layer's leaf comes from its own key (seed, leaf name, layer), so any layout, mesh
    or device count gets the same numbers."""
    abstract = traverse_util.flatten_dict(abstract_variables(canonical(model))["params"])  # stacked, fused q/k/v
    targets = traverse_util.flatten_dict(shardings)
    n = model.config.n_layer
    out = {}
    for path, leaf in abstract.items():
        stacked = path[0] == STACKED
        shape, name = (leaf.shape[1:], path[1:]) if stacked else (leaf.shape, path)
        key = jax.random.fold_in(jax.random.key(seed), zlib.crc32("/".join(name).encode()))

        def draw(key: jax.Array, layer: Any, shape: tuple = shape, path: tuple = path, dtype: Any = leaf.dtype
                 ) -> jax.Array:
            if path[-1] == "scale":  # RMSNorm
                return jnp.ones(shape, dtype)
            x = 0.02 * jax.random.normal(jax.random.fold_in(key, layer), shape, jnp.float32)
            return qkv_in_run_layout(model, path, x.astype(dtype))

        if not stacked:
            out[path] = jax.jit(lambda k, draw=draw: draw(k, 0), out_shardings=targets[path])(key)
        elif model.scan_layers:
            out[path] = jax.jit(lambda k, draw=draw: jax.vmap(lambda i: draw(k, i))(jnp.arange(n)),
                                out_shardings=targets[path])(key)
        else:
            one_layer = jax.jit(draw, out_shardings=targets[(f"{STACKED}_0",) + name])
            for i in range(n):
                out[(f"{STACKED}_{i}",) + name] = one_layer(key, i)
    return traverse_util.unflatten_dict(out)


def describe_base(kind: str, pretrained_path: str | None, preset: str | None, seed: int) -> str:
    return {"random": f"random {preset} weights (seed {seed})", "jaxlora": f"jaxlora checkpoint {pretrained_path}",
            "hf": f"Hugging Face model {pretrained_path}", "lit": f"lit-llama checkpoint {pretrained_path}"}[kind]


def load_base_model(pretrained_path: str | None, preset: str | None, param_dtype: Any, seed: int = 0,
                    mesh: Mesh | None = None, scan_layers: bool = True) -> tuple[LLaMAConfig, Any, str]:
    """The frozen weights alone, e.g. for generation: (config, params, description).
    pretrained_path as for `train.py` (a jaxlora checkpoint directory, a lit-llama .pth, an HF
    directory, or "none"/"random" with `preset`); with `preset` the weights must match it.
    Placed by the rules over `mesh` as they are read (default: the first device), in the
    layout a model with `scan_layers` reads (stacked layers, or one array per layer)."""
    config, kind = read_base_config(pretrained_path, preset)
    mesh = mesh or shd.make_mesh(data=1)
    model = LLaMA(config, param_dtype=param_dtype, scan_layers=scan_layers)  # fused q/k/v, as stored
    shardings = shd.variable_shardings(model, mesh, as_run=True)["params"]
    params = load_params(model, kind, pretrained_path, seed, param_dtype, shardings)
    return config, params, describe_base(kind, pretrained_path, preset, seed)


# ----------------------------------------------------------------------------- shardings

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
        raise shd.MeshError(f"batch_size {batch_size} does not divide over the mesh's {shards} batch shards "
                            "(data x fsdp)")
    micro = min(micro_batch_size, batch_size // shards)
    while (batch_size // shards) % micro:
        micro -= 1
    if micro != micro_batch_size:
        log(f"micro_batch_size {micro_batch_size} per batch shard x {shards} shards does not fill batch_size "
            f"{batch_size}; using {micro}")
    return micro

def build_run(a: TrainArgs, mesh: Mesh | None = None, max_steps: int | None = None, config: LLaMAConfig | None = None,
              log: Callable[[str], None] = lambda msg: None) -> Run:
    """Model, sharded weights and state, and jitted steps for resolved settings `a` on `mesh`.

    mesh: None builds `a.mesh` (or the default layout) over every device.
    max_steps: the run's length (decaying schedules need it); config: an architecture to use
    instead of the base's (the benchmark's shallower variants; random weights only).
    """
    compute_dtype, storage_dtype = PRECISIONS[a.precision]
    base_config, kind = read_base_config(a.pretrained_path, a.preset)
    if config is not None and kind != "random":
        raise ValueError("a config override needs random base weights (--pretrained_path none)")
    config = config or base_config
    if mesh is None:
        mesh = shd.mesh_from_spec(a.mesh, config, jnp.dtype(storage_dtype).itemsize)
    if a.max_seq_length > config.block_size:
        raise ValueError(f"max_seq_length {a.max_seq_length} exceeds the model's block_size {config.block_size}")
    shd.check_mesh(mesh, config)
    micro = fit_micro_batch(a.batch_size, a.micro_batch_size, shd.batch_shards(mesh), log)
    micro_rows = micro * shd.batch_shards(mesh)

    lora_config = LoRAConfig(r=a.lora_r, alpha=a.lora_alpha, dropout=a.lora_dropout, targets=a.lora_targets)
    model = LLaMA(config, lora_config, dtype=compute_dtype, param_dtype=storage_dtype, lora_dtype=jnp.float32,
                  attention=a.attention, remat=a.remat, scan_layers=a.scan_layers,
                  scan_unroll=min(a.scan_unroll, config.n_layer),
                  mesh=mesh if mesh.devices.size > 1 else None, rules=shd.DEFAULT_RULES,
                  split_qkv=mesh.shape["tensor"] > 1)  # q/k/v split at head boundaries over tensor
    stored = shd.variable_shardings(model, mesh)
    as_run = shd.variable_shardings(model, mesh, as_run=True)

    params = load_params(model, kind, a.pretrained_path, a.seed, storage_dtype, as_run["params"])
    base_desc = describe_base(kind, a.pretrained_path, a.preset, a.seed)

    schedule = learning_rate_schedule(a.learning_rate, a.warmup_steps, a.schedule,
                                      total_steps=max_steps if a.schedule != "constant" else None)
    optimizer = make_optimizer(schedule, weight_decay=a.weight_decay, grad_clip=a.grad_clip or None)
    state_sh = state_shardings(optimizer, stored["lora"], mesh)
    init_state = jax.jit(lambda: init_train_state(init_lora(model, a.seed), optimizer, a.seed, a.rng_impl),
                         out_shardings=state_sh)
    state = init_state()

    rep = shd.replicated(mesh)
    shardings = RunShardings(params=as_run["params"], state=state_sh, batch=shd.batch_sharding(mesh),
                             eval_batch=shd.eval_batch_sharding(mesh), replicated=rep)
    train_step = make_train_step(model, optimizer, chunk_tokens=a.loss_chunk,
                                 shardings=(state_sh, shardings.params, shardings.batch, rep))
    eval_step = make_eval_step(model, chunk_tokens=a.loss_chunk,
                               shardings=(state_sh.lora, shardings.params, shardings.eval_batch, rep))
    log(f"mesh: {shd.describe(mesh)}; micro-batch {micro} rows per batch shard "
        f"({micro_rows} over the mesh), {a.batch_size // micro_rows} per optimizer step")
    return Run(config=config, lora_config=lora_config, model=model, mesh=mesh, params=params, state=state,
               optimizer=optimizer, schedule=schedule, train_step=train_step, eval_step=eval_step,
               shardings=shardings, base_desc=base_desc, micro_rows=micro_rows)


# Dense bf16 peak of one device, for MFU (datasheet numbers; None where unknown, e.g. CPUs).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L4": 121.0, "TPU v4": 275.0,
               "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v6 lite": 918.0}


def peak_flops(device_kind: str) -> float | None:
    """FLOP/s of one device of this kind (the longest matching name in PEAK_TFLOPS)."""
    hits = [k for k in PEAK_TFLOPS if k.lower() in device_kind.lower()]
    return PEAK_TFLOPS[max(hits, key=len)] * 1e12 if hits else None


def flops_per_token(config: LLaMAConfig, seq_len: int) -> float:
    """Training FLOPs per token of a LoRA step (adapter matmuls ignored: < 0.3% at r=8):

    4 * N_dense              frozen matmuls: forward 2N, input gradients 2N (no weight
                             gradients); N_dense = all parameters but the embedding table
    + 6 * n_layer * T * C    attention scores and values: forward 4*T*C per layer, halved
                             for causality, x3 for forward + backward
    """
    n_dense = config.num_params() - config.padded_vocab_size * config.n_embd
    return 4 * n_dense + 6 * config.n_layer * seq_len * config.n_embd


def weight_bytes(config: LLaMAConfig, precision: str) -> int:
    """Bytes of the frozen weights in the run's storage dtype."""
    return config.num_params() * jnp.dtype(PRECISIONS[precision][1]).itemsize


def estimate_device_bytes(config: LLaMAConfig, lora: LoRAConfig, precision: str, mesh: Mesh, micro_rows: int,
                          seq: int, remat: str) -> int:
    """A rough per-device memory need: the weight shards, adapters with AdamW state, and the
    activations kept for the backward pass (what the H100 measurements in docs/benchmarks.md
    show within ~20%)."""
    weight_shards = mesh.shape["fsdp"] * mesh.shape["tensor"]
    rows = micro_rows // shd.batch_shards(mesh)
    itemsize = jnp.dtype(PRECISIONS[precision][0]).itemsize
    per_token_layer = {"none": 24, "dots": 12, "dots_no_batch": 10, "full": 1}.get(remat, 24)
    act = rows * seq * config.n_layer * config.n_embd * itemsize * per_token_layer // max(mesh.shape["tensor"], 1)
    logits = rows * seq * config.padded_vocab_size * 4 * 2 // max(mesh.shape["tensor"], 1)
    return math.ceil(weight_bytes(config, precision) / weight_shards) + 16 * lora.num_params(config) + act + logits
