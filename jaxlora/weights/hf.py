"""Pure mapping between Hugging Face LLaMA / PEFT LoRA state dicts and jaxlora variable trees.

Values are numpy arrays; nothing here imports torch, transformers or peft. The tensors are
described by the `TensorMap` table of `jaxlora.weights.lit_llama` (an HF key per tensor, its
shape, its place in our tree, the exact transforms both ways), so the same streaming engine,
`tree_to_lit` and `check_state_dict` serve HF as they serve lit-llama. HF's separate q/k/v
projections each fill a `part` of our fused c_attn kernel (`layouts.qkv_columns`: [0, C),
[C, C + kv), [C + kv, C + 2kv), kv = n_kv_head * head_size; kv = C without grouped-query
attention). LlamaForCausalLM and MistralForCausalLM (without a sliding window) map alike; a
model with tied embeddings has no lm_head.weight.

RoPE: HF's Llama rotates the half-split pairs (i, i + hs/2) where we (as lit-llama and Meta)
rotate adjacent pairs (2i, 2i+1), so the output rows of Wq and Wk, and of the q/k LoRA B
matrices, are permuted within each head (../shared/docs/lit-llama-format.md); Wv, Wo and all
LoRA A matrices are not.

| HF / PEFT key (layer i)                                        | HF shape | ours                                    |
|----------------------------------------------------------------|----------|-----------------------------------------|
| model.embed_tokens.weight                                      | (V, C)   | params/wte/embedding                    |
| model.layers.{i}.self_attn.q_proj.weight (k, v: (kv, C))       | (C, C)   | params/h/attn/c_attn/kernel[i][:, 0:C]  |
| model.layers.{i}.mlp.gate_proj.weight (up, down, o_proj alike) | (H, C)   | params/h/mlp/c_fc1/kernel[i]            |
| model.layers.{i}.input_layernorm.weight                        | (C,)     | params/h/rms_1/scale[i]                 |
| lm_head.weight                                                 | (V, C)   | params/lm_head/kernel (C, V)            |
| base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight | (r, C) | lora/h/attn/c_attn/lora_A[i][g]         |
| base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight | (C, r) | lora/h/attn/c_attn/lora_B[i][g]         |

(g: the target's place among the enabled q/k/v targets; k and v permute their rows within
n_kv_head heads, and their lora_B fills the leading kv columns of a slice as wide as q's.)
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import numpy as np

from jaxlora.config import ALL_TARGETS, LORA_TARGETS, ROPE_TYPES, TARGET_MODULES, LLaMAConfig, LoRAConfig
from jaxlora.errors import HFConfigError
from jaxlora.model.layouts import qkv_columns
from jaxlora.weights.lit_llama import TensorMap, identity, transpose

_HF_SECTION = {"attn": "self_attn", "mlp": "mlp"}  # our block's sections -> HF's LlamaDecoderLayer's
# Our LoRA target -> the HF/PEFT module under model.layers.{i} (PEFT's target_modules are the
# last component, config.LORA_TARGETS' peft_name).
HF_MODULES: dict[str, str] = {name: f"{_HF_SECTION[t.module[0]]}.{t.peft_name}" for name, t in LORA_TARGETS.items()}
ROPE_TARGETS = ("q", "k")  # their output rows follow HF's half-split RoPE order
PEFT_PREFIX = "base_model.model."  # PEFT's keys: the HF model's keys under PeftModel.base_model
NORM_EPS = 1e-5  # RMSNorm's epsilon when config.json gives none (lit-llama's)
ROPE_THETA = 10000.0  # RoPE's base when config.json gives none


# ---------------------------------------------------------------------------------------------
# Model config


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> LLaMAConfig:
    """Our LLaMAConfig for an HF LlamaForCausalLM or MistralForCausalLM config.json; raise
    HFConfigError naming every field we cannot reproduce exactly (never a silently different model)."""
    def get(name: str, default: Any = None) -> Any:
        value = hf.get(name, default)
        return default if value is None else value

    missing = [k for k in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
                           "intermediate_size") if k not in hf]
    if missing:
        raise HFConfigError(f"{source}: no {', '.join(missing)}; not an HF LLaMA config.json")
    C, n_head, n_layer = int(hf["hidden_size"]), int(hf["num_attention_heads"]), int(hf["num_hidden_layers"])
    problems = _unsupported(hf, get, C, n_head)
    rope = _rope_fields(hf, get, problems)
    V = int(hf["vocab_size"])
    if problems:
        raise HFConfigError(f"{source}: cannot convert: " + "; ".join(problems))
    try:
        return LLaMAConfig(block_size=int(get("max_position_embeddings", 2048)), vocab_size=V,
                           padded_vocab_size=V, n_layer=n_layer, n_head=n_head, n_embd=C,
                           n_kv_head=int(get("num_key_value_heads", n_head)),
                           intermediate_size=int(hf["intermediate_size"]),
                           norm_eps=float(get("rms_norm_eps", NORM_EPS)),
                           tie_embeddings=bool(get("tie_word_embeddings", False)), **rope)
    except ValueError as e:
        raise HFConfigError(f"{source}: {e}") from e


MODEL_TYPES = ("llama", "mistral")  # both compute the same function (Mistral without a sliding window)
ROPE_KEYS = {"factor": "rope_factor", "low_freq_factor": "rope_low_freq_factor",
             "high_freq_factor": "rope_high_freq_factor", "original_max_position_embeddings": "rope_original_context"}


def _unsupported(hf: Mapping[str, Any], get: Callable[..., Any], C: int, n_head: int) -> list[str]:
    """The architecture settings of an HF config.json that our LLaMA does not compute."""
    problems = []
    if get("model_type", "llama") not in MODEL_TYPES:
        problems.append(f"model_type {hf['model_type']!r} (supported: {', '.join(MODEL_TYPES)})")
    if get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {hf['hidden_act']!r} (only 'silu')")
    if get("sliding_window") is not None and get("use_sliding_window", True):
        problems.append(f"sliding_window={hf['sliding_window']} (sliding-window attention is not supported; "
                        "Mistral-7B v0.2 and later have none)")
    for flag in ("attention_bias", "mlp_bias"):
        if get(flag, False):
            problems.append(f"{flag}=true (no biases)")
    if get("head_dim", C // n_head) != C // n_head:
        problems.append(f"head_dim {hf['head_dim']} (!= hidden_size / num_attention_heads = {C // n_head})")
    return problems


def _rope_fields(hf: Mapping[str, Any], get: Callable[..., Any], problems: list[str]) -> dict[str, Any]:
    """Our rope_* fields from rope_parameters (transformers >= 5) or rope_theta + rope_scaling
    (older files); an unsupported scaling is added to `problems`."""
    scaling, parameters = dict(get("rope_scaling", {})), dict(get("rope_parameters", {}))
    kinds = {d.get("rope_type", d.get("type", "default")) for d in (scaling, parameters)} - {"default"}
    if len(kinds) > 1:
        problems.append(f"rope_scaling {scaling} and rope_parameters {parameters} disagree")
    kind = min(kinds, default="default")
    params = {**scaling, **parameters, "rope_type": kind}
    fields: dict[str, Any] = {"rope_base": float(get("rope_theta", params.get("rope_theta", ROPE_THETA)))}
    if kind not in ROPE_TYPES:
        problems.append(f"rope scaling {kind!r} ({params}; supported: {', '.join(ROPE_TYPES)})")
        return fields
    fields["rope_type"] = kind
    if kind == "default":
        return fields
    if "factor" not in params:
        problems.append(f"rope scaling {kind!r} without a factor ({params})")
    keys = ROPE_KEYS if kind == "llama3" else {"factor": ROPE_KEYS["factor"]}
    # HF's default for the original context of llama3 RoPE: max_position_embeddings
    params.setdefault("original_max_position_embeddings", get("max_position_embeddings", 2048))
    lacking = [k for k in keys if k not in params]
    if lacking and kind == "llama3":
        problems.append(f"llama3 rope scaling without {', '.join(lacking)}")
    fields.update({ours: params[theirs] for theirs, ours in keys.items() if theirs in params})
    fields["rope_original_context"] = int(fields.get("rope_original_context", 8192))
    return fields


def config_to_hf(config: LLaMAConfig, dtype: str = "float32") -> dict[str, Any]:
    """An HF config.json for LlamaForCausalLM computing our model (transformers 4 and 5 read it)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": config.n_embd, "intermediate_size": config.n_hidden,
        "num_attention_heads": config.n_head, "num_key_value_heads": config.n_kv_head,
        "num_hidden_layers": config.n_layer, "head_dim": config.head_size,
        "vocab_size": config.padded_vocab_size, "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_base, "rope_scaling": rope_to_hf(config),
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": dtype, "dtype": dtype,
    }


def rope_to_hf(config: LLaMAConfig) -> dict[str, Any] | None:
    """HF's rope_scaling for our RoPE (None: unscaled)."""
    if config.rope_type == "default":
        return None
    out: dict[str, Any] = {"rope_type": config.rope_type, "factor": config.rope_factor}
    if config.rope_type == "llama3":
        out.update(low_freq_factor=config.rope_low_freq_factor, high_freq_factor=config.rope_high_freq_factor,
                   original_max_position_embeddings=config.rope_original_context)
    return out


# ---------------------------------------------------------------------------------------------
# Tensors


def _rows_to_interleaved(n_head: int) -> Callable[[np.ndarray], np.ndarray]:
    """HF's half-split row order within each head -> adjacent pairs (ours), for (n_head*hs, X)."""
    def permute(a: np.ndarray) -> np.ndarray:
        hs = a.shape[0] // n_head
        return a.reshape(n_head, 2, hs // 2, -1).swapaxes(1, 2).reshape(a.shape)
    return permute


def _rows_to_half_split(n_head: int) -> Callable[[np.ndarray], np.ndarray]:
    """The inverse of _rows_to_interleaved."""
    def permute(a: np.ndarray) -> np.ndarray:
        hs = a.shape[0] // n_head
        return a.reshape(n_head, hs // 2, 2, -1).swapaxes(1, 2).reshape(a.shape)
    return permute


def _transforms(target: str, config: LLaMAConfig) -> tuple[Callable, Callable]:
    """(to_ours, to_hf) of an output-rows (out, X) HF matrix: transposed, q/k rows re-ordered
    within each of their heads (n_head for q, n_kv_head for k)."""
    if target not in ROPE_TARGETS:
        return transpose, transpose
    heads = config.n_head if target == "q" else config.n_kv_head
    to_interleaved, to_half = _rows_to_interleaved(heads), _rows_to_half_split(heads)
    return (lambda a: transpose(to_interleaved(a))), (lambda a: np.ascontiguousarray(to_half(transpose(a))))


def our_module(target: str) -> tuple[tuple[str, ...], int | None]:
    """Our module under h for a target, and for q/k/v its output group in the fused c_attn."""
    t = LORA_TARGETS[target]
    return t.module, t.group


def _out_in(target: str, config: LLaMAConfig) -> tuple[int, int]:
    """(out, in) features of the HF projection of `target`."""
    module, group = our_module(target)
    return config.segments(module)[group or 0], config.dense_shapes()[module][0]


def base_maps(config: LLaMAConfig) -> list[TensorMap]:
    """The frozen weights: HF LlamaForCausalLM state dict <-> our `params` (no lm_head.weight
    when the embeddings are tied: HF's save_pretrained leaves it out)."""
    C, V = config.n_embd, config.padded_vocab_size
    maps = [
        TensorMap("model.embed_tokens.weight", (V, C), ("params", "wte", "embedding"), identity, identity),
        TensorMap("model.norm.weight", (C,), ("params", "ln_f", "scale"), identity, identity),
    ]
    if not config.tie_embeddings:
        maps.append(TensorMap("lm_head.weight", (V, C), ("params", "lm_head", "kernel"), transpose, transpose))
    for hf_name, norm in (("input_layernorm", "rms_1"), ("post_attention_layernorm", "rms_2")):
        maps.append(TensorMap(f"model.layers.{{i}}.{hf_name}.weight", (C,), ("params", "h", norm, "scale"),
                              identity, identity))
    columns = qkv_columns(config)
    for target in ALL_TARGETS:
        module, group = our_module(target)
        out_f, in_f = _out_in(target, config)
        part, leaf_shape = ((), None) if group is None else \
            ((slice(None), slice(*columns[target])), config.dense_shapes()[module])
        maps.append(TensorMap(f"model.layers.{{i}}.{HF_MODULES[target]}.weight", (out_f, in_f),
                              ("params", "h", *module, "kernel"), *_transforms(target, config), part, leaf_shape))
    return maps


def peft_maps(config: LLaMAConfig, lora: LoRAConfig) -> list[TensorMap]:
    """The adapters: PEFT's adapter_model.safetensors <-> our `lora` collection. A q/k/v
    target's lora_B fills the leading columns of its slice of our lora_B, which is as wide as
    the widest enabled segment (q under grouped-query attention; see MergedLoRADense)."""
    r = lora.r
    if not r:
        return []
    maps = []
    for target in lora.targets:
        module, group = our_module(target)
        enabled = [t.name for t in TARGET_MODULES[module] if t.name in lora.targets]  # its adapters' groups
        g, n = (enabled.index(target), len(enabled)) if group is not None else (0, 1)
        out_f, in_f = _out_in(target, config)
        width = max(_out_in(t, config)[0] for t in enabled) if group is not None else out_f
        key = f"{PEFT_PREFIX}model.layers.{{i}}.{HF_MODULES[target]}"
        maps += [
            TensorMap(f"{key}.lora_A.weight", (r, in_f), ("lora", "h", *module, "lora_A"), transpose, transpose,
                      (g,), (n, in_f, r)),
            TensorMap(f"{key}.lora_B.weight", (out_f, r), ("lora", "h", *module, "lora_B"),
                      *_transforms(target, config), (g, slice(None), slice(0, out_f)), (n, r, width)),
        ]
    return maps


# ---------------------------------------------------------------------------------------------
# PEFT's adapter_config.json

_PEFT_MODULES = {module.split(".")[-1]: target for target, module in HF_MODULES.items()}
# Settings we cannot express: each must be absent, null, false or empty (and bias "none").
_PEFT_UNSUPPORTED = ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "fan_in_fan_out",
                     "layers_to_transform", "lora_bias", "trainable_token_indices", "target_parameters",
                     "layer_replication", "use_qalora", "exclude_modules")


def lora_from_peft(adapter_config: Mapping[str, Any], source: str = "adapter_config.json") -> LoRAConfig:
    """Our LoRAConfig for a PEFT LoRA adapter_config.json; rsLoRA (scaling alpha/sqrt(r)) becomes
    the alpha giving the same scaling under ours (alpha/r). Raises HFConfigError naming anything
    we do not support."""
    if adapter_config.get("peft_type", "LORA") != "LORA":
        raise HFConfigError(f"{source}: peft_type {adapter_config['peft_type']!r}; only LORA adapters are supported")
    problems = [f"{name}={adapter_config[name]!r} (not supported)" for name in _PEFT_UNSUPPORTED
                if adapter_config.get(name)]
    if adapter_config.get("bias", "none") not in ("none", None):
        problems.append(f"bias={adapter_config['bias']!r} (only 'none')")
    modules = adapter_config.get("target_modules")
    if modules == "all-linear":
        targets = list(ALL_TARGETS)
    elif isinstance(modules, (list, tuple)) and modules:
        names = [str(m).split(".")[-1] for m in modules]
        unknown = [m for m, name in zip(modules, names) if name not in _PEFT_MODULES]
        if unknown:
            problems.append(f"target_modules {unknown} (supported: {sorted(_PEFT_MODULES)})")
        # PEFT writes 'all-linear' out as full module paths, one per layer: keep the projection names
        targets = list(dict.fromkeys(_PEFT_MODULES[n] for n in names if n in _PEFT_MODULES))
    else:
        problems.append(f"target_modules {modules!r} (need a list of module names or 'all-linear')")
        targets = []
    if problems:
        raise HFConfigError(f"{source}: cannot convert: " + "; ".join(problems))
    r, alpha = int(adapter_config["r"]), float(adapter_config["lora_alpha"])
    if adapter_config.get("use_rslora", False):
        alpha = alpha * math.sqrt(r)  # ours: alpha' / r == alpha / sqrt(r)
    try:
        return LoRAConfig(r=r, alpha=alpha, dropout=float(adapter_config.get("lora_dropout", 0.0)),
                          targets=tuple(targets))
    except ValueError as e:
        raise HFConfigError(f"{source}: {e}") from e


def peft_config(lora: LoRAConfig, base_model_name_or_path: str | None = None,
                use_rslora: bool = False) -> dict[str, Any]:
    """PEFT's adapter_config.json for our adapters; use_rslora writes lora_alpha = alpha/sqrt(r)
    with use_rslora true (the same scaling)."""
    alpha = lora.alpha / math.sqrt(lora.r) if use_rslora else lora.alpha
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": lora.r, "lora_alpha": alpha, "lora_dropout": lora.dropout,
        "target_modules": [HF_MODULES[t].split(".")[-1] for t in lora.targets],
        "fan_in_fan_out": False, "bias": "none", "use_rslora": use_rslora, "use_dora": False,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True,
        "layers_to_transform": None, "layers_pattern": None, "inference_mode": True, "revision": None,
    }
