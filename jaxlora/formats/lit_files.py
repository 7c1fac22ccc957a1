"""lit-llama files <-> jaxlora variables: the Python API behind the converters and train.py."""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from jaxlora.config import LLaMAConfig, LoRAConfig
from jaxlora.formats import lit_llama
from jaxlora.formats.torch_io import load_state_dict, save_state_dict


def load_lit_llama(checkpoint_path: str | os.PathLike, lora_path: str | os.PathLike | None = None,
                   lora_alpha: float = 16.0, lora_dropout: float = 0.05, param_dtype: Any = None,
                   config: LLaMAConfig | None = None) -> tuple[LLaMAConfig, LoRAConfig | None, dict[str, Any]]:
    """Read a lit-llama base checkpoint (and optionally a LoRA file) into {"params", "lora"}.

    The preset is recognised from the weights unless `config` is given. r and the q/k/v
    layout are read from the LoRA file; alpha is not stored by lit-llama, so pass it.
    Frozen weights keep the file's dtype unless `param_dtype` is given; adapters are float32.
    Loads the whole file into host memory: for large checkpoints use convert/from_lit_llama.py.
    """
    sd = load_state_dict(checkpoint_path)
    source = str(checkpoint_path)
    config = config or lit_llama.infer_config({k: v.shape for k, v in sd.items()}, source)
    params = lit_llama.lit_to_params(sd, config, source)
    if param_dtype is not None:
        params = jax.tree.map(lambda a: a.astype(param_dtype), params)
    variables: dict[str, Any] = {"params": params}
    lora_config = None
    if lora_path is not None:
        lsd = load_state_dict(lora_path)
        lora_config = lit_llama.infer_lora({k: v.shape for k, v in lsd.items()}, config.n_embd, lora_alpha,
                                           lora_dropout, str(lora_path))
        lora = lit_llama.lit_to_lora(lsd, config, lora_config, str(lora_path))
        variables["lora"] = jax.tree.map(lambda a: a.astype(np.float32), lora)
    return config, lora_config, variables


def save_lit_lora(lora: Any, config: LLaMAConfig, lora_config: LoRAConfig, path: str | os.PathLike,
                  dtype: Any = None) -> None:
    """Write adapters as lit-llama's `lit-llama-lora-finetuned.pth` (atomically).

    dtype: None keeps float32; lit-llama's own bf16 runs write bfloat16.
    """
    sd = lit_llama.lora_to_lit(jax.device_get(lora), config, lora_config)
    if dtype is not None:
        sd = {k: v.astype(dtype) for k, v in sd.items()}
    save_state_dict(sd, path)


def save_lit_base(params: Any, config: LLaMAConfig, path: str | os.PathLike, dtype: Any = None) -> None:
    """Write frozen weights as a lit-llama base checkpoint (atomically)."""
    sd = lit_llama.params_to_lit(jax.device_get(params), config)
    if dtype is not None:
        sd = {k: v.astype(dtype) for k, v in sd.items()}
    save_state_dict(sd, path)
