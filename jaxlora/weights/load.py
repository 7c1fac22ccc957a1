"""Frozen weights and adapters onto the devices, from every source jaxlora reads.

Sources: random weights of a preset, a jaxlora checkpoint directory, a lit-llama `.pth`, a
Hugging Face directory, a litgpt directory; adapters from an adapters-only directory. Weights arrive in the layout
the model reads (`jaxlora.model.layouts`), each in its sharding, as they are read: no device
holds more than its shards.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import traverse_util
from jax.sharding import Mesh

from jaxlora.config import LLaMAConfig, LoRAConfig
from jaxlora.errors import CheckpointError, StateDictError
from jaxlora.model.layouts import abstract_variables, canonical, qkv_in_run_layout
from jaxlora.model.llama import STACKED, LLaMA
from jaxlora.parallel import sharding as shd
from jaxlora.weights import hf, hf_files, lit_llama, litgpt_files
from jaxlora.weights import jaxlora_dir as cio
from jaxlora.weights.convert import check_same_model
from jaxlora.weights.device import to_device
from jaxlora.weights.engine import release_freed_memory
from jaxlora.weights.hf_files import open_hf_base
from jaxlora.weights.lit_files import open_lit_base
from jaxlora.weights.quantized import load_quantized
from jaxlora.weights.torch_zip import TorchZipReader

PathLike = str | os.PathLike
Transform = Callable[[tuple[str, ...], jax.Array], Any]  # (run path, placed leaf) -> the leaf kept


def keep_leaf(path: tuple[str, ...], leaf: jax.Array) -> jax.Array:
    """The identity transform: keep each placed leaf as loaded."""
    return leaf


RANDOM_BASE = ("none", "random")  # --pretrained_path values meaning: random weights of --preset


def read_base_config(pretrained_path: str | None, preset: str | None) -> tuple[LLaMAConfig, str]:
    """The frozen model's architecture, without reading its weights: (config, kind), kind one
    of 'random', 'jaxlora', 'hf', 'lit', 'litgpt'. With `preset`, the weights must match it
    (errors name the file and key)."""

    preset_cfg = LLaMAConfig.from_name(preset) if preset else None
    if pretrained_path is None or str(pretrained_path).lower() in RANDOM_BASE:
        if preset_cfg is None:
            raise ValueError("random base weights need a preset (--preset)")
        return preset_cfg, "random"
    path = Path(pretrained_path)
    if litgpt_files.is_litgpt_dir(path):  # before HF: litgpt directories often keep HF's config.json too
        config = litgpt_files.read_litgpt_config(path)
        _check_preset(config, preset_cfg, preset, litgpt_files.config_file(path))
        return config, "litgpt"
    if path.is_dir() and not cio.is_jaxlora_checkpoint(path):
        if not hf_files.is_hf_dir(path):
            raise FileNotFoundError(f"--pretrained_path {path}: a directory but neither a jaxlora checkpoint "
                                    f"({cio.CONFIG_FILE} and {cio.PARAMS_DIR}/), a Hugging "
                                    "Face LLaMA directory (config.json and *.safetensors or pytorch_model*.bin) "
                                    "nor a litgpt one (lit_model.pth and model_config.yaml)")
        config = hf_files.read_hf_config(path)
        _check_preset(config, preset_cfg, preset, path / hf_files.HF_CONFIG)
        return config, "hf"
    if path.is_dir():
        config, _ = cio.read_config(path)
        _check_preset(config, preset_cfg, preset, path / cio.CONFIG_FILE)
        return config, "jaxlora"
    if not path.is_file():
        raise FileNotFoundError(f"--pretrained_path {path}: no such file or directory")
    with TorchZipReader(path) as reader:
        shapes = reader.shapes()
    if preset_cfg is None:
        return lit_llama.infer_config(shapes, str(path)), "lit"
    try:
        lit_llama.check_state_dict(shapes, lit_llama.base_maps(preset_cfg), preset_cfg.n_layer, str(path))
    except StateDictError as e:
        c = preset_cfg
        raise StateDictError(f"{e} -- the weights do not fit preset {preset!r} (n_layer={c.n_layer}, "
                                       f"n_embd={c.n_embd}, padded_vocab_size={c.padded_vocab_size}); check "
                                       "--preset") from e
    return preset_cfg, "lit"


def _check_preset(config: LLaMAConfig, preset_cfg: LLaMAConfig | None, preset: str | None, source: Path) -> None:
    # the preset fixes the shape; norm epsilon and RoPE base are the weights' own (HF LLaMA-1: eps 1e-6)
    if preset_cfg is not None and dataclasses.replace(config, norm_eps=preset_cfg.norm_eps,
                                                      rope_base=preset_cfg.rope_base) != preset_cfg:
        diffs = [f"{k}: checkpoint has {v}, preset {preset} has {getattr(preset_cfg, k)}"
                 for k, v in config.to_dict().items() if getattr(preset_cfg, k) != v]
        raise CheckpointError(f"{source}: does not match preset {preset!r} (" + "; ".join(diffs) + ")")


def open_base(kind: str, pretrained_path: PathLike, config: LLaMAConfig) -> Any:
    """The engine's reader of a base's frozen weights (`params` leaves, stored layout), a context
    manager: a jaxlora checkpoint's params/, or a lit-llama .pth / HF / litgpt directory through its mapping."""
    if kind == "jaxlora":
        return contextlib.nullcontext(cio.open_item(pretrained_path, cio.PARAMS_DIR)[2])
    opener = {"hf": open_hf_base, "lit": open_lit_base, "litgpt": litgpt_files.open_litgpt_base}[kind]
    return opener(pretrained_path, config)[1]


def load_params(model: LLaMA, kind: str, pretrained_path: str | None, seed: int, param_dtype: Any,
                shardings: Mapping[str, Any], transform: Transform | None = None) -> dict[str, Any]:
    """Frozen weights in the layout `model` reads (per-layer or stacked layers, q/k/v split
    or fused), each placed in `shardings` (that layout's) as it is read, through the engine's
    device sink: the host holds about one layer of one tensor whatever the source, and a
    stacked leaf is filled on the devices layer by layer (splitting after loading would need
    a second copy of the largest stacked leaf: 15 GiB per GPU for 65B over tensor=2). Pass
    `canonical(model)` and its shardings for the stored layout. transform(run path, array):
    applied to each leaf as soon as it is on the devices (quantization while loading: the float
    weights never exist whole). A quantized jaxlora checkpoint (`jaxlora.weights.quantized`)
    arrives as stored: its kernels quantized, never quantized again (transform is not applied
    to them; check the mode first with `quantized.check_mode`)."""
    if kind == "random":
        return random_params(model, seed, shardings, transform)
    release_freed_memory()  # freed layer buffers must go back to the OS, or the RSS creeps up
    stored = cio.read_quantized(pretrained_path) if kind == "jaxlora" else None
    with open_base(kind, pretrained_path, model.config) as reader:
        targets = traverse_util.flatten_dict(shardings)
        if stored is not None:
            placed = load_quantized(reader, model, targets, stored["mode"], param_dtype)
        else:
            placed = to_device(reader, model, targets, param_dtype, transform)
    return traverse_util.unflatten_dict(placed)


def base_quantization(kind: str, pretrained_path: str | None) -> dict[str, str] | None:
    """The "quantized" record of a quantized jaxlora checkpoint base ({"mode", "dtype"}), else None."""
    return cio.read_quantized(pretrained_path) if kind == "jaxlora" else None


def random_params(model: LLaMA, seed: int, shardings: Mapping[str, Any], transform: Transform | None = None
                  ) -> dict[str, Any]:
    """Random frozen weights (the model's init distributions: N(0, 0.02) kernels and embedding
    table, unit norm scales) made directly in the layout `model` reads (per-layer or stacked,
    q/k/v split or fused), each placed in `shardings` (that layout's) by its own program: no
    device ever holds more than its shards. (Drawing them stacked and splitting them after
    needs a second copy of the largest stacked leaf: 15 GiB per GPU at 65B over tensor=2.)

    Every layer's leaf comes from its own key (seed, leaf name, layer), so any layout, mesh
    or device count gets the same numbers. transform: as `load_params`'s."""
    transform = transform or keep_leaf
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
            out[path] = transform(path, jax.jit(lambda k, draw=draw: draw(k, 0), out_shardings=targets[path])(key))
        elif model.scan_layers:
            out[path] = transform(path, jax.jit(lambda k, draw=draw: jax.vmap(lambda i: draw(k, i))(jnp.arange(n)),
                                                out_shardings=targets[path])(key))
        else:
            one_layer = jax.jit(draw, out_shardings=targets[(f"{STACKED}_0",) + name])
            for i in range(n):
                out[(f"{STACKED}_{i}",) + name] = transform((f"{STACKED}_{i}",) + name, one_layer(key, i))
    return traverse_util.unflatten_dict(out)


def describe_base(kind: str, pretrained_path: str | None, preset: str | None, seed: int) -> str:
    return {"random": f"random {preset} weights (seed {seed})", "jaxlora": f"jaxlora checkpoint {pretrained_path}",
            "hf": f"Hugging Face model {pretrained_path}", "lit": f"lit-llama checkpoint {pretrained_path}",
            "litgpt": f"litgpt checkpoint {pretrained_path}"}[kind]


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


def load_adapters_dir(directory: PathLike, config: LLaMAConfig, base: str = "the base") -> tuple[LoRAConfig, dict]:
    """(lora_config, float32 adapters on the device) of an adapters-only directory, checked
    against the base's config."""
    directory = Path(directory)
    adapter_config, lora_config = cio.read_config(directory)
    check_same_model(config, adapter_config, directory, base, what="model size")
    if lora_config is None or not (directory / cio.LORA_DIR).is_dir():
        raise CheckpointError(f"{directory}: no adapters ({cio.CONFIG_FILE} 'lora' is null or no "
                                  f"{cio.LORA_DIR}/ directory)")
    reader = cio.ArrayTreeReader(directory / cio.LORA_DIR)
    stored = reader.shapes()
    cio.check_shapes({p: s for p, (s, _) in stored.items()}, cio.expected_variables(config, lora_config)["lora"],
                     str(directory / cio.LORA_DIR))
    return lora_config, traverse_util.unflatten_dict({p: jnp.asarray(reader.read(p), jnp.float32) for p in stored})


# The adapters `adapters_format` tells apart: format -> (what to call them, where their base is recorded)
ADAPTER_FORMATS = {"jaxlora": ("adapters", "config.json 'base'"),
                   "peft": ("PEFT adapters", "adapter_config.json 'base_model_name_or_path'"),
                   "litgpt": ("litgpt LoRA", "hyperparameters.yaml 'checkpoint_dir'")}


def adapters_format(directory: PathLike) -> str | None:
    """Which adapters a directory holds: "jaxlora" (an adapters-only directory: config.json and
    lora/), "peft" (adapter_config.json and adapter_model.*), "litgpt" (finetune/lora.py's
    lit_model.pth.lora and hyperparameters.yaml); None: none of these."""
    if cio.is_adapters_dir(directory):
        return "jaxlora"
    if hf_files.is_peft_dir(directory):
        return "peft"
    if litgpt_files.is_litgpt_lora_dir(directory):
        return "litgpt"
    return None


def adapters_base(directory: PathLike) -> str | None:
    """The base an adapters directory records, as written (config.json "base", PEFT's
    base_model_name_or_path, litgpt's hyperparameters.yaml checkpoint_dir); None when none."""
    kind = adapters_format(directory)
    if kind == "peft":
        return hf_files.peft_recorded_base(directory)
    if kind == "litgpt":
        return litgpt_files.lora_base(Path(directory))
    return cio.read_base(directory)


def adapters_config(directory: PathLike) -> LoRAConfig:
    """The LoRA settings (rank, alpha, targets) of an adapters directory of any `adapters_format`."""
    kind = adapters_format(directory)
    if kind == "peft":
        return hf.lora_from_peft(hf_files.read_peft_config(directory), str(Path(directory) / hf_files.PEFT_CONFIG))
    if kind == "litgpt":
        return litgpt_files.litgpt_lora_config(directory)
    lora_config = cio.read_config(directory)[1]
    if not cio.has_adapters(lora_config):
        raise CheckpointError(f"{directory}: no adapters ({cio.CONFIG_FILE} 'lora' is null or empty)")
    return lora_config


def load_adapters(directory: PathLike, config: LLaMAConfig, base: str = "the base") -> tuple[LoRAConfig, dict]:
    """(lora_config, float32 adapters on the device) of an adapters directory of any
    `adapters_format`, for the model `config` describes (adapters of another model are refused, named)."""
    kind = adapters_format(directory)
    if kind == "peft":
        lora_config, tree = hf_files.load_peft_adapters(directory, config)
    elif kind == "litgpt":
        lora_config, tree = litgpt_files.load_litgpt_lora(directory, config, base)
    else:
        return load_adapters_dir(directory, config, base)
    return lora_config, jax.tree.map(jnp.asarray, tree)


def sharding_for(shardings: Any, item: str, path: tuple) -> Any:
    if shardings is None:
        return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        return shardings
    node = shardings.get(item) if isinstance(shardings, Mapping) else None
    if isinstance(node, jax.sharding.Sharding):
        return node
    if node is None:
        return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    leaf = traverse_util.flatten_dict(dict(node)).get(path)
    if leaf is None:
        raise CheckpointError(f"shardings[{item!r}] has no entry for {'/'.join(path)}")
    return leaf


def load_checkpoint(directory: str | os.PathLike, param_dtype: Any = None, shardings: Any = None,
                    lora_dtype: Any = jnp.float32) -> tuple[LLaMAConfig, LoRAConfig | None, dict[str, Any]]:
    """Read a jaxlora checkpoint straight into device arrays: (config, lora_config, variables).

    variables = {"params": ..., "lora": ...} ("lora" only when the checkpoint has adapters).
    param_dtype: cast the frozen weights while reading (None keeps the stored dtype).
    lora_dtype: dtype of the adapters (default float32, the trainable dtype; None keeps stored).
    shardings: None (first local device), one jax Sharding for every array, or
    {"params": Sharding | tree of Shardings, "lora": ...}. Each array is placed straight into its
    sharding: every process reads only the slices its addressable shards need, one leaf at a
    time, so no host holds a whole model.
    """
    if cio.read_quantized(directory) is not None:
        raise CheckpointError(f"{directory}: a quantized checkpoint; load its weights in a model's layout with "
                              "load_params / load_base_model (they assemble its quantized kernels)")
    variables: dict[str, Any] = {}
    lora_config = None
    for item in cio.ITEMS:  # params first: its config says whether there are adapters
        if item == cio.LORA_DIR and not cio.has_adapters(lora_config):
            continue
        config, lora_config, reader = cio.open_item(directory, item)
        dtype = param_dtype if item == cio.PARAMS_DIR else lora_dtype
        targets = {p: sharding_for(shardings, item, p) for p in reader.shapes()}
        stored = LLaMA(config)  # stacked layers, fused q/k/v: the stored layout, read as is
        variables[item] = traverse_util.unflatten_dict(
            to_device(reader, stored, targets, None if dtype is None else jnp.dtype(dtype)))
    return config, lora_config, variables
