"""Hugging Face model directories and PEFT adapter folders <-> jaxlora: the API behind
convert/from_hf.py, to_hf.py, to_peft.py, from_peft.py and train.py.

- `load_hf` / `is_hf_dir`: an HF LlamaForCausalLM directory straight into variables (train.py).
- `hf_to_checkpoint`: HF directory -> jaxlora checkpoint directory, one layer of one leaf at a time.
- `checkpoint_to_hf`: jaxlora checkpoint (adapters merged or not) -> HF directory, sharded safetensors.
- `save_peft_adapters` / `load_peft_adapters`: our adapters <-> PEFT's adapter_config.json +
  adapter_model.safetensors; `adapters_to_peft` / `peft_to_adapters` between directories.

Every output directory is written beside its target and renamed into place when complete.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np
from flax import traverse_util

from jaxlora.config import LLaMAConfig, LoRAConfig
from jaxlora.errors import CheckpointError, HFConfigError, StateDictError
from jaxlora.text.tokenizer import Tokenizer
from jaxlora.weights import hf, lit_llama
from jaxlora.weights import jaxlora_dir as cio
from jaxlora.weights.lit_files import cast_and_place
from jaxlora.weights.safetensors_io import (
    ADAPTER_BIN,
    ADAPTER_SAFETENSORS,
    open_weights,
    parse_size,
    save_sharded,
    tensor_sizes,
    weight_files,
)

HF_CONFIG = "config.json"
PEFT_CONFIG = "adapter_config.json"
# Buffers some HF checkpoints still carry; recomputed by every loader, not weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent}: no {path.name}; not {what}")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise HFConfigError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise HFConfigError(f"{path}: expected a JSON object")
    return data


def is_hf_dir(path: str | os.PathLike) -> bool:
    """True for a directory with an HF config.json (model_type/architectures) and weight files."""
    path = Path(path)
    try:
        config = json.loads((path / HF_CONFIG).read_text())
        weight_files(path)
    except (OSError, ValueError, StateDictError):
        return False
    return isinstance(config, dict) and ("model_type" in config or "architectures" in config)


def read_hf_config(hf_dir: str | os.PathLike) -> LLaMAConfig:
    """Our LLaMAConfig for an HF directory (HFConfigError names anything unsupported)."""
    path = Path(hf_dir) / HF_CONFIG
    return hf.config_from_hf(_read_json(path, "an HF model directory"), str(path))


def _model_shapes(reader: Any) -> dict[str, tuple[int, ...]]:
    return {k: s for k, s in reader.shapes().items() if not k.endswith(_IGNORED_SUFFIXES)}


def load_hf(hf_dir: str | os.PathLike, param_dtype: Any = None, config: LLaMAConfig | None = None,
            place: Callable[[np.ndarray, tuple[str, ...]], Any] | None = None,
            ) -> tuple[LLaMAConfig, None, dict[str, Any]]:
    """Read an HF LlamaForCausalLM directory into {"params": ...}, as `load_lit_llama` does a .pth.

    The shape comes from config.json unless `config` is given (the tensors must then fit it);
    either way config.json is checked for what we cannot reproduce (GQA, rope scaling, biases,
    ...). Tensors are read one at a time; each stacked leaf goes through `place` when complete
    (e.g. `jax.device_put`: the host holds one leaf at a time), else the leaves are numpy.
    Frozen weights keep the file's dtype unless `param_dtype` is given.
    """
    hf_config = read_hf_config(hf_dir)  # refuses what we cannot reproduce, even with `config` given
    config = config or hf_config
    with open_weights(hf_dir) as reader:
        params = lit_llama.read_tree(reader.read, _model_shapes(reader), hf.base_maps(config), config.n_layer,
                                     str(hf_dir), place=cast_and_place(param_dtype, place)).get("params", {})
    return config, None, {"params": params}


def _parse_dtype(dtype: Any) -> np.dtype | None:
    from jaxlora.weights.convert import parse_dtype
    return parse_dtype(dtype) if isinstance(dtype, str) or dtype is None else np.dtype(dtype)


def hf_to_checkpoint(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: Any = None,
                     overwrite: bool = False, progress: bool = True) -> tuple[LLaMAConfig, dict[str, float]]:
    """An HF LlamaForCausalLM directory -> a jaxlora checkpoint directory (no adapters).

    Everything is validated (config.json, keys, shapes, shards) before anything is written; then
    each layer of each of our leaves is assembled from its HF tensor(s) and written, so the host
    holds about one layer of one tensor (wte and lm_head go in blocks). dtype: storage dtype (None keeps the file's).
    Returns (config, stats).
    """
    from jaxlora.weights.convert import Progress
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass --overwrite to replace it")
    cast = _parse_dtype(dtype)
    config = read_hf_config(hf_dir)
    with open_weights(hf_dir) as reader:
        shapes, dtypes = _model_shapes(reader), reader.dtypes()
        maps = hf.base_maps(config)
        lit_llama.check_state_dict(shapes, maps, config.n_layer, str(hf_dir))
        expected = cio.expected_variables(config, None)[cio.PARAMS_DIR]
        groups = lit_llama.leaf_parts(maps)
        leaves = {g[0].path[1:]: (tuple(expected[g[0].path[1:]].shape), cast or dtypes[g[0].key(0)]) for g in groups}
        total = sum(n for _, n in tensor_sizes((k, shapes[k], dtypes[k]) for k in shapes))
        meter = Progress("from_hf", total, progress)
        with cio.staged_directory(out_dir, overwrite) as tmp:
            cio.write_config(tmp, config, None)
            with cio.ArrayTreeWriter(tmp / cio.PARAMS_DIR, leaves, max_pending_bytes=128 << 20) as writer:
                for parts in groups:
                    path, (shape, dt) = parts[0].path[1:], leaves[parts[0].path[1:]]
                    for i, where, rows in _pieces(parts, config.n_layer, shape, dt.itemsize):
                        read = reader.read if rows is None else (lambda key, rows=rows: reader.read(key, rows))
                        value = lit_llama.read_slice(read, parts, i).astype(dt, copy=False)
                        writer.write(path, value, where)
                        meter.update(parts[0].key(i), value.nbytes)
                        del value
    return config, meter.stats()


def _pieces(parts: list[lit_llama.TensorMap], n_layer: int, shape: tuple[int, ...], itemsize: int) -> list[tuple]:
    """(layer, where in our leaf, HF rows) of the pieces a leaf is written in: one per layer;
    wte and lm_head in row blocks of our chunks, so neither is ever whole in memory."""
    from jaxlora.weights.convert import _row_layout
    m = parts[0]
    if m.layered:
        return [(i, i, None) for i in range(n_layer)]
    layout = _row_layout(m) if len(parts) == 1 and not m.part else None
    if layout is None:
        return [(0, None, None)]
    chunks = cio.default_chunks(shape, itemsize, layered=False)
    step, rows = (chunks[0], shape[0]) if layout == "rows" else (chunks[1], shape[1])
    pieces = []
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        where = (slice(r0, r1), slice(None)) if layout == "rows" else (slice(None), slice(r0, r1))
        pieces.append((0, where, (r0, r1)))
    return pieces


def _hf_order(maps: list[lit_llama.TensorMap], n_layer: int) -> list[tuple[str, lit_llama.TensorMap, int | None]]:
    """(key, map, layer) in HF's order: embeddings, layer by layer, final norm, lm_head."""
    head = [(m.key(0), m, None) for m in maps if not m.layered and m.path[1] == "wte"]
    tail = [(m.key(0), m, None) for m in maps if not m.layered and m.path[1] != "wte"]
    layers = [(m.key(i), m, i) for i in range(n_layer) for m in maps if m.layered]
    return head + layers + tail


def _adapters_config(base: LLaMAConfig, adapters_dir: Path) -> LoRAConfig | None:
    config, lora_config = cio.read_config(adapters_dir)
    if config != base:
        diffs = "; ".join(f"{k}: adapters {v}, base {getattr(base, k)}"
                          for k, v in config.to_dict().items() if getattr(base, k) != v)
        raise CheckpointError(f"{adapters_dir}: adapters for another model ({diffs})")
    return lora_config


def _open_item(directory: Path, item: str, expected: Mapping) -> cio.ArrayTreeReader:
    where = directory / item
    if not where.is_dir():
        raise CheckpointError(f"{directory}: no {item}/ directory (incomplete checkpoint)")
    reader = cio.ArrayTreeReader(where)
    cio.check_shapes({p: s for p, (s, _) in reader.shapes().items()}, expected, str(where))
    return reader


def checkpoint_to_hf(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike,
                     adapters_dir: str | os.PathLike | None = None, merged: bool = False, dtype: Any = None,
                     max_shard_size: str | int = "2GB", overwrite: bool = False, progress: bool = True,
                     tokenizer_path: str | os.PathLike | None = None) -> Path:
    """A jaxlora checkpoint -> an HF LlamaForCausalLM directory (config.json + safetensors).

    merged: fold the adapters (the checkpoint's lora/, or `adapters_dir`'s) into the weights,
    one layer at a time (float32 sum, rounded once to the output dtype). dtype: output dtype
    (None keeps the stored one). Shards of at most `max_shard_size` (the host holds one shard)
    with model.safetensors.index.json, as transformers writes them. tokenizer_path: LLaMA's
    SentencePiece tokenizer.model, copied in with a tokenizer_config.json (AutoTokenizer loads it).
    """
    from jaxlora.weights.convert import Progress, _merge_layer
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass --overwrite to replace it")
    cast = _parse_dtype(dtype)
    tokenizer = None if tokenizer_path is None else Tokenizer(tokenizer_path)  # checked before any work
    directory = Path(checkpoint_dir).absolute()
    config, lora_config = cio.read_config(directory)
    lora_home = directory
    if adapters_dir is not None:
        lora_home = Path(adapters_dir).absolute()
        lora_config = _adapters_config(config, lora_home)
    if merged and not cio.has_adapters(lora_config):
        raise CheckpointError(f"{lora_home}: has no adapters to merge (config.json 'lora' is null)")
    expected = cio.expected_variables(config, lora_config if merged else None)
    params = _open_item(directory, cio.PARAMS_DIR, expected[cio.PARAMS_DIR])
    lora = _open_item(lora_home, cio.LORA_DIR, expected[cio.LORA_DIR]) if merged else None
    stored = params.shapes()
    order = _hf_order(hf.base_maps(config), config.n_layer)
    out_dtype = {key: cast or stored[m.path[1:]][1] for key, m, _ in order}
    located = {key: (m, i) for key, m, i in order}
    last: dict[tuple, np.ndarray] = {}  # the slice q, k and v are cut from: read once

    def our_slice(path: tuple[str, ...], where: int | None, dt: np.dtype) -> np.ndarray:
        if (path, where) not in last:
            last.clear()
            value = params.read(path, where).astype(dt, copy=False)
            a_path = path[:-1] + ("lora_A",)
            if lora is not None and a_path in expected[cio.LORA_DIR]:
                value = _merge_layer(value, lora.read(a_path, where), lora.read(path[:-1] + ("lora_B",), where),
                                     path[1:-1], lora_config)
            last[(path, where)] = value
        return last[(path, where)]

    def produce(key: str) -> np.ndarray:
        m, i = located[key]
        value = our_slice(m.path[1:], i, out_dtype[key])
        return m.to_lit(value[m.part]).astype(out_dtype[key], copy=False)

    sizes = tensor_sizes((key, m.lit_shape, out_dtype[key]) for key, m, _ in order)
    meter = Progress("to_hf", sum(n for _, n in sizes), progress)
    with cio.staged_directory(out_dir, overwrite) as tmp:
        dtype_name = np.dtype(out_dtype[order[0][0]]).name
        (tmp / HF_CONFIG).write_text(json.dumps(hf.config_to_hf(config, dtype_name), indent=2) + "\n")
        save_sharded(tmp, sizes, produce, parse_size(max_shard_size), progress=meter.update)
        if tokenizer is not None:
            _write_tokenizer(tokenizer, tmp)
    return out_dir


def _write_tokenizer(tokenizer: Tokenizer, directory: Path) -> None:
    """tokenizer.model and the tokenizer_config.json that makes HF's LlamaTokenizer encode as
    we do (BOS prepended, no EOS)."""
    shutil.copyfile(tokenizer.path, directory / "tokenizer.model")
    piece = tokenizer.processor.id_to_piece
    settings = {"tokenizer_class": "LlamaTokenizer", "bos_token": piece(tokenizer.bos_id),
                "eos_token": piece(tokenizer.eos_id), "unk_token": piece(tokenizer.processor.unk_id()),
                "add_bos_token": True, "add_eos_token": False, "legacy": True}
    (directory / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# PEFT


def save_peft_adapters(lora_tree: Any, config: LLaMAConfig, lora_config: LoRAConfig, out_dir: str | os.PathLike,
                       base_model_name_or_path: str | None = None, *, use_rslora: bool = False,
                       overwrite: bool = True) -> Path:
    """Write adapters as a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors,
    float32 as stored), atomically; `PeftModel.from_pretrained(hf_base, out_dir)` loads it.
    use_rslora: write PEFT's rsLoRA form (same scaling). Returns the directory."""
    from safetensors.numpy import save_file
    out_dir = Path(out_dir).absolute()
    if not cio.has_adapters(lora_config):
        raise CheckpointError(f"{out_dir}: no adapters to save (lora_config {lora_config})")
    maps = hf.peft_maps(config, lora_config)
    tensors = lit_llama.tree_to_lit({"lora": jax.device_get(lora_tree)}, maps, config.n_layer)
    lit_llama.check_state_dict({k: v.shape for k, v in tensors.items()}, maps, config.n_layer,
                               "adapters (for another model size?)")
    with cio.staged_directory(out_dir, overwrite) as tmp:
        settings = hf.peft_config(lora_config, base_model_name_or_path, use_rslora)
        (tmp / PEFT_CONFIG).write_text(json.dumps(settings, indent=2) + "\n")
        save_file(tensors, str(tmp / ADAPTER_SAFETENSORS), metadata={"format": "pt"})
    return out_dir


def read_peft_config(peft_dir: str | os.PathLike) -> dict[str, Any]:
    return _read_json(Path(peft_dir) / PEFT_CONFIG, "a PEFT adapter directory")


def load_peft_adapters(peft_dir: str | os.PathLike, config: LLaMAConfig) -> tuple[LoRAConfig, dict[str, Any]]:
    """A PEFT LoRA folder (safetensors or .bin) -> (our LoRAConfig, our `lora` tree, float32 numpy)
    for the model `config` describes; adapters of another shape raise StateDictError naming the key."""
    path = Path(peft_dir)
    lora_config = hf.lora_from_peft(read_peft_config(path), str(path / PEFT_CONFIG))
    with open_weights(path, (ADAPTER_SAFETENSORS, ADAPTER_BIN)) as reader:
        tree = lit_llama.read_tree(reader.read, reader.shapes(), hf.peft_maps(config, lora_config), config.n_layer,
                                   str(path), place=cast_and_place(np.float32, None)).get("lora", {})
    return lora_config, tree


def model_config_of(base: str | os.PathLike) -> LLaMAConfig:
    """The LLaMAConfig of a base given as an HF directory or a jaxlora checkpoint/adapters directory."""
    path = Path(base)
    if (path / HF_CONFIG).is_file() and "model" not in _read_json(path / HF_CONFIG, "a model directory"):
        return read_hf_config(path)
    if path.is_dir():
        return cio.read_config(path)[0]
    raise FileNotFoundError(f"{base}: no such directory; the base must be a local HF model directory or a "
                            "jaxlora checkpoint directory")


def peft_to_adapters(peft_dir: str | os.PathLike, out_dir: str | os.PathLike,
                     base: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """A PEFT LoRA folder -> a jaxlora adapters-only directory (config.json + lora/).

    base: the model the adapters belong to (an HF directory or a jaxlora checkpoint; default the
    adapter_config's base_model_name_or_path when that is a local directory); it gives the shape.
    """
    base = base or read_peft_config(peft_dir).get("base_model_name_or_path")
    if not base:
        raise HFConfigError(f"{Path(peft_dir) / PEFT_CONFIG}: no base_model_name_or_path; pass the base model "
                            "directory (--base)")
    config = model_config_of(base)
    lora_config, tree = load_peft_adapters(peft_dir, config)
    return cio.save_checkpoint(out_dir, config, lora_config, None, tree, overwrite=overwrite, base=str(base))


def adapters_to_peft(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike,
                     base_model_name_or_path: str | None = None, use_rslora: bool = False,
                     overwrite: bool = False) -> Path:
    """The adapters of a jaxlora checkpoint or adapters-only directory -> a PEFT LoRA folder.
    base_model_name_or_path: recorded in adapter_config.json; default the base recorded in the
    adapters directory when that is an HF model directory."""
    directory = Path(checkpoint_dir).absolute()
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass --overwrite to replace it")
    config, lora_config = cio.read_config(directory)
    if not cio.has_adapters(lora_config):
        raise CheckpointError(f"{directory}: has no adapters (config.json 'lora' is null)")
    reader = _open_item(directory, cio.LORA_DIR, cio.expected_variables(config, lora_config)[cio.LORA_DIR])
    tree = traverse_util.unflatten_dict({p: reader.read(p) for p in reader.paths})
    recorded = cio.read_base(directory)  # an HF base only: PEFT's loaders would try to load anything else
    if base_model_name_or_path is None and recorded and is_hf_dir(recorded):
        base_model_name_or_path = recorded
    return save_peft_adapters(tree, config, lora_config, out_dir, base_model_name_or_path,
                              use_rslora=use_rslora, overwrite=overwrite)
