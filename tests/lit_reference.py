"""Independent PyTorch reference of lit-llama's forward pass (incl. LoRA).

Written from docs/lit-llama-format.md (shared), not copied from lit-llama. Module names
reproduce lit-llama's state-dict keys exactly, so a lit-llama ``lit-llama.pth`` /
LoRA file loads with ``load_state_dict`` and tests can compare our Flax model to it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

QKV = ("q", "k", "v")
ALL_TARGETS = frozenset(QKV + ("o", "gate", "up", "down"))
RMS_EPS = 1e-5
ROPE_BASE = 10000.0


def find_multiple(n: int, k: int) -> int:
    """Round ``n`` up to a multiple of ``k``."""
    return n if n % k == 0 else n + k - n % k


@dataclass
class RefConfig:
    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int = 32000
    block_size: int = 2048

    @property
    def padded_vocab_size(self) -> int:
        return find_multiple(self.vocab_size, 64)

    @property
    def n_hidden(self) -> int:
        return find_multiple(int(2 * 4 * self.n_embd / 3), 256)

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_name(cls, name: str) -> "RefConfig":
        """Presets from the doc: 7B, 13B, 30B, 65B."""
        layer, head, embd = {"7B": (32, 32, 4096), "13B": (40, 40, 5120),
                             "30B": (60, 52, 6656), "65B": (80, 64, 8192)}[name]
        return cls(n_layer=layer, n_head=head, n_embd=embd)


def ref_lora_delta(lora_A: torch.Tensor, lora_B: torch.Tensor,
                   enabled: Optional[Sequence[bool]], C: Optional[int],
                   scaling: float) -> torch.Tensor:
    """Merged LoRA update ΔW, shaped like the layer's weight (out, in).

    ``enabled=None``: plain LoRA linear, ΔW = scaling * B @ A.
    Otherwise fused qkv (MergedLinear): ΔW is (3C, C), row block g holds
    scaling * B_g @ A_g for each enabled group g, zeros for disabled groups.
    """
    if enabled is None:
        return scaling * (lora_B @ lora_A)
    r = lora_B.shape[1]
    delta = lora_A.new_zeros(3 * C, lora_A.shape[1])
    n = 0
    for slot, on in enumerate(enabled):
        if on:
            A_g = lora_A[n * r:(n + 1) * r]          # (r, C)
            B_g = lora_B[n * C:(n + 1) * C]          # (C, r)
            delta[slot * C:(slot + 1) * C] = scaling * (B_g @ A_g)
            n += 1
    return delta


class RefLinear(nn.Module):
    """Bias-free Linear (key ``weight``) with optional plain LoRA (``lora_A`` (r, in), ``lora_B`` (out, r))."""

    def __init__(self, d_in: int, d_out: int, r: int = 0, alpha: float = 16, dropout: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in))
        nn.init.normal_(self.weight, std=0.02)
        self.r, self.merged = r, False
        if r > 0:
            self.scaling = alpha / r
            self.lora_A = nn.Parameter(torch.empty(r, d_in).uniform_(-1 / math.sqrt(d_in), 1 / math.sqrt(d_in)))
            self.lora_B = nn.Parameter(torch.zeros(d_out, r))
            self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta(self) -> torch.Tensor:
        return ref_lora_delta(self.lora_A, self.lora_B, None, None, self.scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight.T
        if self.r > 0 and not self.merged:
            y = y + self.scaling * (self.lora_dropout(x) @ self.lora_A.T @ self.lora_B.T)
        return y


class RefMergedLinear(nn.Module):
    """Fused qkv projection (C -> 3C) with lit-llama MergedLinear LoRA on the enabled groups."""

    def __init__(self, C: int, r: int, enabled: Sequence[bool], alpha: float = 16, dropout: float = 0.0):
        super().__init__()
        assert r > 0 and any(enabled)
        self.C, self.r, self.enabled, self.merged = C, r, tuple(enabled), False
        self.scaling = alpha / r
        n = sum(self.enabled)
        self.weight = nn.Parameter(torch.empty(3 * C, C))
        nn.init.normal_(self.weight, std=0.02)
        self.lora_A = nn.Parameter(torch.empty(r * n, C).uniform_(-1 / math.sqrt(C), 1 / math.sqrt(C)))
        self.lora_B = nn.Parameter(torch.zeros(C * n, r))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta(self) -> torch.Tensor:
        return ref_lora_delta(self.lora_A, self.lora_B, self.enabled, self.C, self.scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight.T
        if self.merged:
            return y
        after_A = self.lora_dropout(x) @ self.lora_A.T            # (..., r*n)
        parts, n = [], 0
        for on in self.enabled:                                    # zero_pad into [q | k | v]
            if on:
                a_g = after_A[..., n * self.r:(n + 1) * self.r]
                B_g = self.lora_B[n * self.C:(n + 1) * self.C]
                parts.append(a_g @ B_g.T)
                n += 1
            else:
                parts.append(y.new_zeros(*y.shape[:-1], self.C))
        return y + self.scaling * torch.cat(parts, dim=-1)


class RMSNorm(nn.Module):
    """scale * x * rsqrt(mean(x^2) + 1e-5), in the input dtype (lit-llama quirk)."""

    def __init__(self, C: int, eps: float = RMS_EPS):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(C))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * (x * torch.rsqrt((x * x).mean(dim=-1, keepdim=True) + self.eps))


def ref_rope(x: torch.Tensor, base: float = ROPE_BASE) -> torch.Tensor:
    """RoPE on interleaved pairs (2i, 2i+1) of x (B, T, n_head, hs); position = index along T.

    Angles pos * base^(-2i/hs) in float32. x is computed in float32 (float64 stays float64)
    and cast back to its dtype.
    """
    T, hs = x.shape[1], x.shape[-1]
    theta = 1.0 / (base ** (torch.arange(0, hs, 2, dtype=torch.float32, device=x.device) / hs))
    angles = torch.outer(torch.arange(T, dtype=torch.float32, device=x.device), theta)  # (T, hs/2)
    dt = torch.promote_types(x.dtype, torch.float32)
    cos, sin = angles.cos().to(dt)[:, None, :], angles.sin().to(dt)[:, None, :]       # (T, 1, hs/2)
    xp = x.to(dt).reshape(*x.shape[:-1], hs // 2, 2)
    x0, x1 = xp[..., 0], xp[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)
    return out.flatten(-2).to(x.dtype)


def _lora_kw(targets: frozenset, name: str, r: int, alpha: float, dropout: float) -> Dict:
    return dict(r=r, alpha=alpha, dropout=dropout) if (r > 0 and name in targets) else {}


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: RefConfig, r: int, alpha: float, dropout: float, targets: frozenset):
        super().__init__()
        C = cfg.n_embd
        enabled = [t in targets for t in QKV]
        if r > 0 and any(enabled):
            self.c_attn = RefMergedLinear(C, r, enabled, alpha, dropout)
        else:
            self.c_attn = RefLinear(C, 3 * C)
        self.c_proj = RefLinear(C, C, **_lora_kw(targets, "o", r, alpha, dropout))
        self.n_head = cfg.n_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head) for t in (q, k, v))
        q, k = ref_rope(q), ref_rope(k)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: RefConfig, r: int, alpha: float, dropout: float, targets: frozenset):
        super().__init__()
        C, H = cfg.n_embd, cfg.n_hidden
        self.c_fc1 = RefLinear(C, H, **_lora_kw(targets, "gate", r, alpha, dropout))
        self.c_fc2 = RefLinear(C, H, **_lora_kw(targets, "up", r, alpha, dropout))
        self.c_proj = RefLinear(H, C, **_lora_kw(targets, "down", r, alpha, dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.silu(self.c_fc1(x)) * self.c_fc2(x))


class Block(nn.Module):
    def __init__(self, cfg: RefConfig, *lora):
        super().__init__()
        self.rms_1, self.attn = RMSNorm(cfg.n_embd), CausalSelfAttention(cfg, *lora)
        self.rms_2, self.mlp = RMSNorm(cfg.n_embd), MLP(cfg, *lora)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.rms_1(x))
        return x + self.mlp(self.rms_2(x))


class RefLLaMA(nn.Module):
    """lit-llama LLaMA; ``forward(idx (B, T) long) -> logits (B, T, padded_vocab_size)``."""

    def __init__(self, cfg: RefConfig, lora_r: int = 0, lora_alpha: float = 16,
                 lora_dropout: float = 0.0, lora_targets: Sequence[str] = ("q", "v")):
        super().__init__()
        targets = frozenset(lora_targets)
        assert targets <= ALL_TARGETS, f"unknown LoRA targets {set(targets - ALL_TARGETS)}"
        self.config = cfg
        lora = (lora_r, lora_alpha, lora_dropout, targets)
        V, C = cfg.padded_vocab_size, cfg.n_embd
        self.lm_head = RefLinear(C, V)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(V, C),
            h=nn.ModuleList(Block(cfg, *lora) for _ in range(cfg.n_layer)),
            ln_f=RMSNorm(C),
        ))
        nn.init.normal_(self.transformer.wte.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        assert idx.shape[1] <= self.config.block_size
        x = self.transformer.wte(idx)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


@torch.no_grad()
def merge_lora_(model: nn.Module) -> nn.Module:
    """Fold every un-merged LoRA into its weight in place (W += ΔW) and mark it merged."""
    for m in model.modules():
        if isinstance(m, (RefLinear, RefMergedLinear)) and m.r > 0 and not m.merged:
            m.weight += m.delta().to(m.weight.dtype)
            m.merged = True
    return model
