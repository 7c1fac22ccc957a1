"""lit-llama files <-> jaxlora variables: the Python API behind the converters and train.py."""
from __future__ import annotations

import os
from typing import Any, Callable

import jax
import numpy as np
from flax import traverse_util

from jaxlora.config import LLaMAConfig, LoRAConfig
from jaxlora.weights import jaxlora_dir as cio
from jaxlora.weights import lit_llama
from jaxlora.weights.engine import MappedReader, read_leaves
from jaxlora.weights.torch_io import save_state_dict
from jaxlora.weights.torch_zip import TorchZipReader

Place = Callable[[np.ndarray, tuple[str, ...]], Any]


def open_lit_base(checkpoint_path: str | os.PathLike, config: LLaMAConfig | None = None,
                  ) -> tuple[LLaMAConfig, MappedReader]:
    """A lit-llama base `.pth` as our `params` leaves (the engine's reader): (config, reader);
    the preset is recognised from the weights unless `config` is given. Keys and shapes are
    checked first."""
    file = TorchZipReader(checkpoint_path)
    try:
        source = str(checkpoint_path)
        config = config or lit_llama.infer_config(file.shapes(), source)
        expected = cio.expected_variables(config, None)[cio.PARAMS_DIR]
        return config, MappedReader(file, lit_llama.base_maps(config), config.n_layer, expected, source)
    except BaseException:
        file.close()
        raise


def open_lit_lora(lora_path: str | os.PathLike, config: LLaMAConfig, lora_alpha: float = 16.0,
                  lora_dropout: float = 0.05) -> tuple[LoRAConfig, MappedReader]:
    """A lit-llama LoRA file as our `lora` leaves: (its LoRAConfig: q, v, r read from it, alpha
    and dropout given; the reader). Other shapes are refused (StateDictError naming the key)."""
    file = TorchZipReader(lora_path)
    try:
        lora_config = lit_llama.lit_lora_config(file.shapes(), config.n_embd, lora_alpha, lora_dropout,
                                                str(lora_path))
        expected = cio.expected_variables(config, lora_config)[cio.LORA_DIR]
        maps = lit_llama.lora_maps(config, lora_config)
        return lora_config, MappedReader(file, maps, config.n_layer, expected, str(lora_path))
    except BaseException:
        file.close()
        raise


def load_lit_llama(checkpoint_path: str | os.PathLike, lora_path: str | os.PathLike | None = None,
                   lora_alpha: float = 16.0, lora_dropout: float = 0.05, param_dtype: Any = None,
                   config: LLaMAConfig | None = None, place: Place | None = None,
                   ) -> tuple[LLaMAConfig, LoRAConfig | None, dict[str, Any]]:
    """Read a lit-llama base checkpoint (and optionally a LoRA file) into {"params", "lora"} on
    the host (stacked leaves; for device loading use `jaxlora.weights.load.load_params`).

    The preset is recognised from the weights unless `config` is given. A lit-llama LoRA file
    means adapters on q and v (any other shape is refused); r is read from it; alpha is not
    stored by lit-llama, so pass it. Frozen weights keep the file's dtype unless `param_dtype`
    is given; adapters are float32. Each leaf goes through `place(leaf, path)` when given.
    """
    config, reader = open_lit_base(checkpoint_path, config)
    with reader:
        params = traverse_util.unflatten_dict(read_leaves(reader, param_dtype, place))
    variables: dict[str, Any] = {"params": params}
    lora_config = None
    if lora_path is not None:
        lora_config, variables["lora"] = load_lit_lora(lora_path, config, lora_alpha, lora_dropout, place)
    return config, lora_config, variables


def load_lit_lora(lora_path: str | os.PathLike, config: LLaMAConfig, lora_alpha: float = 16.0,
                  lora_dropout: float = 0.05, place: Place | None = None) -> tuple[LoRAConfig, dict[str, Any]]:
    """A lit-llama LoRA file's adapters (float32) for a base of `config`: (lora_config, lora).
    The file means adapters on q and v (other shapes are refused: LitLoRATargetsError); a file
    for another model size raises StateDictError naming the file and the key. `place(leaf,
    path)` as in `load_lit_llama`."""
    lora_config, reader = open_lit_lora(lora_path, config, lora_alpha, lora_dropout)
    with reader:
        lora = traverse_util.unflatten_dict(read_leaves(reader, np.float32, place))
    return lora_config, lora


def save_lit_lora(lora: Any, config: LLaMAConfig, lora_config: LoRAConfig, path: str | os.PathLike,
                  dtype: Any = None) -> None:
    """Write adapters as lit-llama's `lit-llama-lora-finetuned.pth` (atomically).

    Only for targets exactly (q, v), what lit-llama's LoRA file means; other target sets raise
    `LitLoRATargetsError` (a ValueError) before anything is written: export those merged.
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
