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
from typing import Any, Callable

import jax
import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

from jaxlora.config import LLaMAConfig, LoRAConfig
from jaxlora.errors import CheckpointError, HFConfigError, StateDictError
from jaxlora.text.tokenizer import Tokenizer
from jaxlora.weights import hf, lit_llama
from jaxlora.weights import jaxlora_dir as cio
from jaxlora.weights.convert import check_new_output, checkpoint_view, open_checked, parse_dtype
from jaxlora.weights.engine import MappedReader, Progress, import_tree, read_leaves
from jaxlora.weights.engine import entry_bytes, export_entries, external_tensors
from jaxlora.weights.litgpt_files import is_litgpt_dir, read_litgpt_config
from jaxlora.weights.safetensors_io import (
    ADAPTER_BIN,
    ADAPTER_SAFETENSORS,
    open_weights,
    parse_size,
    save_sharded,
    weight_files,
)
from jaxlora.weights.torch_zip import TorchZipReader

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


def check_local_dir(path: str | os.PathLike, flag: str, what: str) -> None:
    """FileNotFoundError for a missing directory, saying so when it looks like a Hub id (only
    local directories are read: nothing is downloaded)."""
    p = Path(path)
    if p.is_dir():
        return
    if p.exists():
        raise NotADirectoryError(f"{flag} {path}: a file, not a directory; expected {what}")
    hub = len(str(path).split("/")) == 2 and not str(path).startswith((".", "/", "~"))
    hint = (f"; it looks like a Hugging Face Hub id, but only local directories are read: download it first "
            f"(e.g. huggingface-cli download {path} --local-dir DIR) and pass DIR") if hub else ""
    raise FileNotFoundError(f"{flag} {path}: no such directory{hint}")


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


def open_hf_base(hf_dir: str | os.PathLike, config: LLaMAConfig | None = None) -> tuple[LLaMAConfig, MappedReader]:
    """An HF LlamaForCausalLM directory as our `params` leaves (the engine's reader): (config,
    reader). config.json is checked for what we cannot reproduce (GQA, rope scaling, biases, ...)
    even when `config` is given (the tensors must then fit it)."""
    hf_config = read_hf_config(hf_dir)
    config = config or hf_config
    files = open_weights(hf_dir)
    try:
        expected = cio.expected_variables(config, None)[cio.PARAMS_DIR]
        return config, MappedReader(files, hf.base_maps(config), config.n_layer, expected, str(hf_dir),
                                    ignore=_IGNORED_SUFFIXES)
    except BaseException:
        files.close()
        raise


def load_hf(hf_dir: str | os.PathLike, param_dtype: Any = None, config: LLaMAConfig | None = None,
            place: Callable[[np.ndarray, tuple[str, ...]], Any] | None = None,
            ) -> tuple[LLaMAConfig, None, dict[str, Any]]:
    """Read an HF LlamaForCausalLM directory into {"params": ...} on the host, as `load_lit_llama`
    does a .pth (stacked leaves; devices: `jaxlora.weights.load.load_params`). Frozen weights
    keep the file's dtype unless `param_dtype` is given; each leaf goes through `place(leaf,
    path)` when given."""
    config, reader = open_hf_base(hf_dir, config)
    with reader:
        params = traverse_util.unflatten_dict(read_leaves(reader, parse_dtype(param_dtype), place))
    return config, None, {"params": params}


def hf_to_checkpoint(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: Any = None,
                     overwrite: bool = False, progress: bool = True) -> tuple[LLaMAConfig, dict[str, float]]:
    """An HF LlamaForCausalLM directory -> a jaxlora checkpoint directory (no adapters).

    Everything is validated (config.json, keys, shapes, shards) before anything is written; then
    the engine assembles each layer of each of our leaves from its HF tensor(s) and writes it, so
    the host holds about one layer of one tensor (wte and lm_head go in blocks). dtype: storage
    dtype (None keeps the file's). Returns (config, stats).
    """
    out_dir = check_new_output(out_dir, overwrite)
    check_local_dir(hf_dir, "--hf_dir", "an HF model directory")
    cast = parse_dtype(dtype)
    config, reader = open_hf_base(hf_dir)
    with reader:
        meter = Progress("from_hf", reader.nbytes(cast), progress)
        with cio.staged_directory(out_dir, overwrite) as tmp:
            cio.write_config(tmp, config, None)
            import_tree(tmp / cio.PARAMS_DIR, reader, cast, meter)
    return config, meter.stats()


def hf_order(entries: dict[str, Any]) -> dict[str, Any]:
    """HF's key order: embeddings, layer by layer (in table order), final norm, lm_head."""
    def rank(key: str) -> tuple:
        if key.startswith("model.layers."):
            return (1, int(key.split(".")[2]))
        return (0,) if key.startswith("model.embed_tokens") else (2,)
    return {k: entries[k] for k in sorted(entries, key=rank)}


def checkpoint_to_hf(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike,
                     adapters_dir: str | os.PathLike | None = None, merged: bool = False, dtype: Any = None,
                     max_shard_size: str | int = "2GB", overwrite: bool = False, progress: bool = True,
                     tokenizer_path: str | os.PathLike | None = None, merge_into: str = "trained",
                     log: Callable[[str], None] | None = None) -> Path:
    """A jaxlora checkpoint -> an HF LlamaForCausalLM directory (config.json + safetensors).

    merged: fold the adapters (the checkpoint's lora/, or `adapters_dir`'s) into the weights,
    one layer at a time (float32 sum, rounded once to the output dtype). dtype: output dtype
    (None keeps the stored one). Shards of at most `max_shard_size` (the host holds one shard)
    with model.safetensors.index.json, as transformers writes them. tokenizer_path: LLaMA's
    SentencePiece tokenizer.model, copied in with a tokenizer_config.json (AutoTokenizer loads it).
    merge_into, log: as `jaxlora.weights.convert.checkpoint_to_lit`'s (adapters trained on a
    quantized base; a quantized checkpoint is written dequantized).
    """
    out_dir = check_new_output(out_dir, overwrite)
    cast = parse_dtype(dtype)
    tokenizer = None if tokenizer_path is None else Tokenizer(tokenizer_path)  # checked before any work
    directory = Path(checkpoint_dir).absolute()
    view, config = checkpoint_view(directory, adapters_dir, merged, merge_into, log)
    maps = hf.base_maps(config)
    stored = view.params.shapes()
    dtypes = {key: cast or stored[m.path[1:]][1] for m in maps for key in m.keys(config.n_layer)}
    entries = export_entries(maps, config.n_layer, hf_order)
    sizes = [(e.key, entry_bytes(e, dtypes[e.key].itemsize)) for e in entries]
    meter = Progress("to_hf", sum(n for _, n in sizes), progress)
    with cio.staged_directory(out_dir, overwrite) as tmp:
        dtype_name = np.dtype(dtypes[entries[0].key]).name
        (tmp / HF_CONFIG).write_text(json.dumps(hf.config_to_hf(config, dtype_name), indent=2) + "\n")
        tensors = ((e.key, value) for e, value in external_tensors(view, entries, dtypes))
        save_sharded(tmp, sizes, tensors, parse_size(max_shard_size), progress=meter.update)
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


def is_peft_dir(path: str | os.PathLike) -> bool:
    """True for a PEFT adapter folder: adapter_config.json and adapter_model.safetensors (or .bin)."""
    path = Path(path)
    return (path.is_dir() and (path / PEFT_CONFIG).is_file()
            and any((path / name).is_file() for name in (ADAPTER_SAFETENSORS, ADAPTER_BIN)))


def peft_recorded_base(peft_dir: str | os.PathLike) -> str | None:
    """The base a PEFT folder records (base_model_name_or_path), as written: a local path, or a hub
    name ("meta-llama/Llama-3.1-8B") that cannot be read here; None when it records none."""
    return read_peft_config(peft_dir).get("base_model_name_or_path") or None


def load_peft_adapters(peft_dir: str | os.PathLike, config: LLaMAConfig) -> tuple[LoRAConfig, dict[str, Any]]:
    """A PEFT LoRA folder (safetensors or .bin) -> (our LoRAConfig, our `lora` tree, float32 numpy)
    for the model `config` describes; adapters of another shape raise StateDictError naming the key."""
    path = Path(peft_dir)
    lora_config = hf.lora_from_peft(read_peft_config(path), str(path / PEFT_CONFIG))
    expected = cio.expected_variables(config, lora_config)[cio.LORA_DIR]
    files = open_weights(path, (ADAPTER_SAFETENSORS, ADAPTER_BIN))
    with files, MappedReader(files, hf.peft_maps(config, lora_config), config.n_layer, expected, str(path)) as reader:
        tree = traverse_util.unflatten_dict(read_leaves(reader, np.float32))
    return lora_config, tree


def model_config_of(base: str | os.PathLike) -> LLaMAConfig:
    """The LLaMAConfig of a base given as an HF directory, a jaxlora checkpoint/adapters directory,
    a litgpt directory, or lit-llama's base .pth."""
    path = Path(base)
    if is_litgpt_dir(path):
        return read_litgpt_config(path)
    if path.is_file():
        with TorchZipReader(path) as reader:
            return lit_llama.infer_config(reader.shapes(), str(path))
    if (path / HF_CONFIG).is_file() and "model" not in _read_json(path / HF_CONFIG, "a model directory"):
        return read_hf_config(path)
    if path.is_dir():
        return cio.read_config(path)[0]
    check_local_dir(base, "base", "a local HF model directory, a jaxlora checkpoint directory or a lit-llama .pth")
    raise AssertionError("unreachable")  # check_local_dir raised


def peft_base_name(base: str | os.PathLike | None) -> str | None:
    """What a PEFT folder records as base_model_name_or_path for adapters trained on `base`: its
    absolute path when it is local (an HF or jaxlora directory, or lit-llama's .pth), so that
    convert/from_peft.py finds it again; None for random weights or a base that is not there."""
    if not base or not Path(base).exists():
        return None
    return str(Path(base).absolute())


def peft_to_adapters(peft_dir: str | os.PathLike, out_dir: str | os.PathLike,
                     base: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """A PEFT LoRA folder -> a jaxlora adapters-only directory (config.json + lora/).

    base: the model the adapters belong to (an HF directory or a jaxlora checkpoint; default the
    adapter_config's base_model_name_or_path when that is a local directory); it gives the shape.
    """
    base = base or peft_recorded_base(peft_dir)
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
    reader = open_checked(directory, cio.LORA_DIR, cio.expected_variables(config, lora_config)[cio.LORA_DIR])
    tree = traverse_util.unflatten_dict({p: reader.read(p) for p in reader.paths})
    if base_model_name_or_path is None:
        base_model_name_or_path = peft_base_name(cio.read_base(directory))
    return save_peft_adapters(tree, config, lora_config, out_dir, base_model_name_or_path,
                              use_rslora=use_rslora, overwrite=overwrite)
