"""Pure mapping between lit-llama state dicts and jaxlora variable trees, both ways.

Values are numpy arrays (bfloat16 as `ml_dtypes.bfloat16`); nothing here imports torch.
Every tensor is described once by a `TensorMap`: its lit-llama key (with `{i}` for the
layer), its lit-llama shape, its place in our tree, and the two exact (bit-preserving)
reshapes between them. Whole-dict conversion, validation and the streaming converter are
all built on the same table, so they cannot disagree.

Layouts (C = n_embd, H = n_hidden, V = padded vocab, L = n_layer, r = LoRA rank, n = enabled q/k/v):

| lit-llama key                              | lit shape   | ours                                  | our shape    |
|--------------------------------------------|-------------|---------------------------------------|--------------|
| transformer.wte.weight                     | (V, C)      | params/wte/embedding                  | (V, C)       |
| transformer.h.{i}.attn.c_attn.weight       | (3C, C)     | params/h/attn/c_attn/kernel[i]        | (L, C, 3C)   |
| transformer.h.{i}.attn.c_attn.lora_A       | (r*n, C)    | lora/h/attn/c_attn/lora_A[i]          | (L, n, C, r) |
| transformer.h.{i}.attn.c_attn.lora_B       | (C*n, r)    | lora/h/attn/c_attn/lora_B[i]          | (L, n, r, C) |
| lm_head.weight                             | (V, C)      | params/lm_head/kernel                 | (C, V)       |

and likewise for the other Linear weights (transposed) and norm scales (as is). Module names
come from the target table `jaxlora.config.LORA_TARGETS`.

lit-llama's own LoRA file (`lit-llama-lora-finetuned.pth`) means q and v and nothing else: its
`lora()` context builds `MergedLinear(..., enable_lora=[True, False, True])` whatever the file
holds, so lora_A is (2r, C) and lora_B (2C, r). Files are written and read only in that shape
(`check_lit_lora_targets`, `lit_lora_config`). Other target sets are kept as jaxlora adapter
directories and exported merged. `lora_maps` still describes any target set, with the keys
that lit-llama's LoRA layers would have on those modules (`...attn.c_proj.lora_A` (r, in) /
`lora_B` (out, r)); the PyTorch reference in the tests uses that layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from flax import traverse_util

from jaxlora.config import LORA_TARGETS, PRESETS, TARGET_MODULES, LLaMAConfig, LoRAConfig
from jaxlora.errors import LitLoRATargetsError, StateDictError

# The only target set lit-llama's LoRA file can hold (its lora(): enable_lora=[True, False, True]).
LIT_LORA_TARGETS = ("q", "v")
_LIT_LORA_WHY = ("lit-llama's LoRA file always means adapters on q and v: its lora() context builds "
                 "MergedLinear(..., enable_lora=[True, False, True]) whatever the file holds")


@dataclass(frozen=True)
class TensorMap:
    lit_key: str  # contains "{i}" when there is one tensor per layer
    lit_shape: tuple[int, ...]
    path: tuple[str, ...]  # (collection, module, ..., leaf) in our variables
    to_ours: Callable[[np.ndarray], np.ndarray]  # one lit tensor -> one (per-layer) slice of ours
    to_lit: Callable[[np.ndarray], np.ndarray]
    # Several external tensors may fill one leaf of ours (HF's q/k/v projections fill our fused
    # c_attn): `part` indexes this tensor's place in our per-layer slice, whose shape is `leaf_shape`.
    part: tuple = ()
    leaf_shape: tuple[int, ...] | None = None

    @property
    def layered(self) -> bool:
        return "{i}" in self.lit_key

    def key(self, i: int) -> str:
        """The external key of layer i (the only key if not layered)."""
        return self.lit_key.format(i=i) if self.layered else self.lit_key

    def keys(self, n_layer: int) -> list[str]:
        return [self.lit_key.format(i=i) for i in range(n_layer)] if self.layered else [self.lit_key]


def identity(a: np.ndarray) -> np.ndarray:
    return a


def transpose(a: np.ndarray) -> np.ndarray:
    if a.ndim != 2 or a.size < (1 << 20):
        return np.ascontiguousarray(a.T)
    # Large matrices: tile by tile, ~2x (f32) to 2.6x (bf16) faster than numpy's strided copy.
    out, tile = np.empty(a.shape[::-1], a.dtype), 256
    for i in range(0, a.shape[0], tile):
        for j in range(0, a.shape[1], tile):
            out[j:j + tile, i:i + tile] = a[i:i + tile, j:j + tile].T
    return out


def _grouped(n: int) -> tuple[Callable, Callable]:
    """lit (n*X, Y) <-> ours (n, Y, X): split the row blocks, swap the two last axes."""
    def to_ours(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a.reshape(n, a.shape[0] // n, a.shape[1]).transpose(0, 2, 1))

    def to_lit(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a.transpose(0, 2, 1).reshape(-1, a.shape[1]))
    return to_ours, to_lit


def _lit_module(module: tuple[str, str]) -> str:
    """lit-llama's name of our dense layer `module` (from the target table)."""
    return TARGET_MODULES[module][0].lit_module


def check_lit_llama_model(config: LLaMAConfig) -> None:
    """Raise StateDictError unless lit-llama's network computes `config` (LLaMA-1's architecture)."""
    if not config.is_llama1:
        raise StateDictError(
            f"a lit-llama file cannot hold this model ({'; '.join(config.llama1_differences())}): lit-llama's "
            "LLaMA has only multi-head attention, plain RoPE and a separate LM head, so it would compute another "
            "function. Export it to HF transformers instead (convert/to_hf.py; adapters as a PEFT folder: "
            "convert/to_peft.py)")


def base_maps(config: LLaMAConfig) -> list[TensorMap]:
    """The frozen weights: lit-llama base checkpoint <-> our `params`."""
    check_lit_llama_model(config)
    C, V = config.n_embd, config.padded_vocab_size
    maps = [
        TensorMap("transformer.wte.weight", (V, C), ("params", "wte", "embedding"), identity, identity),
        TensorMap("lm_head.weight", (V, C), ("params", "lm_head", "kernel"), transpose, transpose),
        TensorMap("transformer.ln_f.scale", (C,), ("params", "ln_f", "scale"), identity, identity),
    ]
    for norm in ("rms_1", "rms_2"):
        maps.append(TensorMap(f"transformer.h.{{i}}.{norm}.scale", (C,), ("params", "h", norm, "scale"),
                              identity, identity))
    for module, (in_f, out_f) in config.dense_shapes().items():
        maps.append(TensorMap(f"transformer.h.{{i}}.{_lit_module(module)}.weight", (out_f, in_f),
                              ("params", "h", *module, "kernel"), transpose, transpose))
    return maps


def lora_maps(config: LLaMAConfig, lora: LoRAConfig) -> list[TensorMap]:
    """The adapters of any target set, as lit-llama LoRA layers would hold them on these modules
    (for lit-llama's own LoRA file: targets q, v only, see `check_lit_lora_targets`)."""
    check_lit_llama_model(config)
    r, shapes = lora.r, config.dense_shapes()
    maps: list[TensorMap] = []
    for module in TARGET_MODULES:
        n = sum(lora.enabled(module))
        if not n:
            continue
        in_f, out_f = shapes[module]
        seg = out_f // len(TARGET_MODULES[module])  # one output segment (C of the fused 3C)
        to_ours, to_lit = _grouped(n)
        prefix = f"transformer.h.{{i}}.{_lit_module(module)}"
        maps += [TensorMap(f"{prefix}.lora_A", (r * n, in_f), ("lora", "h", *module, "lora_A"), to_ours, to_lit),
                 TensorMap(f"{prefix}.lora_B", (seg * n, r), ("lora", "h", *module, "lora_B"), to_ours, to_lit)]
    return maps


def check_lit_lora_targets(lora: LoRAConfig) -> None:
    """Raise LitLoRATargetsError unless the targets are exactly q, v (see the module doc)."""
    if tuple(lora.targets) != LIT_LORA_TARGETS:
        raise LitLoRATargetsError(
            f"adapters on targets ({', '.join(lora.targets)}) cannot be written as a lit-llama LoRA file: "
            f"{_LIT_LORA_WHY}, so only targets exactly (q, v) load correctly. Keep the jaxlora adapters directory "
            "(train.py writes OUT_DIR/adapters) and export a merged lit-llama checkpoint: python "
            "convert/to_lit_llama.py --checkpoint_dir BASE --adapters DIR --merged --out merged.pth")


def check_state_dict(shapes: Mapping[str, tuple[int, ...]], maps: Iterable[TensorMap], n_layer: int,
                     source: str = "state dict", allow_extra: bool = False) -> None:
    """Raise StateDictError naming every shape mismatch, missing key and unexpected key, in
    that order (a wrong model size shows first as wte/layer shapes, not as a list of keys)."""
    expected = {key: m.lit_shape for m in maps for key in m.keys(n_layer)}
    mismatched = [f"key {k!r} has shape {tuple(shapes[k])}, expected {expected[k]}"
                  for k in expected if k in shapes and tuple(shapes[k]) != tuple(expected[k])]
    missing = [f"missing key {k!r} (expected shape {expected[k]})" for k in expected if k not in shapes]
    unexpected = [] if allow_extra else [f"unexpected key {k!r} (shape {tuple(shapes[k])})"
                                         for k in shapes if k not in expected]
    problems = mismatched + missing + unexpected
    if problems:
        more = ""
        if len(problems) > 10:
            more = (f" (and {len(problems) - 10} more; in all {len(mismatched)} wrong shapes, {len(missing)} missing "
                    f"and {len(unexpected)} unexpected keys)")
        raise StateDictError(f"{source}: " + "; ".join(problems[:10]) + more)


def lit_to_tree(state_dict: Mapping[str, np.ndarray], maps: Iterable[TensorMap], n_layer: int,
                source: str = "state dict", allow_extra: bool = False) -> dict[str, Any]:
    """A lit-llama state dict -> our nested variables (layers stacked), after validation."""
    return read_tree(lambda key: np.asarray(state_dict[key]), {k: tuple(v.shape) for k, v in state_dict.items()},
                     maps, n_layer, source, allow_extra)


def read_tree(read: Callable[[str], np.ndarray], shapes: Mapping[str, tuple[int, ...]], maps: Iterable[TensorMap],
              n_layer: int, source: str = "state dict", allow_extra: bool = False) -> dict[str, Any]:
    """Our nested variables (stacked, on the host) from external tensors fetched by `read(key)`,
    `shapes` (every key of the source) validated first. For state dicts in memory; files go
    through the streaming engine (`jaxlora.weights.engine`)."""
    maps = list(maps)
    check_state_dict(shapes, maps, n_layer, source, allow_extra)
    flat: dict[tuple[str, ...], Any] = {}
    for parts in leaf_parts(maps):
        count = n_layer if parts[0].layered else 1
        first = read_slice(read, parts, 0)
        leaf = first
        if parts[0].layered:
            leaf = np.empty((count,) + first.shape, first.dtype)
            leaf[0] = first
            for i in range(1, count):
                leaf[i] = read_slice(read, parts, i)
        flat[parts[0].path] = leaf
    return traverse_util.unflatten_dict(flat)


def leaf_parts(maps: Iterable[TensorMap]) -> list[list[TensorMap]]:
    """The maps grouped by our leaf (maps of one leaf are listed together), in table order."""
    groups: dict[tuple[str, ...], list[TensorMap]] = {}
    for m in maps:
        groups.setdefault(m.path, []).append(m)
    return list(groups.values())


def read_slice(read: Callable[[str], np.ndarray], parts: list[TensorMap], i: int) -> np.ndarray:
    """Layer i of one of our leaves (the whole leaf if unlayered) from its external tensor(s)."""
    if len(parts) == 1 and not parts[0].part:
        return parts[0].to_ours(read(parts[0].key(i)))
    out = None
    for m in parts:
        value = m.to_ours(read(m.key(i)))
        if out is None:
            out = np.zeros(m.leaf_shape, value.dtype)
        out[m.part] = value
    return out


def tree_to_lit(tree: Mapping[str, Any], maps: Iterable[TensorMap], n_layer: int) -> dict[str, np.ndarray]:
    """Our nested variables -> a flat lit-llama state dict, in lit-llama's key order."""
    flat = traverse_util.flatten_dict(dict(tree))
    out: dict[str, np.ndarray] = {}
    for m in maps:
        if m.path not in flat:
            raise StateDictError(f"variables have no {'/'.join(m.path)}")
        value = np.asarray(flat[m.path])
        if m.layered:
            if value.shape[0] != n_layer:
                raise StateDictError(f"{'/'.join(m.path)} has {value.shape[0]} layers, expected {n_layer}")
            for i, key in enumerate(m.keys(n_layer)):
                out[key] = m.to_lit(value[i][m.part])
        else:
            out[m.lit_key] = m.to_lit(value[m.part])
    return sorted_like_lit(out)


def lit_to_params(state_dict: Mapping[str, np.ndarray], config: LLaMAConfig, source: str = "state dict") -> dict:
    """A lit-llama base checkpoint -> our `params` collection."""
    return lit_to_tree(state_dict, base_maps(config), config.n_layer, source)["params"]


def params_to_lit(params: Mapping[str, Any], config: LLaMAConfig) -> dict[str, np.ndarray]:
    return tree_to_lit({"params": params}, base_maps(config), config.n_layer)


def lit_to_lora(state_dict: Mapping[str, np.ndarray], config: LLaMAConfig, lora: LoRAConfig,
                source: str = "LoRA state dict") -> dict:
    """A lit-llama LoRA file (only lora_A/lora_B keys) -> our `lora` collection."""
    return lit_to_tree(state_dict, lora_maps(config, lora), config.n_layer, source).get("lora", {})


def lora_to_lit(lora_tree: Mapping[str, Any], config: LLaMAConfig, lora: LoRAConfig,
                lit_only: bool = True) -> dict[str, np.ndarray]:
    """Our `lora` collection -> a lit-llama LoRA state dict. lit_only: refuse targets other than
    exactly q, v (what lit-llama's LoRA file means); False: any targets (reference layout)."""
    if lit_only:
        check_lit_lora_targets(lora)
    return tree_to_lit({"lora": lora_tree}, lora_maps(config, lora), config.n_layer)


def infer_config(shapes: Mapping[str, tuple[int, ...]], source: str = "checkpoint") -> LLaMAConfig:
    """The lit-llama preset whose shapes these are (by n_embd, as lit-llama), checked in full."""
    if "transformer.wte.weight" not in shapes:
        raise StateDictError(f"{source}: no 'transformer.wte.weight'; not a lit-llama checkpoint "
                             f"(first keys: {list(shapes)[:5]})")
    vocab, n_embd = shapes["transformer.wte.weight"]
    n_layer = len({k.split(".")[2] for k in shapes if k.startswith("transformer.h.")})
    for name, preset in PRESETS.items():
        cfg = LLaMAConfig.from_name(name)
        if cfg.n_embd == n_embd and cfg.n_layer == n_layer and cfg.padded_vocab_size == vocab:
            return cfg
    seen = {k: tuple(shapes[k]) for k in list(shapes)[:4]}
    raise StateDictError(f"{source}: no preset has n_embd={n_embd}, n_layer={n_layer}, vocab={vocab} "
                         f"(shapes seen: {seen}); known presets: {', '.join(PRESETS)}")


def lit_lora_config(shapes: Mapping[str, tuple[int, ...]], n_embd: int, alpha: float = 16.0,
                    dropout: float = 0.05, source: str = "LoRA file") -> LoRAConfig:
    """The LoRAConfig of a lit-llama LoRA file: targets q, v (the only ones it can mean), r read
    from layer 0's lora_B; alpha is not stored, so pass it. Any other shape is refused."""
    module = LORA_TARGETS["q"].module
    prefix = f"transformer.h.0.{_lit_module(module)}"
    a_key, b_key = f"{prefix}.lora_A", f"{prefix}.lora_B"
    if b_key not in shapes or a_key not in shapes:
        raise StateDictError(f"{source}: no {b_key!r}; not a lit-llama LoRA file (first keys: {list(shapes)[:5]})")
    other = sorted(k for k in shapes if ".lora_" in k and f".{_lit_module(module)}.lora_" not in k)
    if other:
        raise StateDictError(f"{source}: holds adapters outside attn.c_attn ({other[0]}, ...); {_LIT_LORA_WHY}, "
                             "so this is not a lit-llama LoRA file")
    (rows_a, cols_a), (rows_b, r) = tuple(shapes[a_key]), tuple(shapes[b_key])
    n = len(LIT_LORA_TARGETS)
    if (rows_b, rows_a, cols_a) != (n * n_embd, n * r, n_embd):
        raise StateDictError(f"{source}: {a_key!r} has shape {(rows_a, cols_a)} and {b_key!r} {(rows_b, r)}; "
                             f"{_LIT_LORA_WHY}, so for n_embd={n_embd} they must be ({n}r, {n_embd}) and "
                             f"({n * n_embd}, r)")
    return LoRAConfig(r=r, alpha=alpha, dropout=dropout, targets=LIT_LORA_TARGETS)


def sorted_like_lit(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """lit-llama's module order: lm_head, wte, then each layer's tensors, then ln_f."""
    def rank(key: str) -> tuple:
        if key.startswith("lm_head"):
            return (0,)
        if key.startswith("transformer.wte"):
            return (1,)
        if key.startswith("transformer.h."):
            parts = key.split(".")
            order = ["rms_1", "attn", "rms_2", "mlp"]
            sub = ["c_attn", "c_fc1", "c_fc2", "c_proj"]  # attn: c_attn, c_proj; mlp: c_fc1, c_fc2, c_proj
            leaf = ["weight", "scale", "lora_A", "lora_B"]
            return (2, int(parts[2]), order.index(parts[3]), sub.index(parts[4]) if parts[4] in sub else -1,
                    leaf.index(parts[-1]))
        return (3,)
    return {k: sd[k] for k in sorted(sd, key=rank)}
