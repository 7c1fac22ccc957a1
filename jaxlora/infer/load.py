"""Frozen weights and adapters for generation, from any source `generate.py` accepts.

Base weights (one of):
  checkpoint_dir   a jaxlora checkpoint directory (config.json + params/, with its own lora/
                   when it has one)
  pretrained_path  lit-llama's base .pth, a Hugging Face LLaMA directory, or a jaxlora checkpoint
                   directory (its lora/ unused)
Adapters (at most one; they replace a checkpoint's own):
  adapters         an adapters-only directory (train.py's OUT_DIR/adapters); alone, it names
                   its base in config.json ("base"), which is then loaded
  lora_path        lit-llama's LoRA file (lit-llama-lora-finetuned.pth; alpha is not stored
                   in it: pass lora_alpha)

Adapters made for another model size are refused with an error naming the file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax

from jaxlora.config import LLaMAConfig, LoRAConfig
from jaxlora.weights import jaxlora_dir as cio
from jaxlora.weights.lit_files import load_lit_lora
from jaxlora.weights.load import load_adapters_dir, load_base_model

PathLike = str | os.PathLike


def load_for_generation(checkpoint_dir: PathLike | None = None, pretrained_path: PathLike | None = None,
                        adapters: PathLike | None = None, lora_path: PathLike | None = None,
                        lora_alpha: float = 16.0, param_dtype: Any = None, scan_layers: bool = True,
                        ) -> tuple[LLaMAConfig, LoRAConfig | None, dict[str, Any], str]:
    """(config, lora_config or None, {"params", "lora"?} on the device, description).

    The frozen weights arrive in the layout a model with `scan_layers` reads (stacked, or one
    array per layer, read per layer: no stacked copy to split on the device); adapters stacked."""
    if checkpoint_dir is not None and pretrained_path is not None:
        raise ValueError("give --checkpoint_dir or --pretrained_path, not both")
    if adapters is not None and lora_path is not None:
        raise ValueError("give --adapters or --lora_path, not both")
    if adapters is not None and not cio.is_adapters_dir(adapters):
        raise FileNotFoundError(f"--adapters {adapters}: not an adapters directory ({cio.CONFIG_FILE} and "
                                f"{cio.LORA_DIR}/, no {cio.PARAMS_DIR}/)")
    if checkpoint_dir is None and pretrained_path is None:
        if adapters is None:
            raise ValueError("no model given: pass --checkpoint_dir or --pretrained_path (or --adapters "
                             "whose config.json names its base)")
        pretrained_path = cio.read_base(adapters)
        if not pretrained_path or not Path(pretrained_path).exists():
            raise FileNotFoundError(f"--adapters {adapters}: its base {pretrained_path!r} (config.json 'base') is "
                                    "not found; pass --checkpoint_dir or --pretrained_path")

    lora_config, lora = None, None
    if checkpoint_dir is not None:
        if not cio.is_jaxlora_checkpoint(checkpoint_dir):
            raise FileNotFoundError(f"--checkpoint_dir {checkpoint_dir}: not a jaxlora checkpoint directory "
                                    f"({cio.CONFIG_FILE} and {cio.PARAMS_DIR}/); a lit-llama .pth goes to "
                                    "--pretrained_path")
        config, params, _ = load_base_model(checkpoint_dir, None, param_dtype, scan_layers=scan_layers)
        desc = f"jaxlora checkpoint {checkpoint_dir}"
        if adapters is None and lora_path is None and cio.has_adapters(cio.read_config(checkpoint_dir)[1]):
            lora_config, lora = load_adapters_dir(checkpoint_dir, config, desc)
    else:
        config, params, desc = load_base_model(pretrained_path, None, param_dtype, scan_layers=scan_layers)
    if adapters is not None:
        lora_config, lora = load_adapters_dir(adapters, config, desc)
        desc += f" + adapters {adapters}"
    elif lora_path is not None:
        lora_config, lora = load_lit_lora(lora_path, config, lora_alpha, place=lambda leaf, _: jax.device_put(leaf))
        desc += f" + LoRA file {lora_path}"
    elif lora is not None:
        desc += " (with its adapters)"
    variables = {"params": params}
    if lora is not None:
        variables["lora"] = lora
    return config, lora_config, variables, desc
