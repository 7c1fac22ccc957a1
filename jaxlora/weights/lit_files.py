"""lit-llama files <-> jaxlora variables: the Python API behind the converters and train.py."""
from __future__ import annotations

import os
from typing import Any, Callable

import jax
import numpy as np

from jaxlora.config import LLaMAConfig, LoRAConfig
from jaxlora.weights import lit_llama
from jaxlora.weights.torch_io import save_state_dict
from jaxlora.weights.torch_zip import TorchZipReader

Place = Callable[[np.ndarray, tuple[str, ...]], Any]


def cast_and_place(dtype: Any, place: Place | None) -> Place:
    """A finished leaf cast to dtype (None keeps it), then through place(leaf, path) (None:
    stays numpy)."""
    def put(leaf: np.ndarray, path: tuple[str, ...]) -> Any:
        leaf = leaf if dtype is None else leaf.astype(dtype, copy=False)
        return place(leaf, path) if place else leaf
    return put


def load_lit_llama(checkpoint_path: str | os.PathLike, lora_path: str | os.PathLike | None = None,
                   lora_alpha: float = 16.0, lora_dropout: float = 0.05, param_dtype: Any = None,
                   config: LLaMAConfig | None = None,
                   place: Callable[[np.ndarray, tuple[str, ...]], Any] | None = None,
                   ) -> tuple[LLaMAConfig, LoRAConfig | None, dict[str, Any]]:
    """Read a lit-llama base checkpoint (and optionally a LoRA file) into {"params", "lora"}.

    The preset is recognised from the weights unless `config` is given. A lit-llama LoRA file
    means adapters on q and v (any other shape is refused); r is read from it; alpha is not
    stored by lit-llama, so pass it.
    Frozen weights keep the file's dtype unless `param_dtype` is given; adapters are float32.
    The files are read tensor by tensor (no torch needed); each stacked leaf is passed to
    `place(leaf, path)` when complete (path: its place in the collection, e.g. ("h", "attn",
    "c_attn", "kernel"); e.g. `jax.device_put` to that leaf's sharding: the host then holds
    one leaf at a time, not the checkpoint), else the variables are numpy arrays.
    """
    source = str(checkpoint_path)
    with TorchZipReader(checkpoint_path) as reader:
        shapes = reader.shapes()
        config = config or lit_llama.infer_config(shapes, source)
        params = lit_llama.read_tree(reader.read, shapes, lit_llama.base_maps(config), config.n_layer, source,
                                     place=cast_and_place(param_dtype, place)).get("params", {})
    variables: dict[str, Any] = {"params": params}
    lora_config = None
    if lora_path is not None:
        lora_config, variables["lora"] = load_lit_lora(lora_path, config, lora_alpha, lora_dropout, place)
    return config, lora_config, variables


def load_lit_lora(lora_path: str | os.PathLike, config: LLaMAConfig, lora_alpha: float = 16.0,
                  lora_dropout: float = 0.05,
                  place: Callable[[np.ndarray, tuple[str, ...]], Any] | None = None,
                  ) -> tuple[LoRAConfig, dict[str, Any]]:
    """A lit-llama LoRA file's adapters (float32) for a base of `config`: (lora_config, lora).
    The file means adapters on q and v (other shapes are refused: LitLoRATargetsError); a file
    for another model size raises StateDictError naming the file and the key. `place(leaf,
    path)` as in `load_lit_llama`."""
    with TorchZipReader(lora_path) as reader:
        shapes = reader.shapes()
        lora_config = lit_llama.lit_lora_config(shapes, config.n_embd, lora_alpha, lora_dropout, str(lora_path))

        lora = lit_llama.read_tree(reader.read, shapes, lit_llama.lora_maps(config, lora_config), config.n_layer,
                                   str(lora_path), place=cast_and_place(np.float32, place)).get("lora", {})
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
