"""Pure mapping between litgpt checkpoints (Lightning-AI's successor to lit-llama) and jaxlora.

Values are numpy arrays; nothing here imports torch or litgpt. Facts read from litgpt 0.5's own
code (litgpt/model.py, lora.py, config.py, scripts/convert_hf_checkpoint.py):

- litgpt's LLaMA computes in Hugging Face's layout: its RoPE rotates the half-split pairs
  (i, i + hs/2) (`apply_rope`; `rope_interleave: true` is another model) and its HF converter
  copies q/k/v unpermuted, so `attn.qkv.weight` is `cat([Wq, Wk, Wv])` of HF's projections
  ((n_head + 2 n_query_groups) * hs, C). Every litgpt tensor is therefore HF's (`hf.base_maps`)
  under another name, the three q/k/v projections stacked on rows in one tensor.
- Checkpoints from before litgpt's PR #1013 (March 2024) name it `attn.attn.weight` and
  interleave it per query group: [q_per_kv q heads, 1 k head, 1 v head] x n_query_groups
  (litgpt's `qkv_reassemble` undoes that). They are read; exports use the current name.
- litgpt's GPT has no tied LM head: `lm_head.weight` is always stored (its HF converter copies
  wte into it when the HF model ties them), so a tied model of ours is written with that copy.
- LoRA (`litgpt.lora`, saved by finetune/lora.py as `lit_model.pth.lora` with only the
  lora_A/lora_B tensors): `LoRAQKVLinear` on attn.qkv holds lora_A (r * n_enabled, C) = rows
  [A_q; A_k; A_v] of the enabled ones and lora_B (sum of their widths, r) = rows [B_q; B_k; B_v]
  (q n_head * hs rows, k and v n_query_groups * hs each), which are PEFT's q/k/v adapters stacked;
  `LoRALinear` on attn.proj, mlp.fc_1/fc_2/proj holds lora_A (r, in), lora_B (out, r) as PEFT's.
  Switches: lora_query/key/value -> q/k/v, lora_projection -> o, lora_mlp -> gate, up and down
  together, lora_head (an adapter on the LM head) is not something jaxlora trains.

| litgpt key (layer i)                 | HF / PEFT key it equals                               |
|--------------------------------------|-------------------------------------------------------|
| transformer.wte.weight               | model.embed_tokens.weight                             |
| transformer.h.{i}.norm_1.weight      | model.layers.{i}.input_layernorm.weight               |
| transformer.h.{i}.attn.qkv.weight    | q_proj, k_proj, v_proj .weight stacked on rows        |
| transformer.h.{i}.attn.proj.weight   | model.layers.{i}.self_attn.o_proj.weight              |
| transformer.h.{i}.norm_2.weight      | model.layers.{i}.post_attention_layernorm.weight      |
| transformer.h.{i}.mlp.fc_1 / fc_2 / proj .weight | mlp.gate_proj / up_proj / down_proj .weight |
| transformer.ln_f.weight, lm_head.weight | model.norm.weight, lm_head.weight                  |
| transformer.h.{i}.attn.qkv.lora_A    | the enabled q/k/v PEFT lora_A.weight stacked on rows  |
| transformer.h.{i}.mlp.fc_1.lora_B    | ...mlp.gate_proj.lora_B.weight (likewise the others)  |
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from jaxlora.config import LLaMAConfig, LoRAConfig
from jaxlora.errors import LitgptConfigError
from jaxlora.weights import hf
from jaxlora.weights.lit_llama import TensorMap, identity

MODEL_CONFIG = "model_config.yaml"  # litgpt's Config, as litgpt.utils.save_config writes it
LEGACY_CONFIG = "lit_config.json"  # lit-gpt's name for it (2023), same fields
BASE_FILE = "lit_model.pth"
LORA_FILE = "lit_model.pth.lora"
HYPERPARAMETERS = "hyperparameters.yaml"  # finetune/lora.py's settings: lora_*, checkpoint_dir, precision
QKV, LEGACY_QKV = "attn.qkv", "attn.attn"

# Our LoRA targets -> litgpt's module under transformer.h.{i}; its switch in litgpt.lora.Config.
LITGPT_MODULES = {"q": QKV, "k": QKV, "v": QKV, "o": "attn.proj", "gate": "mlp.fc_1", "up": "mlp.fc_2",
                  "down": "mlp.proj"}
LORA_SWITCHES = {"lora_query": ("q",), "lora_key": ("k",), "lora_value": ("v",), "lora_projection": ("o",),
                 "lora_mlp": ("gate", "up", "down")}
_TOP_KEYS = {"model.embed_tokens.weight": "transformer.wte.weight", "model.norm.weight": "transformer.ln_f.weight",
             "lm_head.weight": "lm_head.weight"}
_LAYER_KEYS = {"input_layernorm.weight": "norm_1.weight", "post_attention_layernorm.weight": "norm_2.weight",
               **{f"{hf.HF_MODULES[t]}.weight": f"{m}.weight" for t, m in LITGPT_MODULES.items()},
               **{f"{hf.HF_MODULES[t]}.{ab}.weight": f"{m}.{ab}" for t, m in LITGPT_MODULES.items()
                  for ab in ("lora_A", "lora_B")}}
_HF_LAYER = "model.layers.{i}."


# ---------------------------------------------------------------------------------------------
# model_config.yaml

# Settings our LLaMA computes only at one value: (that value, litgpt's Config default, which a
# file lacking the key means).
_REQUIRED: dict[str, tuple[Any, Any]] = {
    "norm_class_name": ("RMSNorm", "LayerNorm"), "mlp_class_name": ("LLaMAMLP", "GptNeoxMLP"),
    "parallel_residual": (False, True), "bias": (False, True), "rotary_percentage": (1.0, 0.25),
    "shared_attention_norm": (False, False), "attn_bias": (False, False), "lm_head_bias": (False, False),
    "rope_interleave": (False, False), "norm_qk": (False, False), "post_attention_norm": (False, False),
    "post_mlp_norm": (False, False), "norm_1": (True, True), "norm_2": (True, True),
    "scale_embeddings": (False, False), "sliding_window_size": (None, None),
    "attention_logit_softcapping": (None, None), "final_logit_softcapping": (None, None),
    "latent_attention": (None, None), "rope_local_base_freq": (None, None), "n_expert": (0, 0),
}
_USED = ("block_size", "n_layer", "n_embd", "vocab_size", "padded_vocab_size", "padding_multiple", "norm_eps",
         "n_head", "head_size", "n_query_groups", "attention_scores_scalar", "rope_base", "rope_condense_ratio",
         "rope_adjustments", "intermediate_size")
# No effect on a model that passes the checks above (names, MoE and per-layer details of other models).
_IGNORED = ("name", "hf_config", "org", "gelu_approximate", "norm_qk_type", "sliding_window_indices", "rope_indices",
            "moe_intermediate_size", "n_shared_expert", "n_expert_groups", "n_topk_groups", "n_topk_scores_per_group",
            "n_expert_per_token", "first_k_dense_replace", "routed_scaling_factor", "norm_topk_prob")
_ALIASES = {"_norm_class": "norm_class_name", "_mlp_class": "mlp_class_name", "condense_ratio": "rope_condense_ratio"}
LLAMA3_ROPE = ("factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len")
_DEFAULTS = {"block_size": 4096, "n_layer": 16, "n_embd": 4096, "vocab_size": 50254, "padding_multiple": 512,
             "norm_eps": 1e-5, "n_head": 32, "rope_base": 10000, "rope_condense_ratio": 1}


def config_from_litgpt(raw: Mapping[str, Any], source: str = MODEL_CONFIG) -> LLaMAConfig:
    """Our LLaMAConfig for a litgpt model_config.yaml; LitgptConfigError naming every setting our
    LLaMA does not compute (LayerNorm, parallel residual, biases, partial RoPE, YaRN, MoE, ...)."""
    cfg = {_ALIASES.get(k, k): v for k, v in raw.items() if not str(k).startswith("lora_")}

    def get(key: str) -> Any:
        value = cfg.get(key, _DEFAULTS.get(key))
        return _DEFAULTS.get(key) if value is None else value

    problems = [f"{k}={cfg.get(k, default)!r} (jaxlora's LLaMA needs {want!r})"
                for k, (want, default) in _REQUIRED.items() if cfg.get(k, default) != want]
    known = set(_REQUIRED) | set(_USED) | set(_IGNORED)
    problems += [f"{k}={v!r} (a setting this converter does not know)" for k, v in cfg.items()
                 if k not in known and v not in (None, False, 0, "", [], {})]
    if "Gemma" in str(cfg.get("name", "")):
        problems.append(f"name={cfg['name']!r} (litgpt gives a Gemma model's RMSNorm a unit offset)")
    if cfg.get("intermediate_size") is None:
        problems.append("intermediate_size missing (litgpt's LLaMAMLP needs it)")
    C, n_head = int(get("n_embd")), int(get("n_head"))
    for key in ("head_size", "attention_scores_scalar"):
        if cfg.get(key) not in (None, C // n_head):
            problems.append(f"{key}={cfg[key]} (!= n_embd / n_head = {C // n_head})")
    rope = _rope_fields(cfg, get, problems)
    if problems:
        raise LitgptConfigError(f"{source}: cannot convert this litgpt model: " + "; ".join(problems))
    vocab, multiple = int(get("vocab_size")), int(get("padding_multiple"))
    # The embedding table's rows: litgpt's vocab_size is the tokenizer's base vocabulary (Llama 3's
    # 128000), but its 256 special tokens are ids the model reads too, and train.py checks the
    # tokenizer against our vocab_size.
    padded = int(cfg.get("padded_vocab_size") or -(-vocab // multiple) * multiple)
    try:
        return LLaMAConfig(block_size=int(get("block_size")), vocab_size=padded, padded_vocab_size=padded, n_layer=int(get("n_layer")), n_head=n_head, n_embd=C,
                           n_kv_head=int(cfg.get("n_query_groups") or n_head),
                           intermediate_size=int(cfg["intermediate_size"]), norm_eps=float(get("norm_eps")), **rope)
    except ValueError as e:
        raise LitgptConfigError(f"{source}: {e}") from e


def _rope_fields(cfg: Mapping[str, Any], get: Callable[[str], Any], problems: list[str]) -> dict[str, Any]:
    """rope_* fields from rope_base, rope_adjustments (linear: factor; llama3: the four keys of
    Llama 3.1) and rope_condense_ratio (positions divided by it: linear scaling by that factor)."""
    fields: dict[str, Any] = {"rope_base": float(get("rope_base"))}
    adjust, condense = cfg.get("rope_adjustments") or {}, get("rope_condense_ratio")
    if not adjust:
        if condense != 1:
            fields.update(rope_type="linear", rope_factor=float(condense))
        return fields
    if condense != 1:
        problems.append(f"rope_condense_ratio={condense} together with rope_adjustments")
    if set(adjust) == {"factor"}:
        fields.update(rope_type="linear", rope_factor=float(adjust["factor"]))
    elif set(adjust) == set(LLAMA3_ROPE):
        fields.update(rope_type="llama3", rope_factor=float(adjust["factor"]),
                      rope_low_freq_factor=float(adjust["low_freq_factor"]),
                      rope_high_freq_factor=float(adjust["high_freq_factor"]),
                      rope_original_context=int(adjust["original_max_seq_len"]))
    else:
        problems.append(f"rope_adjustments={dict(adjust)} (supported: {{factor}} for linear scaling, "
                        f"{{{', '.join(LLAMA3_ROPE)}}} for Llama 3's; not YaRN)")
    return fields


def _plain(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def config_to_litgpt(config: LLaMAConfig, name: str = "") -> dict[str, Any]:
    """A model_config.yaml under which litgpt's GPT computes our model. Only the settings that
    differ from litgpt's Config defaults or fix the sizes, so older litgpt versions read it too.
    name: litgpt picks its chat prompt style from it (e.g. Llama-3.1-8B-Instruct)."""
    out: dict[str, Any] = {
        "name": name, "block_size": config.block_size, "vocab_size": config.vocab_size,
        "padded_vocab_size": config.padded_vocab_size, "n_layer": config.n_layer, "n_head": config.n_head,
        "n_embd": config.n_embd, "n_query_groups": config.n_kv_head, "intermediate_size": config.n_hidden, "norm_class_name": "RMSNorm", "norm_eps": config.norm_eps,
        "mlp_class_name": "LLaMAMLP", "parallel_residual": False, "bias": False, "rotary_percentage": 1.0,
        "rope_base": _plain(config.rope_base),
    }
    if config.rope_type == "linear":
        out["rope_adjustments"] = {"factor": _plain(config.rope_factor)}
    elif config.rope_type == "llama3":
        out["rope_adjustments"] = {"factor": _plain(config.rope_factor),
                                   "low_freq_factor": _plain(config.rope_low_freq_factor),
                                   "high_freq_factor": _plain(config.rope_high_freq_factor),
                                   "original_max_seq_len": config.rope_original_context}
    return out


# ---------------------------------------------------------------------------------------------
# hyperparameters.yaml (LoRA)


def lora_from_litgpt(hparams: Mapping[str, Any], source: str = HYPERPARAMETERS) -> LoRAConfig:
    """Our LoRAConfig for finetune/lora.py's hyperparameters.yaml (missing switches mean litgpt.lora.Config's
    defaults, as its merge_lora reads them); an adapter on the LM head is refused by name."""
    if hparams.get("lora_head"):
        raise LitgptConfigError(f"{source}: lora_head=true (an adapter on the LM head); jaxlora's adapters go on "
                                "q, k, v, o and the MLP only. Merge it with litgpt (litgpt merge_lora) and "
                                "convert the merged lit_model.pth instead")
    targets = [t for switch, names in LORA_SWITCHES.items() if hparams.get(switch) for t in names]
    r = int(hparams.get("lora_r") or 0)
    if not targets or r <= 0:
        raise LitgptConfigError(f"{source}: no adapters (lora_r={r}, no lora_query/key/value/projection/mlp "
                                "switch on)")
    try:
        return LoRAConfig(r=r, alpha=float(hparams.get("lora_alpha", 1)),
                          dropout=float(hparams.get("lora_dropout") or 0.0), targets=tuple(targets))
    except ValueError as e:
        raise LitgptConfigError(f"{source}: {e}") from e


def lora_to_litgpt(lora: LoRAConfig) -> dict[str, Any]:
    """The lora_* hyperparameters of litgpt.lora.Config for our adapters; LitgptConfigError when
    litgpt's switches cannot express the targets (its lora_mlp puts adapters on fc_1, fc_2 and
    proj together)."""
    mlp = LORA_SWITCHES["lora_mlp"]
    if 0 < sum(t in lora.targets for t in mlp) < len(mlp):
        raise LitgptConfigError(
            f"adapters on ({', '.join(lora.targets)}) cannot be a litgpt LoRA checkpoint: litgpt's lora_mlp switch "
            f"means adapters on all of {', '.join(mlp)} (its mlp.fc_1, fc_2 and proj). Export them merged "
            "(convert/to_litgpt.py --merged) or as a PEFT folder (convert/to_peft.py)")
    out: dict[str, Any] = {"lora_r": lora.r, "lora_alpha": _plain(lora.alpha), "lora_dropout": lora.dropout}
    out.update({switch: all(t in lora.targets for t in names) for switch, names in LORA_SWITCHES.items()})
    out["lora_head"] = False
    return out


# ---------------------------------------------------------------------------------------------
# Tensors


def litgpt_key(hf_key: str) -> str:
    """litgpt's name of an HF / PEFT LLaMA tensor (q/k/v all name the fused attn.qkv)."""
    key = hf_key.removeprefix(hf.PEFT_PREFIX)
    if key in _TOP_KEYS:
        return _TOP_KEYS[key]
    if not key.startswith(_HF_LAYER) or key[len(_HF_LAYER):] not in _LAYER_KEYS:
        raise KeyError(f"no litgpt name for {hf_key!r}")
    return "transformer.h.{i}." + _LAYER_KEYS[key[len(_HF_LAYER):]]


def stacked_rows(key: str, maps: list[TensorMap]) -> TensorMap:
    """One external tensor holding the tensors of `maps` (parts of one leaf of ours: HF's q, k,
    v) stacked on rows, in order: litgpt's fused attn.qkv weight and its LoRA matrices."""
    bounds = np.cumsum([0] + [m.lit_shape[0] for m in maps])
    first = maps[0]

    def to_ours(a: np.ndarray) -> np.ndarray:
        out = None
        for m, lo, hi in zip(maps, bounds[:-1], bounds[1:]):
            value = m.to_ours(a[lo:hi])
            if out is None:
                out = np.zeros(first.leaf_shape, value.dtype)
            out[m.part] = value
        return out

    def to_lit(ours: np.ndarray) -> np.ndarray:
        return np.concatenate([m.to_lit(ours[m.part]) for m in maps])
    return TensorMap(key, (int(bounds[-1]), *first.lit_shape[1:]), first.path, to_ours, to_lit)


def _renamed(hf_maps: list[TensorMap]) -> list[TensorMap]:
    """HF / PEFT maps under litgpt's names; maps sharing a name become one `stacked_rows` map."""
    groups: dict[str, list[TensorMap]] = {}
    for m in hf_maps:
        groups.setdefault(litgpt_key(m.lit_key), []).append(m)
    return [dataclasses.replace(g[0], lit_key=key) if len(g) == 1 else stacked_rows(key, g)
            for key, g in groups.items()]


def _group_order(config: LLaMAConfig) -> tuple[Callable, Callable]:
    """(to_plain, to_interleaved) row orders of a qkv tensor: lit-gpt's [q heads of a group, its k
    head, its v head] per query group <-> [all q; all k; all v] (litgpt's qkv_reassemble)."""
    groups, per = config.n_kv_head, config.n_head // config.n_kv_head
    hs = config.head_size

    def to_plain(a: np.ndarray) -> np.ndarray:
        g = a.reshape(groups, per + 2, hs, -1)
        return np.concatenate([g[:, :per].reshape(-1, a.shape[1]), g[:, per].reshape(-1, a.shape[1]),
                               g[:, per + 1].reshape(-1, a.shape[1])])

    def to_interleaved(a: np.ndarray) -> np.ndarray:
        q = a[:config.n_embd].reshape(groups, per, hs, -1)
        k, v = (a[config.n_embd + j * config.kv_size:][:config.kv_size].reshape(groups, 1, hs, -1) for j in (0, 1))
        return np.concatenate([q, k, v], axis=1).reshape(a.shape)
    return to_plain, to_interleaved


def _legacy(m: TensorMap, config: LLaMAConfig) -> TensorMap:
    to_plain, to_interleaved = _group_order(config)
    return dataclasses.replace(m, lit_key=m.lit_key.replace(f".{QKV}.", f".{LEGACY_QKV}."),
                               to_ours=lambda a: m.to_ours(to_plain(a)), to_lit=lambda o: to_interleaved(m.to_lit(o)))


def base_maps(config: LLaMAConfig, legacy: bool = False) -> list[TensorMap]:
    """The frozen weights: a litgpt lit_model.pth <-> our `params`. A tied model of ours gets
    lm_head.weight as a copy of wte (for writing; litgpt models read in are never tied).
    legacy: lit-gpt's interleaved attn.attn.weight instead of attn.qkv.weight."""
    maps = _renamed(hf.base_maps(config))
    if config.tie_embeddings:
        C, V = config.n_embd, config.padded_vocab_size
        maps.append(TensorMap("lm_head.weight", (V, C), ("params", "wte", "embedding"), identity, identity))
    return [_legacy(m, config) if legacy and f".{QKV}." in m.lit_key else m for m in maps]


def lora_maps(config: LLaMAConfig, lora: LoRAConfig) -> list[TensorMap]:
    """The adapters: litgpt's lit_model.pth.lora <-> our `lora` (targets litgpt can express)."""
    lora_to_litgpt(lora)
    return _renamed(hf.peft_maps(config, lora))


_BLOCK_ORDER = ("norm_1", QKV, LEGACY_QKV, "attn.proj", "norm_2", "mlp.fc_1", "mlp.fc_2", "mlp.proj")
_LEAF_ORDER = ("weight", "lora_A", "lora_B")


def litgpt_order(entries: dict[str, Any]) -> dict[str, Any]:
    """litgpt's state_dict order: lm_head, wte, each block's modules in order, ln_f."""
    def rank(key: str) -> tuple:
        if key.startswith("transformer.h."):
            _, _, layer, rest = key.split(".", 3)
            module, leaf = rest.rsplit(".", 1)
            return (2, int(layer), _BLOCK_ORDER.index(module), _LEAF_ORDER.index(leaf))
        return (0,) if key.startswith("lm_head") else (1,) if key.startswith("transformer.wte") else (3,)
    return {k: entries[k] for k in sorted(entries, key=rank)}

