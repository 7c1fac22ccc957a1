"""litgpt checkpoint directories <-> jaxlora: the API behind convert/from_litgpt.py,
convert/to_litgpt.py and train.py / generate.py's --pretrained_path.

A litgpt model directory holds `lit_model.pth` (a flat state dict, or {"model": ...} from its
training scripts) and `model_config.yaml` (lit-gpt's older `lit_config.json`), usually with the
tokenizer files. A litgpt LoRA directory (finetune/lora.py's out_dir/final) holds
`lit_model.pth.lora` ({"model": the lora_A/lora_B tensors}), `hyperparameters.yaml` (lora_r,
lora_alpha, which modules carry adapters, the base's checkpoint_dir) and the base's
model_config.yaml and tokenizer files.

- `is_litgpt_dir` / `read_litgpt_config` / `open_litgpt_base`: a model directory as the engine's
  reader (what train.py and generate.py load).
- `litgpt_to_checkpoint`: model directory (+ LoRA directory) -> jaxlora checkpoint; a LoRA
  directory alone -> an adapters-only directory that records its base.
- `checkpoint_to_litgpt`: jaxlora checkpoint (adapters merged or not) -> litgpt model directory.
- `adapters_to_litgpt`: jaxlora adapters -> litgpt LoRA directory (litgpt chat / merge_lora use it).

Tensors stream through the engine (one layer of one tensor at a time); every output is
written beside its target and renamed into place when complete.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import yaml
from flax import traverse_util

from jaxlora.config import LLaMAConfig, LoRAConfig
from jaxlora.errors import CheckpointError, LitgptConfigError, StateDictError
from jaxlora.text.tokenizer import (
    CHAT_TEMPLATE_FILE,
    GENERATION_CONFIG,
    SENTENCEPIECE_MODEL,
    TOKENIZER_CONFIG,
    TOKENIZER_JSON,
)
from jaxlora.weights import jaxlora_dir as cio
from jaxlora.weights import litgpt
from jaxlora.weights.convert import (
    check_new_output,
    check_same_model,
    checkpoint_view,
    export_torch_zip,
    open_checked,
    parse_dtype,
)
from jaxlora.weights.engine import MappedReader, MergedView, Progress, import_tree, read_leaves
from jaxlora.weights.torch_zip import TorchZipReader

# What travels with the weights both ways (never HF's config.json: a jaxlora directory has its own).
TOKENIZER_FILES = (TOKENIZER_JSON, SENTENCEPIECE_MODEL, TOKENIZER_CONFIG, GENERATION_CONFIG, CHAT_TEMPLATE_FILE)
PRECISIONS = {np.dtype(np.float32): "32-true", np.dtype(ml_dtypes.bfloat16): "bf16-true",
              np.dtype(np.float16): "16-true"}  # litgpt's --precision for a dtype (merge_lora reads it)


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML (or JSON) mapping; LitgptConfigError naming the file when it is not one."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise LitgptConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise LitgptConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data


def config_file(directory: str | os.PathLike) -> Path:
    """The litgpt model config of a directory (model_config.yaml, else lit-gpt's lit_config.json)."""
    for name in (litgpt.MODEL_CONFIG, litgpt.LEGACY_CONFIG):
        if (Path(directory) / name).is_file():
            return Path(directory) / name
    raise FileNotFoundError(f"{directory}: no {litgpt.MODEL_CONFIG} (nor lit-gpt's {litgpt.LEGACY_CONFIG}); "
                            "not a litgpt checkpoint directory")


def is_litgpt_dir(path: str | os.PathLike) -> bool:
    """True for a directory with lit_model.pth and model_config.yaml (or lit_config.json)."""
    path = Path(path)
    return path.is_dir() and (path / litgpt.BASE_FILE).is_file() and any(
        (path / n).is_file() for n in (litgpt.MODEL_CONFIG, litgpt.LEGACY_CONFIG))


def is_litgpt_lora_dir(path: str | os.PathLike) -> bool:
    """True for what litgpt's finetune/lora.py leaves: lit_model.pth.lora and hyperparameters.yaml."""
    path = Path(path)
    return path.is_dir() and (path / litgpt.LORA_FILE).is_file() and (path / litgpt.HYPERPARAMETERS).is_file()


def litgpt_lora_config(lora_dir: str | os.PathLike) -> LoRAConfig:
    """The LoRA settings in a litgpt LoRA directory's hyperparameters.yaml."""
    hparams = Path(lora_dir) / litgpt.HYPERPARAMETERS
    return litgpt.lora_from_litgpt(read_yaml(hparams), str(hparams))


def load_litgpt_lora(lora_dir: str | os.PathLike, config: LLaMAConfig, base: str = "the base"
                     ) -> tuple[LoRAConfig, dict[str, Any]]:
    """A litgpt LoRA directory's adapters for the model `config` describes: (LoRAConfig, our
    `lora` tree, float32 numpy); a LoRA made for another model is refused, named."""
    check_same_model(config, read_litgpt_config(lora_dir), Path(lora_dir), base)
    lora_config, reader = open_litgpt_lora(lora_dir, config)
    with reader:
        return lora_config, traverse_util.unflatten_dict(read_leaves(reader, np.float32))


def read_litgpt_config(directory: str | os.PathLike) -> LLaMAConfig:
    """Our LLaMAConfig for a litgpt directory (LitgptConfigError names anything not LLaMA-style)."""
    path = config_file(directory)
    return litgpt.config_from_litgpt(read_yaml(path), str(path))


def open_litgpt_base(directory: str | os.PathLike, config: LLaMAConfig | None = None
                     ) -> tuple[LLaMAConfig, MappedReader]:
    """A litgpt model directory's lit_model.pth as our `params` leaves (the engine's reader):
    (config, reader). Keys and shapes are checked first; lit-gpt's interleaved attn.attn.weight
    is read as well as attn.qkv.weight."""
    config = config or read_litgpt_config(directory)
    path = Path(directory) / litgpt.BASE_FILE
    file = TorchZipReader(path)
    try:
        legacy = any(k.endswith(f".{litgpt.LEGACY_QKV}.weight") for k in file.shapes())
        expected = cio.expected_variables(config, None)[cio.PARAMS_DIR]
        return config, MappedReader(file, litgpt.base_maps(config, legacy), config.n_layer, expected, str(path))
    except BaseException:
        file.close()
        raise


def open_litgpt_lora(lora_dir: str | os.PathLike, config: LLaMAConfig) -> tuple[LoRAConfig, MappedReader]:
    """A litgpt LoRA directory's adapters as our `lora` leaves: (LoRAConfig from its
    hyperparameters.yaml, reader of lit_model.pth.lora). Shapes are checked against `config`."""
    lora_dir = Path(lora_dir)
    hparams = lora_dir / litgpt.HYPERPARAMETERS
    if not hparams.is_file():
        raise FileNotFoundError(f"{lora_dir}: no {litgpt.HYPERPARAMETERS}; litgpt's finetune/lora.py writes it beside "
                                f"{litgpt.LORA_FILE} (it says which of q, k, v, proj, mlp carry adapters, and alpha)")
    lora_config = litgpt_lora_config(lora_dir)
    path = lora_dir / litgpt.LORA_FILE
    file = TorchZipReader(path)
    try:
        legacy = [k for k in file.shapes() if f".{litgpt.LEGACY_QKV}.lora_" in k]
        if legacy:
            raise StateDictError(f"{path}: {legacy[0]!r} is a LoRA on lit-gpt's interleaved attn.attn (before March "
                                 "2024), which current litgpt cannot load either; merge it with that litgpt version "
                                 "and convert the merged lit_model.pth")
        expected = cio.expected_variables(config, lora_config)[cio.LORA_DIR]
        maps = litgpt.lora_maps(config, lora_config)
        return lora_config, MappedReader(file, maps, config.n_layer, expected, str(path))
    except BaseException:
        file.close()
        raise


def copy_tokenizer(source: Path | None, target: Path) -> None:
    """Copy the tokenizer files `source` holds into `target` (nothing when source is None)."""
    for name in TOKENIZER_FILES if source is not None else ():
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)


def lora_base(lora_dir: Path) -> str | None:
    """The base a litgpt LoRA directory was trained on (hyperparameters.yaml's checkpoint_dir),
    absolute when it is here."""
    base = read_yaml(lora_dir / litgpt.HYPERPARAMETERS).get("checkpoint_dir")
    return None if not base else str(Path(base).absolute()) if Path(base).exists() else str(base)


def _open_sources(checkpoint_dir: Path | None, lora_dir: Path | None, stack: contextlib.ExitStack
                  ) -> tuple[LLaMAConfig, LoRAConfig | None, list[tuple[str, MappedReader]]]:
    """(config, lora_config, [(item, reader)]) of a litgpt model and/or LoRA directory."""
    sources: list[tuple[str, MappedReader]] = []
    config = read_litgpt_config(checkpoint_dir if checkpoint_dir is not None else lora_dir)
    if checkpoint_dir is not None:
        if lora_dir is not None and (checkpoint_dir / litgpt.LORA_FILE).is_file():
            raise CheckpointError(f"{checkpoint_dir}: holds {litgpt.LORA_FILE} beside {litgpt.BASE_FILE}, so that "
                                  f"{litgpt.BASE_FILE} is litgpt's merge (merge_lora / chat wrote it) and the adapters "
                                  "would count twice; pass the base model's directory (hyperparameters.yaml's "
                                  "checkpoint_dir) or leave out --lora_dir")
        sources.append((cio.PARAMS_DIR, stack.enter_context(open_litgpt_base(checkpoint_dir, config)[1])))
    lora_config = None
    if lora_dir is not None:
        lora_model = read_litgpt_config(lora_dir)
        check_same_model(config, lora_model, lora_dir, checkpoint_dir or lora_dir)
        lora_config, reader = open_litgpt_lora(lora_dir, config)
        sources.append((cio.LORA_DIR, stack.enter_context(reader)))
    return config, lora_config, sources


def litgpt_to_checkpoint(checkpoint_dir: str | os.PathLike | None, out_dir: str | os.PathLike,
                         lora_dir: str | os.PathLike | None = None, dtype: Any = None, overwrite: bool = False,
                         progress: bool = True) -> tuple[LLaMAConfig, LoRAConfig | None, dict[str, float]]:
    """A litgpt model directory (+ a litgpt LoRA directory) -> a jaxlora checkpoint (config.json,
    params/, lora/, the tokenizer files); a LoRA directory alone -> an adapters-only directory
    recording its base (hyperparameters.yaml's checkpoint_dir).

    Everything is validated (model_config.yaml, hyperparameters.yaml, keys, shapes) before
    anything is written. dtype: storage dtype of the frozen weights (None keeps the file's);
    adapters keep theirs (bit for bit: `adapters_to_litgpt` writes them back unchanged).
    Returns (config, lora_config, stats)."""
    if checkpoint_dir is None and lora_dir is None:
        raise ValueError("nothing to convert: give a litgpt model directory and/or a litgpt LoRA directory")
    out_dir = check_new_output(out_dir, overwrite)
    cast = parse_dtype(dtype)
    home = None if checkpoint_dir is None else Path(checkpoint_dir)
    lora_home = None if lora_dir is None else Path(lora_dir)
    with contextlib.ExitStack() as stack:
        config, lora_config, sources = _open_sources(home, lora_home, stack)
        casts = {cio.PARAMS_DIR: cast, cio.LORA_DIR: None}
        meter = Progress("from_litgpt", sum(r.nbytes(casts[item]) for item, r in sources), progress)
        with cio.staged_directory(out_dir, overwrite) as tmp:
            cio.write_config(tmp, config, lora_config, None if home is not None else lora_base(lora_home))
            for item, reader in sources:
                import_tree(tmp / item, reader, casts[item], meter)
            copy_tokenizer(home if home is not None else lora_home, tmp)
    return config, lora_config, meter.stats()


# ---------------------------------------------------------------------------------------------
# jaxlora -> litgpt


def checkpoint_to_litgpt(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike,
                         adapters_dir: str | os.PathLike | None = None, merged: bool = False, dtype: Any = None,
                         name: str = "", tokenizer_dir: str | os.PathLike | None = None, overwrite: bool = False,
                         progress: bool = True) -> Path:
    """A jaxlora checkpoint -> a litgpt model directory: lit_model.pth, model_config.yaml and the
    tokenizer files (from `tokenizer_dir`, default the checkpoint's own), which litgpt's GPT
    loads strictly. merged: fold the adapters (the checkpoint's lora/, or `adapters_dir`'s) into
    the weights per layer (float32 sum, rounded once). dtype: output dtype (None keeps the
    stored one). name: model_config.yaml's name (litgpt picks its chat prompt style by it)."""
    out_dir = check_new_output(out_dir, overwrite)
    cast = parse_dtype(dtype)
    directory = Path(checkpoint_dir).absolute()
    if tokenizer_dir is not None and not any((Path(tokenizer_dir) / n).is_file() for n in TOKENIZER_FILES[:2]):
        raise FileNotFoundError(f"--tokenizer_dir {tokenizer_dir}: no {' or '.join(TOKENIZER_FILES[:2])} there")
    view, config = checkpoint_view(directory, adapters_dir, merged)
    with cio.staged_directory(out_dir, overwrite) as tmp:
        export_torch_zip(view, litgpt.base_maps(config), config.n_layer, litgpt.litgpt_order, cast,
                         tmp / litgpt.BASE_FILE, "to_litgpt", progress)
        (tmp / litgpt.MODEL_CONFIG).write_text(yaml.safe_dump(litgpt.config_to_litgpt(config, name), sort_keys=False))
        copy_tokenizer(Path(tokenizer_dir) if tokenizer_dir is not None else directory, tmp)
    return out_dir


def _litgpt_base_of(adapters: Path, config: LLaMAConfig, base_dir: Any) -> Path:
    """The litgpt model directory the adapters belong to (`base_dir`, else the base they record)."""
    base = base_dir if base_dir is not None else cio.read_base(adapters)
    if base is None or not is_litgpt_dir(base):
        raise CheckpointError(
            f"{adapters}: a litgpt LoRA checkpoint names its base model's litgpt directory (hyperparameters.yaml's "
            f"checkpoint_dir), and {'the base these adapters record, ' + repr(base) if base else 'no base'} "
            f"{'is not one' if base else 'is recorded'}; pass --base_dir (a litgpt directory of the base: "
            "convert/to_litgpt.py --checkpoint_dir BASE --out_dir DIR makes one)")
    check_same_model(read_litgpt_config(base), config, adapters, Path(base).absolute())
    return Path(base).absolute()


def adapters_to_litgpt(adapters_dir: str | os.PathLike, out_dir: str | os.PathLike,
                       base_dir: str | os.PathLike | None = None, dtype: Any = None, overwrite: bool = False,
                       progress: bool = True) -> Path:
    """jaxlora adapters (an adapters-only directory or a checkpoint's lora/) -> a litgpt LoRA
    directory: lit_model.pth.lora ({"model": lora tensors}, as finetune/lora.py saves it),
    hyperparameters.yaml (lora_*, checkpoint_dir = the base's litgpt directory, precision) and
    the base's model_config.yaml and tokenizer files, so `litgpt chat OUT_DIR` (or merge_lora)
    uses it. base_dir: the base model's litgpt directory (default: the base the adapters record).
    dtype: of the tensors (None keeps the stored one). Targets must fit litgpt's switches
    (LitgptConfigError otherwise: q/k/v/o each, gate/up/down together)."""
    out_dir = check_new_output(out_dir, overwrite)
    cast = parse_dtype(dtype)
    adapters = Path(adapters_dir).absolute()
    config, lora_config = cio.read_config(adapters)
    if not cio.has_adapters(lora_config):
        raise CheckpointError(f"{adapters}: has no adapters (config.json 'lora' is null)")
    hparams = litgpt.lora_to_litgpt(lora_config)
    base = _litgpt_base_of(adapters, config, base_dir)
    reader = open_checked(adapters, cio.LORA_DIR, cio.expected_variables(config, lora_config)[cio.LORA_DIR])
    stored = {d for _, d in reader.shapes().values()}
    precision = PRECISIONS.get(cast or max(stored, key=lambda d: d.itemsize), "32-true")
    with cio.staged_directory(out_dir, overwrite) as tmp:
        export_torch_zip(MergedView(reader), litgpt.lora_maps(config, lora_config), config.n_layer,
                         litgpt.litgpt_order, cast, tmp / litgpt.LORA_FILE, "to_litgpt", progress, nest="model")
        shutil.copyfile(config_file(base), tmp / config_file(base).name)
        settings = {"checkpoint_dir": str(base), "out_dir": str(out_dir), "precision": precision, **hparams}
        (tmp / litgpt.HYPERPARAMETERS).write_text(yaml.safe_dump(settings, sort_keys=False))
        copy_tokenizer(base, tmp)
    return out_dir
