"""LLaMA in Flax Linen, computing lit-llama's function.

Read top to bottom: RMSNorm, RoPE, attention, MLP, Block, LLaMA. Parameter names follow
lit-llama's state dict (wte, h.{i}.rms_1, attn.c_attn, attn.c_proj, rms_2, mlp.c_fc1,
mlp.c_fc2, mlp.c_proj, ln_f, lm_head), with the layers stacked on a leading axis by
`nn.scan`: lit-llama's `transformer.h.{i}.attn.c_attn.weight` is our
`params["h"]["attn"]["c_attn"]["kernel"][i]`, transposed to Flax's (in, out).

Differences from lit-llama, on purpose:
- RMSNorm, RoPE, softmax and logits are computed in float32 whatever the compute dtype
  (lit-llama normalises in bf16 under bf16-true training); identical in float32.
- RoPE angles are always float32 (lit-llama under bf16-true builds them in bf16).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlora.config import LLaMAConfig, LoRAConfig
from jaxlora.lora import MergedLoRADense

Array = jax.Array

REMAT_POLICIES = {
    "none": None,  # keep every activation (fastest, most memory)
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    "dots": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute the rest
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
ATTENTION_IMPLS = ("auto", "xla", "cudnn")


class RMSNorm(nn.Module):
    """scale * x / sqrt(mean(x^2) + eps), in float32, cast back to the input dtype."""

    eps: float = 1e-5
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                           (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (scale.astype(jnp.float32) * normed).astype(x.dtype)


def rope_angles(positions: Array, head_size: int, base: float = 10000.0) -> tuple[Array, Array]:
    """cos and sin of pos * theta_i, theta_i = base^(-2i/hs), float32; shapes (..., T, hs/2)."""
    theta = 1.0 / (base ** (jnp.arange(0, head_size, 2, dtype=jnp.float32) / head_size))
    angles = positions.astype(jnp.float32)[..., None] * theta
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate interleaved adjacent pairs (2i, 2i+1) of x (B, T, n_head, hs), as lit-llama/Meta."""
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[..., None, :], sin[..., None, :]  # broadcast over heads
    rotated = jnp.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)


def pick_attention(impl: str, dtype: Any) -> str:
    """'auto' -> cuDNN flash attention on a GPU with 16-bit compute, else XLA."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    on_gpu = jax.default_backend() == "gpu"
    return "cudnn" if on_gpu and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla"


@dataclass(frozen=True)
class Settings:
    """What every layer needs to know: architecture, adapters, dtypes, attention kernel."""

    config: LLaMAConfig
    lora: LoRAConfig | None
    dtype: Any
    param_dtype: Any
    lora_dtype: Any
    attention: str


def _dense(opts: Settings, features: int, name: str, axes: tuple, target: str | None = None,
           groups: int = 1, enabled: tuple[bool, ...] | None = None) -> MergedLoRADense:
    lora = opts.lora or LoRAConfig(r=0)
    if enabled is None:
        enabled = (target in lora.targets,)
    return MergedLoRADense(features=features, groups=groups, enabled=enabled, r=lora.r, alpha=lora.alpha,
                           dropout=lora.dropout, kernel_axes=axes, dtype=opts.dtype,
                           param_dtype=opts.param_dtype, lora_dtype=opts.lora_dtype, name=name)


class CausalSelfAttention(nn.Module):
    opts: Settings

    @nn.compact
    def __call__(self, x: Array, cos: Array, sin: Array, deterministic: bool) -> Array:
        cfg, opts = self.opts.config, self.opts
        B, T, C = x.shape
        lora = opts.lora or LoRAConfig(r=0)
        qkv = _dense(opts, 3 * C, "c_attn", ("embed", "qkv"), groups=3, enabled=lora.qkv_enabled)(x, deterministic)
        q, k, v = (t.reshape(B, T, cfg.n_head, cfg.head_size) for t in jnp.split(qkv, 3, axis=-1))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        impl = pick_attention(opts.attention, opts.dtype)
        y = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
        return _dense(opts, C, "c_proj", ("heads", "embed"), target="o")(y.reshape(B, T, C), deterministic)


class MLP(nn.Module):
    opts: Settings

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        H, C = self.opts.config.n_hidden, self.opts.config.n_embd
        gate = _dense(self.opts, H, "c_fc1", ("embed", "mlp"), target="gate")(x, deterministic)
        up = _dense(self.opts, H, "c_fc2", ("embed", "mlp"), target="up")(x, deterministic)
        return _dense(self.opts, C, "c_proj", ("mlp", "embed"), target="down")(nn.silu(gate) * up, deterministic)


class Block(nn.Module):
    """x + attn(rms_1(x)), then + mlp(rms_2(x)). Scan-shaped: (carry, broadcast...) -> (carry, None)."""

    opts: Settings
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: Array, cos: Array, sin: Array) -> tuple[Array, None]:
        pd = self.opts.param_dtype
        x = x + CausalSelfAttention(self.opts, name="attn")(RMSNorm(param_dtype=pd, name="rms_1")(x), cos, sin,
                                                            self.deterministic)
        x = x + MLP(self.opts, name="mlp")(RMSNorm(param_dtype=pd, name="rms_2")(x), self.deterministic)
        return x, None


class LLaMA(nn.Module):
    """lit-llama's LLaMA with LoRA adapters in the `lora` collection.

    Attributes:
      config: architecture. lora: adapter settings (None or r=0: no adapters).
      dtype: compute dtype (activations, matmul inputs). param_dtype: frozen weight storage.
      lora_dtype: adapter storage (keep float32).
      attention: 'auto' | 'xla' | 'cudnn'. remat: a key of REMAT_POLICIES.
      scan_unroll: layers per scan iteration; 0 or n_layer unrolls fully (weights stay stacked:
        the layout never changes, only the compiled program). Full unrolling removes the
        loop (faster on GPU: 7B 8x512 +12% on an H100) at the cost of a ~40x longer compile.
    """

    config: LLaMAConfig
    lora: LoRAConfig | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora_dtype: Any = jnp.float32
    attention: str = "auto"
    remat: str = "none"
    scan_unroll: int = 1

    @nn.compact
    def __call__(self, idx: Array, deterministic: bool = True, positions: Array | None = None,
                 return_hidden: bool = False) -> Array:
        """Token ids (B, T) -> float32 logits (B, T, padded_vocab), or final hidden states (B, T, C)."""
        cfg = self.config
        if positions is None:
            positions = jnp.arange(idx.shape[-1])
        x = nn.Embed(cfg.padded_vocab_size, cfg.n_embd, dtype=self.dtype, param_dtype=self.param_dtype,
                     embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
                     name="wte")(idx)
        cos, sin = rope_angles(positions, cfg.head_size)

        block = Block
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {list(REMAT_POLICIES)}, got {self.remat!r}")
        if self.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        layers = nn.scan(block, variable_axes={"params": 0, "lora": 0}, split_rngs={"params": True, "dropout": True},
                         in_axes=(nn.broadcast, nn.broadcast), length=cfg.n_layer, unroll=self.scan_unroll or cfg.n_layer,
                         metadata_params={nn.PARTITION_NAME: "layers"})
        opts = Settings(cfg, self.lora, self.dtype, self.param_dtype, self.lora_dtype, self.attention)
        x, _ = layers(opts, deterministic, name="h")(x, cos, sin)
        x = RMSNorm(param_dtype=self.param_dtype, name="ln_f")(x)
        if return_hidden:
            return x
        head = MergedLoRADense(cfg.padded_vocab_size, kernel_axes=("embed", "vocab"), dtype=self.dtype,
                               param_dtype=self.param_dtype, out_dtype=jnp.float32, name="lm_head")
        return head(x)


def init_variables(model: LLaMA, rng: Array, seq_len: int = 8) -> dict[str, Any]:
    """Random {"params", "lora"} for `model`, unboxed (plain arrays), built inside jit."""
    dummy = jnp.zeros((1, seq_len), jnp.int32)
    return jax.jit(lambda key: nn.unbox(model.init({"params": key}, dummy)))(rng)


def abstract_variables(model: LLaMA) -> dict[str, Any]:
    """Shapes and dtypes of every variable (jax.ShapeDtypeStruct), allocating nothing."""
    return nn.unbox(jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1, 8), jnp.int32))))


def logical_axes(model: LLaMA) -> dict[str, Any]:
    """PartitionSpecs of logical axis names for every variable (for sharding rules)."""
    boxed = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1, 8), jnp.int32)))
    return nn.get_partition_spec(boxed)
