"""Frozen weights, adapters and the tokenizer for generation, from any source `generate.py` accepts.

Base weights (one of):
  checkpoint_dir   a jaxlora checkpoint directory (config.json + params/, with its own lora/
                   when it has one)
  pretrained_path  lit-llama's base .pth, a Hugging Face LLaMA directory, or a jaxlora checkpoint
                   directory (its lora/ unused)
Adapters (at most one; they replace a checkpoint's own):
  adapters         an adapters-only directory (train.py's OUT_DIR/adapters), a PEFT LoRA folder
                   (adapter_config.json + adapter_model.*) or a litgpt LoRA directory (finetune/lora.py's
                   lit_model.pth.lora + hyperparameters.yaml); alone, the base it records (config.json
                   "base", PEFT's base_model_name_or_path, litgpt's checkpoint_dir) is loaded when local
  lora_path        lit-llama's LoRA file (lit-llama-lora-finetuned.pth; alpha is not stored
                   in it: pass lora_alpha)

`check_sources` refuses a missing or wrong path before anything else is read (so the
message names the real problem, not a tokenizer that was never looked for); `find_tokenizer`
takes the tokenizer from where the weights came from. Adapters made for another model size
are refused with an error naming the file.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax

from jaxlora.config import LLaMAConfig, LoRAConfig
from jaxlora.text.tokenizer import TOKENIZER_FILES
from jaxlora.weights import jaxlora_dir as cio
from jaxlora.weights.lit_files import load_lit_lora
from jaxlora.weights.load import (
    ADAPTER_FORMATS,
    adapters_base,
    adapters_format,
    load_adapters,
    load_adapters_dir,
    load_base_model,
)

PathLike = str | os.PathLike
TOKENIZER_FILE = "tokenizer.model"
LIT_TOKENIZER = Path("checkpoints/lit-llama") / TOKENIZER_FILE  # where lit-llama keeps LLaMA's tokenizer
MAX_BASE_HOPS = 4  # adapters -> their base -> its recorded base ...: a bound, in case the records loop


@dataclass(frozen=True)
class Sources:
    """Where the weights come from, checked: exactly one of checkpoint_dir / pretrained_path
    (an adapters directory alone has its recorded base filled in as pretrained_path)."""

    checkpoint_dir: str | None = None
    pretrained_path: str | None = None
    adapters: str | None = None
    lora_path: str | None = None


def _must_exist(flag: str, path: PathLike | None, kind: str) -> None:
    """kind 'dir', 'file' or 'any': a missing path, or one of the wrong kind, named with its flag."""
    if path is None:
        return
    p = Path(path)
    if not p.exists():
        what = {"dir": "directory", "file": "file"}.get(kind, "file or directory")
        raise FileNotFoundError(f"{flag} {path}: no such {what}")
    if kind == "dir" and not p.is_dir():
        hint = "; a lit-llama .pth goes to --pretrained_path" if flag == "--checkpoint_dir" else ""
        raise NotADirectoryError(f"{flag} {path}: a file, not a directory{hint}")
    if kind == "file" and not p.is_file():
        raise IsADirectoryError(f"{flag} {path}: a directory, not a file")


def check_sources(checkpoint_dir: PathLike | None = None, pretrained_path: PathLike | None = None,
                  adapters: PathLike | None = None, lora_path: PathLike | None = None) -> Sources:
    """The sources, checked without reading any weights: conflicting flags, then each path
    (missing, wrong kind, not a checkpoint/adapters directory), then an adapters directory's
    recorded base."""
    if checkpoint_dir is not None and pretrained_path is not None:
        raise ValueError("give --checkpoint_dir or --pretrained_path, not both")
    if adapters is not None and lora_path is not None:
        raise ValueError("give --adapters or --lora_path, not both")
    _must_exist("--checkpoint_dir", checkpoint_dir, "dir")
    _must_exist("--pretrained_path", pretrained_path, "any")
    _must_exist("--adapters", adapters, "dir")
    _must_exist("--lora_path", lora_path, "file")
    if checkpoint_dir is not None and not cio.is_jaxlora_checkpoint(checkpoint_dir):
        raise FileNotFoundError(f"--checkpoint_dir {checkpoint_dir}: not a jaxlora checkpoint directory "
                                f"({cio.CONFIG_FILE} and {cio.PARAMS_DIR}/); a lit-llama .pth goes to "
                                "--pretrained_path")
    if adapters is not None and adapters_format(adapters) is None:
        raise FileNotFoundError(f"--adapters {adapters}: not an adapters directory ({cio.CONFIG_FILE} and "
                                f"{cio.LORA_DIR}/, no {cio.PARAMS_DIR}/), a PEFT LoRA folder (adapter_config.json and "
                                "adapter_model.safetensors or .bin) or a litgpt LoRA directory (lit_model.pth.lora "
                                "and hyperparameters.yaml)")
    if checkpoint_dir is None and pretrained_path is None:
        if adapters is None:
            raise ValueError("no model given: pass --checkpoint_dir or --pretrained_path (or --adapters "
                             "that record their base)")
        pretrained_path = adapters_base(adapters)
        if not pretrained_path or not Path(pretrained_path).exists():
            record = ADAPTER_FORMATS[adapters_format(adapters)][1]
            raise FileNotFoundError(f"--adapters {adapters}: its base {pretrained_path!r} ({record}) is "
                                    "not found; pass --checkpoint_dir or --pretrained_path")
    paths = (checkpoint_dir, pretrained_path, adapters, lora_path)
    return Sources(*(None if p is None else str(p) for p in paths))


def _tokenizer_places(start: PathLike) -> Iterator[Path]:
    """Folders that may hold the tokenizer of the weights at `start`: a directory itself (HF
    and jaxlora directories may hold tokenizer.model), then the base it records; a file's
    folder and the one above (lit-llama: checkpoints/lit-llama/7B/lit-llama.pth beside
    checkpoints/lit-llama/tokenizer.model; the demo's .pth lies beside its tokenizer)."""
    path: Path | None = Path(start)
    for _ in range(MAX_BASE_HOPS):
        if path is None or not path.exists():
            return
        if path.is_file():
            yield path.parent
            yield path.parent.parent
            return
        yield path
        base = adapters_base(path)
        path = Path(base) if base else None


def find_tokenizer(sources: Sources) -> Path:
    """The tokenizer (tokenizer.json, else tokenizer.model) that belongs to these weights (see
    `_tokenizer_places`; adapters first, then the base), else lit-llama's usual place;
    FileNotFoundError listing where it looked."""
    looked: list[Path] = []
    starts = [s for s in (sources.adapters, sources.checkpoint_dir, sources.pretrained_path) if s is not None]
    places = [place for start in starts for place in _tokenizer_places(start)] + [LIT_TOKENIZER.parent]
    for candidate in (place / name for place in places for name in TOKENIZER_FILES):
        if candidate in looked:
            continue
        if candidate.is_file():
            return candidate
        looked.append(candidate)
    raise FileNotFoundError(f"no {' or '.join(TOKENIZER_FILES)} for these weights (looked for "
                            f"{', '.join(map(str, looked))}); pass --tokenizer_path")


def load_for_generation(checkpoint_dir: PathLike | None = None, pretrained_path: PathLike | None = None,
                        adapters: PathLike | None = None, lora_path: PathLike | None = None,
                        lora_alpha: float = 16.0, param_dtype: Any = None, scan_layers: bool = True,
                        ) -> tuple[LLaMAConfig, LoRAConfig | None, dict[str, Any], str]:
    """(config, lora_config or None, {"params", "lora"?} on the device, description).

    The frozen weights arrive in the layout a model with `scan_layers` reads (stacked, or one
    array per layer, read per layer: no stacked copy to split on the device); adapters stacked."""
    src = check_sources(checkpoint_dir, pretrained_path, adapters, lora_path)
    lora_config, lora = None, None
    if src.checkpoint_dir is not None:
        config, params, _ = load_base_model(src.checkpoint_dir, None, param_dtype, scan_layers=scan_layers)
        desc = f"jaxlora checkpoint {src.checkpoint_dir}"
        if src.adapters is None and src.lora_path is None and cio.has_adapters(cio.read_config(src.checkpoint_dir)[1]):
            lora_config, lora = load_adapters_dir(src.checkpoint_dir, config, desc)
            desc += " (with its adapters)"
    else:
        config, params, desc = load_base_model(src.pretrained_path, None, param_dtype, scan_layers=scan_layers)
    if src.adapters is not None:
        lora_config, lora = load_adapters(src.adapters, config, desc)
        desc += f" + {ADAPTER_FORMATS[adapters_format(src.adapters)][0]} {src.adapters}"
    elif src.lora_path is not None:
        lora_config, lora = load_lit_lora(src.lora_path, config, lora_alpha,
                                          place=lambda leaf, _: jax.device_put(leaf))
        desc += f" + LoRA file {src.lora_path}"
    variables = {"params": params}
    if lora is not None:
        variables["lora"] = lora
    return config, lora_config, variables, desc
