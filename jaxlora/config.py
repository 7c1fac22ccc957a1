"""Model and adapter configuration.

`LLaMAConfig` mirrors lit-llama's config (same field names, same presets, same padded-vocab
and MLP-width formulas), so a lit-llama checkpoint and a jaxlora checkpoint describe the
same network. `LoRAConfig` holds the adapter hyper-parameters with lit-llama's defaults.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

# What a training run leaves in its --out_dir (train.py writes them, generate.py and the converters read them).
ADAPTERS_DIR = "adapters"  # the final adapters as an adapters-only jaxlora directory
LIT_LORA_FILE = "lit-llama-lora-finetuned.pth"  # lit-llama's LoRA file (generate/lora.py loads it)
PEFT_DIR = "peft"  # the final adapters as a PEFT LoRA folder (HF transformers, vLLM)
LITGPT_LORA_DIR = "litgpt-lora"  # and as a litgpt LoRA checkpoint, when the base is a litgpt directory


# Decoding's run layout of a block's MLP input kernels: gate (c_fc1) and up (c_fc2) as one kernel
# (C, 2, H) under this module path, read in one product (jaxlora.model.layouts.fuse_gate_up).
FUSED_GATE_UP = ("mlp", "c_fc")
GATE_UP = ("c_fc1", "c_fc2")  # the modules under "mlp" whose kernels it holds, in its order


def find_multiple(n: int, k: int) -> int:
    """Smallest multiple of k that is >= n (lit-llama's helper)."""
    return n if n % k == 0 else n + k - (n % k)


@dataclass(frozen=True)
class LLaMAConfig:
    """Architecture of a LLaMA model, as lit-llama's `LLaMAConfig`."""

    block_size: int = 2048
    vocab_size: int = 32000
    padded_vocab_size: int | None = None
    n_layer: int = 32
    n_head: int = 32
    n_embd: int = 4096
    norm_eps: float = 1e-5  # RMSNorm's epsilon: lit-llama's (fixed there); HF LLaMA-1 ports use 1e-6
    rope_base: float = 10000.0  # RoPE's theta: lit-llama's (fixed there); CodeLlama uses 1e6
    # Fields lit-llama does not have (LLaMA 2/3, Mistral). Their defaults are LLaMA-1's, so a
    # config.json written before they existed describes the same model.
    n_kv_head: int | None = None  # key/value heads (grouped-query attention); None: n_head; 1: multi-query
    intermediate_size: int | None = None  # MLP width; None: lit-llama's formula (see n_hidden)
    rope_type: str = "default"  # "default", "linear" or "llama3" (the scaled RoPE of Llama 3.1+)
    rope_factor: float = 1.0  # linear and llama3: how much the context is stretched
    rope_low_freq_factor: float = 1.0  # llama3 only, as HF's rope_scaling
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_context: int = 8192  # llama3 only: original_max_position_embeddings
    tie_embeddings: bool = False  # the LM head reads the token embedding table (Llama 3.2 1B/3B)

    def __post_init__(self) -> None:
        if self.padded_vocab_size is None:
            object.__setattr__(self, "padded_vocab_size", find_multiple(self.vocab_size, 64))
        if self.n_kv_head is None:
            object.__setattr__(self, "n_kv_head", self.n_head)
        if self.intermediate_size is None:  # resolved here, so equal models have equal configs
            object.__setattr__(self, "intermediate_size", find_multiple(int(2 * 4 * self.n_embd / 3), 256))
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.head_size % 2:
            raise ValueError(f"head size {self.head_size} must be even for RoPE")
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head} "
                             "(grouped-query attention: each key/value head serves n_head / n_kv_head query heads)")
        self._check_rope()

    def _check_rope(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type {self.rope_type!r} is not supported; known: {', '.join(ROPE_TYPES)}")
        if self.rope_factor <= 0:
            raise ValueError(f"rope_factor must be > 0, got {self.rope_factor}")
        if self.rope_type == "llama3" and not self.rope_low_freq_factor < self.rope_high_freq_factor:
            raise ValueError(f"llama3 RoPE needs rope_low_freq_factor < rope_high_freq_factor, got "
                             f"{self.rope_low_freq_factor} and {self.rope_high_freq_factor}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_size(self) -> int:
        """Width of the k (and of the v) projection: n_kv_head * head_size (n_embd without GQA)."""
        return self.n_kv_head * self.head_size

    @property
    def n_hidden(self) -> int:
        """SwiGLU width: intermediate_size, by default lit-llama's 2/3 of 4*n_embd rounded up to
        a multiple of 256."""
        return self.intermediate_size

    @property
    def is_llama1(self) -> bool:
        """Whether lit-llama's network computes this model (what a lit-llama file can hold)."""
        return not self.llama1_differences()

    def llama1_differences(self) -> list[str]:
        """What lit-llama's LLaMA (MHA, plain RoPE, separate head, its MLP formula) cannot express."""
        out = []
        if self.n_kv_head != self.n_head:
            out.append(f"grouped-query attention (n_kv_head={self.n_kv_head}, n_head={self.n_head})")
        if self.rope_type != "default":
            out.append(f"scaled RoPE (rope_type={self.rope_type!r})")
        if self.tie_embeddings:
            out.append("tied input/output embeddings")
        if self.n_hidden != find_multiple(int(2 * 4 * self.n_embd / 3), 256):
            out.append(f"MLP width {self.n_hidden} (lit-llama's formula gives "
                       f"{find_multiple(int(2 * 4 * self.n_embd / 3), 256)})")
        return out

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "LLaMAConfig":
        """A preset by name (case-insensitive: '7B', '7b', 'tiny', ...)."""
        key = {k.lower(): k for k in PRESETS}.get(name.lower())
        if key is None:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[key], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LLaMAConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown LLaMAConfig fields {sorted(unknown)}")
        return cls(**d)

    def dense_shapes(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(in, out) features of each dense layer of a block, by its module path in our tree."""
        C, H = self.n_embd, self.n_hidden
        return {("attn", "c_attn"): (C, C + 2 * self.kv_size), ("attn", "c_proj"): (C, C),
                ("mlp", "c_fc1"): (C, H), ("mlp", "c_fc2"): (C, H), ("mlp", "c_proj"): (H, C)}

    def segments(self, module: tuple[str, ...]) -> tuple[int, ...]:
        """Output widths of the segments of our dense layer `module` (q, k, v for the fused c_attn)."""
        return segment_widths(module, *self.dense_shapes()[tuple(module)])

    def num_params(self) -> int:
        """Frozen parameter count, from shapes alone (no allocation)."""
        C, V, L = self.n_embd, self.padded_vocab_size, self.n_layer
        per_layer = 2 * C + sum(i * o for i, o in self.dense_shapes().values())
        return (1 if self.tie_embeddings else 2) * V * C + L * per_layer + C


ROPE_TYPES = ("default", "linear", "llama3")

# Llama 3.1 / 3.2's scaled RoPE (their config.json's rope_scaling), and the shared 128k vocabulary.
_LLAMA3_ROPE = dict(rope_base=500000.0, rope_type="llama3", rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                    rope_original_context=8192, vocab_size=128256, block_size=131072)
_LLAMA2 = dict(vocab_size=32000, block_size=4096)

# lit-llama's presets (lit_llama/model.py llama_configs), the later LLaMA-architecture models
# (from their HF config.json files), and small ones for tests and demos.
PRESETS: dict[str, dict[str, Any]] = {
    "7B": dict(n_layer=32, n_head=32, n_embd=4096),
    "13B": dict(n_layer=40, n_head=40, n_embd=5120),
    "30B": dict(n_layer=60, n_head=52, n_embd=6656),
    "65B": dict(n_layer=80, n_head=64, n_embd=8192),
    "llama2-7b": dict(n_layer=32, n_head=32, n_embd=4096, intermediate_size=11008, **_LLAMA2),
    "llama2-13b": dict(n_layer=40, n_head=40, n_embd=5120, intermediate_size=13824, **_LLAMA2),
    "llama2-70b": dict(n_layer=80, n_head=64, n_kv_head=8, n_embd=8192, intermediate_size=28672, **_LLAMA2),
    "llama3.1-8b": dict(n_layer=32, n_head=32, n_kv_head=8, n_embd=4096, intermediate_size=14336,
                        rope_factor=8.0, **_LLAMA3_ROPE),
    "llama3.1-70b": dict(n_layer=80, n_head=64, n_kv_head=8, n_embd=8192, intermediate_size=28672,
                         rope_factor=8.0, **_LLAMA3_ROPE),
    "llama3.2-1b": dict(n_layer=16, n_head=32, n_kv_head=8, n_embd=2048, intermediate_size=8192,
                        rope_factor=32.0, tie_embeddings=True, **_LLAMA3_ROPE),
    "llama3.2-3b": dict(n_layer=28, n_head=24, n_kv_head=8, n_embd=3072, intermediate_size=8192,
                        rope_factor=32.0, tie_embeddings=True, **_LLAMA3_ROPE),
    # Mistral-7B v0.3 (v0.2 alike with vocab 32000; v0.1 has a sliding window, which we do not support)
    "mistral-7b": dict(n_layer=32, n_head=32, n_kv_head=8, n_embd=4096, intermediate_size=14336,
                       vocab_size=32768, block_size=32768, rope_base=1000000.0),
    # Small shapes: not lit-llama presets; vocab sized for the shipped demo tokenizer.
    "tiny": dict(n_layer=2, n_head=4, n_embd=64, vocab_size=128, block_size=256),
    "demo": dict(n_layer=4, n_head=4, n_embd=128, vocab_size=1024, block_size=256),
}


@dataclass(frozen=True)
class LoRATarget:
    """One projection that can carry a LoRA adapter: where it lives in each naming scheme."""

    name: str  # ours: what --lora_targets and LoRAConfig.targets say
    module: tuple[str, str]  # the dense layer under a block of our tree, e.g. ("attn", "c_attn")
    group: int | None  # segment of the fused c_attn output (q=0, k=1, v=2); None: the whole layer
    peft_name: str  # the HF/PEFT module name (target_modules)
    lit_module: str  # lit-llama's module under transformer.h.{i}


# The one table of adapter targets. q/k/v are segments of the fused c_attn projection
# (lit-llama's MergedLinear enable_lora); the others are whole layers (lit-llama issue #350).
LORA_TARGETS: dict[str, LoRATarget] = {t.name: t for t in (
    LoRATarget("q", ("attn", "c_attn"), 0, "q_proj", "attn.c_attn"),
    LoRATarget("k", ("attn", "c_attn"), 1, "k_proj", "attn.c_attn"),
    LoRATarget("v", ("attn", "c_attn"), 2, "v_proj", "attn.c_attn"),
    LoRATarget("o", ("attn", "c_proj"), None, "o_proj", "attn.c_proj"),
    LoRATarget("gate", ("mlp", "c_fc1"), None, "gate_proj", "mlp.c_fc1"),
    LoRATarget("up", ("mlp", "c_fc2"), None, "up_proj", "mlp.c_fc2"),
    LoRATarget("down", ("mlp", "c_proj"), None, "down_proj", "mlp.c_proj"),
)}
ALL_TARGETS = tuple(LORA_TARGETS)
QKV_TARGETS = tuple(name for name, t in LORA_TARGETS.items() if t.group is not None)
# The modules that carry adapters, in table order; each maps to its targets in group order.
TARGET_MODULES: dict[tuple[str, str], tuple[LoRATarget, ...]] = {
    module: tuple(sorted((t for t in LORA_TARGETS.values() if t.module == module), key=lambda t: t.group or 0))
    for module in dict.fromkeys(t.module for t in LORA_TARGETS.values())}


def segment_widths(module: tuple[str, ...], in_features: int, out_features: int) -> tuple[int, ...]:
    """Output widths of the segments of our dense layer `module` of shape (in, out), from the
    shape alone: the fused c_attn is [q | k | v], q as wide as the input (n_embd), k and v the
    rest in halves (n_kv_head * head_size each); the other layers are one segment."""
    n = len(TARGET_MODULES.get(tuple(module), (None,)))
    if n == 1:
        return (out_features,)
    kv = (out_features - in_features) // 2
    if n != 3 or kv <= 0 or in_features + 2 * kv != out_features:
        raise ValueError(f"{'/'.join(module)}: shape ({in_features}, {out_features}) is not a fused q/k/v kernel")
    return (in_features, kv, kv)


@dataclass(frozen=True)
class LoRAConfig:
    """Adapter hyper-parameters; defaults are lit-llama's finetune/lora.py."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = field(default=("q", "v"))

    def __post_init__(self) -> None:
        targets = tuple(self.targets)
        bad = [t for t in targets if t not in ALL_TARGETS]
        if bad:
            raise ValueError(f"unknown LoRA targets {bad}; choose from {ALL_TARGETS}")
        if len(set(targets)) != len(targets):
            raise ValueError(f"duplicate LoRA targets in {targets}")
        if self.r < 0:
            raise ValueError(f"LoRA r must be >= 0, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        # Canonical order, so configs compare equal whatever order the user typed.
        object.__setattr__(self, "targets", tuple(t for t in ALL_TARGETS if t in targets))

    @property
    def scaling(self) -> float:
        return self.alpha / self.r if self.r > 0 else 0.0

    def enabled(self, module: tuple[str, ...]) -> tuple[bool, ...]:
        """Per output segment of our dense layer `module` (e.g. ("attn", "c_attn")), whether it
        carries an adapter: (q, k, v) for the fused c_attn (lit-llama's enable_lora), else one flag."""
        targets = TARGET_MODULES.get(tuple(module))
        if targets is None:
            raise ValueError(f"{'/'.join(module)} is not a LoRA target module; known: "
                             f"{', '.join('/'.join(m) for m in TARGET_MODULES)}")
        return tuple(self.r > 0 and t.name in self.targets for t in targets)

    @property
    def qkv_enabled(self) -> tuple[bool, ...]:
        """lit-llama's enable_lora flags for the fused q/k/v projection."""
        return self.enabled(LORA_TARGETS["q"].module)

    def num_params(self, config: LLaMAConfig) -> int:
        """Trainable adapter parameter count, from shapes alone."""
        shapes = config.dense_shapes()
        per_layer = 0
        for t in LORA_TARGETS.values():
            if t.name in self.targets:
                width = config.segments(t.module)[t.group or 0]
                per_layer += self.r * (shapes[t.module][0] + width)  # A, and B of its segment
        return config.n_layer * per_layer

    def to_dict(self) -> dict[str, Any]:
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoRAConfig":
        return cls(r=d["r"], alpha=d["alpha"], dropout=d["dropout"], targets=tuple(d["targets"]))


def parse_targets(spec: str) -> tuple[str, ...]:
    """'q,v' -> ('q', 'v'); also accepts 'all' and PEFT module names (q_proj, gate_proj ...)."""
    if spec.strip().lower() == "all":
        return ALL_TARGETS
    aliases = {t.peft_name: t.name for t in LORA_TARGETS.values()}
    return tuple(aliases.get(t.strip(), t.strip()) for t in spec.split(",") if t.strip())


def dump_json(config: LLaMAConfig, lora: LoRAConfig | None, base: str | None = None,
              quantized: dict[str, str] | None = None) -> str:
    """The config.json stored beside jaxlora checkpoints (`base`: for adapters saved without
    their frozen weights, where those came from; `quantized`: {"mode", "dtype"}: frozen weights
    stored quantized, or adapters trained on a base quantized so, from weights of that dtype)."""
    data = {"model": config.to_dict(), "lora": lora.to_dict() if lora else None}
    if base is not None:
        data["base"] = base
    if quantized is not None:
        data["quantized"] = dict(quantized)
    return json.dumps(data, indent=2)
