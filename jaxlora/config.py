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

    def __post_init__(self) -> None:
        if self.padded_vocab_size is None:
            object.__setattr__(self, "padded_vocab_size", find_multiple(self.vocab_size, 64))
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.head_size % 2:
            raise ValueError(f"head size {self.head_size} must be even for RoPE")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_hidden(self) -> int:
        """SwiGLU width: 2/3 of 4*n_embd, rounded up to a multiple of 256 (lit-llama)."""
        return find_multiple(int(2 * 4 * self.n_embd / 3), 256)

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

    def num_params(self) -> int:
        """Frozen parameter count, from shapes alone (no allocation)."""
        C, H, V, L = self.n_embd, self.n_hidden, self.padded_vocab_size, self.n_layer
        per_layer = 2 * C + 3 * C * C + C * C + 3 * C * H
        return 2 * V * C + L * per_layer + C


# lit-llama's presets (lit_llama/model.py llama_configs) plus small ones for tests and demos.
PRESETS: dict[str, dict[str, int]] = {
    "7B": dict(n_layer=32, n_head=32, n_embd=4096),
    "13B": dict(n_layer=40, n_head=40, n_embd=5120),
    "30B": dict(n_layer=60, n_head=52, n_embd=6656),
    "65B": dict(n_layer=80, n_head=64, n_embd=8192),
    # Small shapes: not lit-llama presets; vocab sized for the shipped demo tokenizer.
    "tiny": dict(n_layer=2, n_head=4, n_embd=64, vocab_size=128, block_size=256),
    "demo": dict(n_layer=4, n_head=4, n_embd=128, vocab_size=1024, block_size=256),
}

# Adapter targets: q/k/v live inside the fused c_attn projection (lit-llama's enable_lora);
# o is attn.c_proj; gate/up/down are mlp.c_fc1/c_fc2/c_proj (lit-llama issue #350).
QKV_TARGETS = ("q", "k", "v")
ALL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


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

    @property
    def qkv_enabled(self) -> tuple[bool, bool, bool]:
        """lit-llama's enable_lora flags for the fused q/k/v projection."""
        return tuple(t in self.targets for t in QKV_TARGETS)  # type: ignore[return-value]

    def num_params(self, config: LLaMAConfig) -> int:
        """Trainable adapter parameter count, from shapes alone."""
        C, H, r = config.n_embd, config.n_hidden, self.r
        n_qkv = sum(self.qkv_enabled)
        per_layer = n_qkv * r * (C + C)
        dims = {"o": (C, C), "gate": (C, H), "up": (C, H), "down": (H, C)}
        per_layer += sum(r * (i + o) for t, (i, o) in dims.items() if t in self.targets)
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
    aliases = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
               "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
    return tuple(aliases.get(t.strip(), t.strip()) for t in spec.split(",") if t.strip())


def dump_json(config: LLaMAConfig, lora: LoRAConfig | None, base: str | None = None) -> str:
    """The config.json stored beside jaxlora checkpoints (`base`: for adapters saved without
    their frozen weights, where those came from)."""
    data = {"model": config.to_dict(), "lora": lora.to_dict() if lora else None}
    if base is not None:
        data["base"] = base
    return json.dumps(data, indent=2)
