"""LLaMA in Flax Linen, computing lit-llama's function.

Read top to bottom: RMSNorm, RoPE, attention (its kernels: jaxlora.model.attention), MLP, Block,
LLaMA. Parameter names follow
lit-llama's state dict (wte, h.{i}.rms_1, attn.c_attn, attn.c_proj, rms_2, mlp.c_fc1,
mlp.c_fc2, mlp.c_proj, ln_f, lm_head), with the layers stacked on a leading axis by
`nn.scan`: lit-llama's `transformer.h.{i}.attn.c_attn.weight` is our
`params["h"]["attn"]["c_attn"]["kernel"][i]`, transposed to Flax's (in, out).

Differences from lit-llama, on purpose:
- RMSNorm, RoPE, softmax and logits are computed in float32 whatever the compute dtype
  (lit-llama normalises in bf16 under bf16-true training); identical in float32.
- RoPE angles are always float32 (lit-llama under bf16-true builds them in bf16).

Beyond lit-llama (LLaMA 2/3, Mistral; all off for lit-llama's configs, whose function is
unchanged): grouped-query attention (n_kv_head k/v heads, jax.nn.dot_product_attention's
native GQA; the fused q/k/v kernel is (C, C + 2 * n_kv_head * hs), jaxlora.model.layouts),
linear and llama3 RoPE scaling (HF transformers' inverse frequencies), a tied LM head (the
embedding table transposed), the MLP width from the config.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlora.config import FUSED_GATE_UP, GATE_UP, LLaMAConfig, LoRAConfig
from jaxlora.model.attention import (  # ATTENTION_IMPLS: re-exported, the CLI's choices (train.settings, bench)
    ATTENTION_IMPLS,  # noqa: F401
    cached_attention,
    causal_attention,
    pick_attention,
    write_kv,
)
from jaxlora.model.layouts import STACKED, QKVLayout, model_qkv_layout
from jaxlora.model.lora import LoRAUpdate, MergedLoRADense
from jaxlora.model.quantize import Int8Kernel, dense_dot, rows_padded_dot

Array = jax.Array

REMAT_POLICIES = {
    "none": None,  # keep every activation (fastest, most memory)
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    "dots": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute the rest
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
# Logical axes of activations (mapped to mesh axes by jaxlora.parallel.sharding's rules table).

ACT_EMBED = ("batch", "length", "act_embed")
ACT_HEADS = ("batch", "length", "act_heads", None)
ACT_MLP = ("batch", "length", "act_mlp")


class RMSNorm(nn.Module):
    """scale * x / sqrt(mean(x^2) + eps), in float32, cast back to the input dtype."""

    eps: float = 1e-5
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        # ("norm",): replicated by the rules; a few KiB, and split they would be resharded per use
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (scale.astype(jnp.float32) * normed).astype(x.dtype)


def rope_angles(positions: Array, head_size: int, base: float = 10000.0,
                config: LLaMAConfig | None = None) -> tuple[Array, Array]:
    """cos and sin of pos * theta_i, theta_i = base^(-2i/hs), float32; shapes (..., T, hs/2).
    config: scale theta_i by its rope_type (`scaled_frequencies`)."""
    theta = 1.0 / (base ** (jnp.arange(0, head_size, 2, dtype=jnp.float32) / head_size))
    if config is not None:
        theta = scaled_frequencies(theta, config)
    angles = positions.astype(jnp.float32)[..., None] * theta
    return jnp.cos(angles), jnp.sin(angles)


def scaled_frequencies(theta: Array, config: LLaMAConfig) -> Array:
    """RoPE's inverse frequencies under config.rope_type, in float32 with the operations of HF
    transformers' rope init functions (modeling_rope_utils): "linear" divides them all by the
    factor; "llama3" (Llama 3.1+) divides the low frequencies (wavelength above original
    context / low_freq_factor) by the factor, keeps the high ones (wavelength below original
    context / high_freq_factor) and blends the band between."""
    if config.rope_type == "default":
        return theta
    factor = config.rope_factor
    if config.rope_type == "linear":
        return theta / factor
    low, high, context = config.rope_low_freq_factor, config.rope_high_freq_factor, config.rope_original_context
    wavelen = 2 * math.pi / theta
    scaled = jnp.where(wavelen > context / low, theta / factor, theta)
    smooth = (context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < context / high) & ~(wavelen > context / low)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate interleaved adjacent pairs (2i, 2i+1) of x (B, T, n_head, hs), as lit-llama/Meta."""
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[..., None, :], sin[..., None, :]  # broadcast over heads
    rotated = jnp.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)


@dataclass(frozen=True)
class Settings:
    """What every layer needs to know: architecture, adapters, dtypes, attention kernel."""

    config: LLaMAConfig
    lora: LoRAConfig | None
    dtype: Any
    param_dtype: Any
    lora_dtype: Any
    attention: str
    mesh: Any = None
    rules: tuple = ()
    split_qkv: bool = False
    qkv: QKVLayout | None = None  # the q/k/v columns' layout (layouts.model_qkv_layout)
    fused_mlp: bool = False  # gate and up in one kernel (LLaMA.fused_mlp)

    def constrain(self, x: Array, axes: tuple[str | None, ...]) -> Array:
        """Pin an activation's sharding by logical axis names (a no-op without a mesh), so the
        compiler gathers sharded weights for the matmuls rather than moving activations."""
        if self.mesh is None:
            return x
        return nn.with_logical_constraint(x, axes, rules=self.rules, mesh=self.mesh)


class TokenEmbedding(nn.Module):
    """Rows of the (vocab, embed) table "embedding" for token ids, in the compute dtype
    (nn.Embed's parameter layout). On a mesh the table is gathered whole along embed before
    the lookup: a lookup from a table split along embed would come out split along embed and
    have to be replicated in full to become split by rows (XLA's "involuntary full
    rematerialization"); split along vocab, each shard looks up its rows and a sum joins them."""

    num_embeddings: int
    opts: Settings

    @nn.compact
    def __call__(self, idx: Array) -> Array:
        table = self.param("embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
                           (self.num_embeddings, self.opts.config.n_embd), self.opts.param_dtype)
        table = self.opts.constrain(table.astype(self.opts.dtype), ("vocab", None))
        return jnp.take(table, idx, axis=0)

    def attend(self, x: Array) -> Array:
        """float32 logits x @ table^T: the tied LM head (`head_logits`)."""
        table = self.get_variable("params", "embedding")
        return head_logits(x.astype(self.opts.dtype), nn.unbox(table).T)


def _dense(opts: Settings, features: int, module: tuple[str, str], axes: tuple) -> MergedLoRADense:
    """The dense layer at `module` of a block (e.g. ("attn", "c_attn")); its adapted output
    segments come from the LoRA target table (config.LORA_TARGETS)."""
    lora = opts.lora or LoRAConfig(r=0)
    enabled = lora.enabled(module)
    split = opts.split_qkv and len(enabled) > 1
    return MergedLoRADense(features=features, groups=len(enabled), enabled=enabled, r=lora.r, scaling=lora.scaling,
                           dropout=lora.dropout, kernel_axes=axes, dtype=opts.dtype,
                           param_dtype=opts.param_dtype, lora_dtype=opts.lora_dtype, name=module[-1],
                           segments=opts.config.segments(module), split_kernel=split,
                           run_layout=opts.qkv if split else None)


class CausalSelfAttention(nn.Module):
    """Causal self-attention; with a KV cache (decoding) it also returns the updated cache.

    cache: this layer's {"k", "v"} of shape (B, n_kv, S, head_size), or None (training); n_kv:
    the k/v heads the model runs with (n_kv_head, more when replicated for tensor parallelism).
    cache_index: None: a prefill, the tokens are positions 0..T-1 (causal attention among
    them, written to the cache's slots 0..T-1). Else an int: the tokens' k/v go to slots
    cache_index..cache_index+T-1 of every row (one in-place update, whatever each row's
    position), and each row attends to the slots kv_mask (B, S) marks, new ones included:
    slots are not positions (RoPE has placed every key already), so a row's tokens may sit
    anywhere in the cache. Decoding runs T = 1.
    """

    opts: Settings

    @nn.compact
    def __call__(self, x: Array, cos: Array, sin: Array, segments: Array | None, deterministic: bool,
                 cache: dict | None = None, cache_index: Array | None = None, kv_mask: Array | None = None,
                 ) -> tuple[Array, dict | None]:
        cfg, opts = self.opts.config, self.opts
        B, T, C = x.shape
        qkv = _dense(opts, C + 2 * cfg.kv_size, ("attn", "c_attn"), ("embed", "qkv"))(x, deterministic)
        parts = opts.qkv.split_run(qkv) if opts.split_qkv else opts.qkv.split_stored(qkv)
        q, k, v = (opts.constrain(t, ACT_HEADS) for t in parts)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            cache = write_kv(cache, k, v, 0 if cache_index is None else cache_index)
        if cache is None or cache_index is None:
            y = causal_attention(q, k, v, pick_attention(opts.attention, opts.dtype), segments)
        else:
            y = cached_attention(q, cache["k"], cache["v"], kv_mask)
        return _dense(opts, C, ("attn", "c_proj"), ("heads", "embed"))(y.reshape(B, T, C), deterministic), cache


def _fused_gate_up(opts: Settings, x: Array, deterministic: bool) -> tuple[Array, Array]:
    """gate and up from one product with the fused (C, 2, H) kernel (one weight read, one GEMM
    launch, twice the columns), plus each one's adapter, where it has one, from its own
    c_fc1 / c_fc2 adapters (`LoRAUpdate`: the variables and dropout masks of the unfused layers)."""
    H = opts.config.n_hidden
    both = MergedLoRADense(features=2 * H, groups=2, enabled=(False, False), kernel_axes=("embed", "mlp"),
                           dtype=opts.dtype, param_dtype=opts.param_dtype, name=FUSED_GATE_UP[-1],
                           split_kernel=True)(x)
    lora = opts.lora or LoRAConfig(r=0)
    outputs = []
    for g, name in enumerate(GATE_UP):
        y = both[..., g, :]
        if lora.r > 0 and lora.enabled(("mlp", name))[0]:
            y = y + LoRAUpdate(H, lora.r, lora.scaling, lora.dropout, ("embed", "mlp"), opts.dtype, opts.lora_dtype,
                               name=name)(x, deterministic).astype(y.dtype)
        outputs.append(y)
    return outputs[0], outputs[1]


class MLP(nn.Module):
    opts: Settings

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        H, C = self.opts.config.n_hidden, self.opts.config.n_embd
        if self.opts.fused_mlp:
            gate, up = _fused_gate_up(self.opts, x, deterministic)
        else:
            gate = _dense(self.opts, H, ("mlp", "c_fc1"), ("embed", "mlp"))(x, deterministic)
            up = _dense(self.opts, H, ("mlp", "c_fc2"), ("embed", "mlp"))(x, deterministic)
        hidden = self.opts.constrain(nn.silu(gate) * up, ACT_MLP)
        return _dense(self.opts, C, ("mlp", "c_proj"), ("mlp", "embed"))(hidden, deterministic)


class Block(nn.Module):
    """x + attn(rms_1(x)), then + mlp(rms_2(x)). Scan-shaped: (carry, broadcast...) -> (carry, cache)."""

    opts: Settings
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: Array, cos: Array, sin: Array, segments: Array | None = None, cache: dict | None = None,
                 cache_index: Array | None = None, kv_mask: Array | None = None) -> tuple[Array, dict | None]:
        pd = self.opts.param_dtype
        eps = self.opts.config.norm_eps
        y, cache = CausalSelfAttention(self.opts, name="attn")(RMSNorm(eps, pd, name="rms_1")(x), cos, sin, segments,
                                                               self.deterministic, cache, cache_index, kv_mask)
        x = x + y
        x = x + MLP(self.opts, name="mlp")(RMSNorm(eps, pd, name="rms_2")(x), self.deterministic)
        return self.opts.constrain(x, ACT_EMBED), cache


class LMHead(nn.Module):
    """float32 logits x @ kernel (`head_logits`); kernel (n_embd, padded_vocab) in `params`."""

    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "vocab")),
                            (x.shape[-1], self.features), self.param_dtype)
        return head_logits(x.astype(self.dtype), kernel)


@jax.custom_vjp
def _head_logits(h: Array, kernel: Array) -> Array:
    return rows_padded_dot(h, kernel, jnp.float32)


def _head_logits_fwd(h: Array, kernel: Array) -> tuple[Array, tuple[Array, Array]]:
    return _head_logits(h, kernel), (h, kernel)


def _head_logits_bwd(res: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    h, kernel = res
    g = g.astype(h.dtype)
    d_h = jnp.dot(g, kernel.T, preferred_element_type=h.dtype)
    # (..., C) x (..., V) over every leading axis -> (C, V); dropped by XLA when the kernel is frozen
    lead = tuple(range(h.ndim - 1))
    d_kernel = jax.lax.dot_general(h, g, ((lead, lead), ((), ())), preferred_element_type=kernel.dtype)
    return d_h, d_kernel


_head_logits.defvjp(_head_logits_fwd, _head_logits_bwd)


def head_logits(h: Array, kernel: Array | Int8Kernel) -> Array:
    """float32 logits h @ kernel (kernel cast to h's dtype), whose backward pass runs its
    matmuls in h's dtype. The one LM head: the model's lm_head, the loss and the decoder.

    Plain autodiff of a dot with a float32 output feeds the float32 cotangent into the
    backward matmul, which then runs as a float32 (tf32) GEMM: at 7B, 4096 tokens, 2.7 ms
    instead of ~1.4 ms on an H100. The cotangent is cast to h's dtype first, as a bf16
    framework (lit-llama under bf16-true) would hold it anyway. An int8 kernel (decoding
    only, jaxlora.model.quantize) is dequantized inside the matmul.
    """
    if isinstance(kernel, Int8Kernel):
        return dense_dot(h, kernel, h.dtype, jnp.float32)
    return _head_logits(h, kernel.astype(h.dtype))


class LLaMA(nn.Module):
    """lit-llama's LLaMA with LoRA adapters in the `lora` collection.

    Attributes:
      config: architecture. lora: adapter settings (None or r=0: no adapters).
      dtype: compute dtype (activations, matmul inputs). param_dtype: frozen weight storage.
      lora_dtype: adapter storage (keep float32).
      attention: a name of ATTENTION_IMPLS (jaxlora.model.attention). remat: a key of REMAT_POLICIES.
      scan_layers: True: the layers are one `nn.scan` over weights stacked on a leading axis
        (variables under "h"; quick to compile). False: a Python loop of per-layer blocks
        h_0 ... h_{n-1}, each with its own weights: no loop and no per-layer slicing of
        stacked weights (fastest on GPU; 7B compiles in ~30 s instead of ~5 s on an H100).
        Either way checkpoints, converters and the train state keep the stacked layout;
        `layered` and `split_layers_on_device` convert (see "Variable layouts" below).
      scan_unroll: layers per scan iteration when scanning; 0 or n_layer unrolls the scan
        fully (stacked weights sliced per layer inside the program).
      mesh, rules: with a device mesh, activations are pinned to the shardings that `rules`
        (logical axis -> mesh axes, see jaxlora.parallel.sharding) give them; None: no constraints.
      split_qkv: read the fused q/k/v kernel as (C, 3, C) rather than (C, 3C), so tensor
        parallelism splits q, k and v at head boundaries (see MergedLoRADense.split_kernel);
        a run-time layout like per-layer weights: stored variables keep (C, 3C).
      fused_mlp: read each block's gate and up kernels as one (C, 2, H) kernel "c_fc"
        (`layouts.fuse_gate_up`), a run layout: one product for both (decoding: one weight read
        and GEMM launch fewer a block; training: GEMMs twice as wide). Their adapters keep their
        own variables (c_fc1, c_fc2), so the train state does not change.
    """

    config: LLaMAConfig
    lora: LoRAConfig | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora_dtype: Any = jnp.float32
    attention: str = "auto"
    remat: str = "none"
    scan_layers: bool = True
    scan_unroll: int = 1
    mesh: Any = None
    rules: tuple = ()
    split_qkv: bool = False
    fused_mlp: bool = False

    @nn.compact
    def __call__(self, idx: Array, deterministic: bool = True, positions: Array | None = None,
                 return_hidden: bool = False, cache: Any = None, cache_index: Array | None = None,
                 kv_mask: Array | None = None, segment_ids: Array | None = None) -> Any:
        """Token ids (B, T) -> float32 logits (B, T, padded_vocab), or final hidden states (B, T, C).

        Packed samples (training): segment_ids (B, T), 1, 2, ... per sample of a row (0:
        padding), so each token attends only within its own sample; with positions (B, T)
        restarting at 0 per sample.

        Decoding: pass a KV cache (`init_cache`) and get (output, updated cache) back;
        cache_index None prefills slots 0..T-1; else the tokens go to slot cache_index (an
        int) and attend to the slots kv_mask (B, S) marks; pass their positions (B, T) too.
        See CausalSelfAttention.
        """
        cfg = self.config
        if positions is None:
            positions = jnp.arange(idx.shape[-1])
        cos, sin = rope_angles(positions, cfg.head_size, cfg.rope_base, cfg)
        opts = Settings(cfg, self.lora, self.dtype, self.param_dtype, self.lora_dtype, self.attention, self.mesh,
                        tuple(self.rules), self.split_qkv, model_qkv_layout(self), self.fused_mlp)
        wte = TokenEmbedding(cfg.padded_vocab_size, opts, name="wte")
        x = opts.constrain(wte(idx), ACT_EMBED)

        block = Block
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {list(REMAT_POLICIES)}, got {self.remat!r}")
        if self.remat != "none" and cache is None:
            # prevent_cse=False in the unrolled loop too: measured at 7B, 4 x 256, dots_no_batch on an
            # H200 it is 5% faster (20,829 vs 19,777 tok/s) for 0.6 GiB more temporaries (16.1 vs 15.5)
            # and compiles in 29 s instead of 44 (docs/benchmarks.md); under nn.scan it is the usual setting.
            # Except 'full', which is there for memory: unrolled, XLA merges much of the recomputation
            # back into the forward (65B nf4-dq, 4 x 256, H200: 17.5 GiB more temporaries, out of
            # memory under a 48 GB cap; prevented: 36.8 GiB peak, docs/benchmarks.md).
            prevent_cse = self.remat == "full" and not self.scan_layers
            block = nn.remat(Block, policy=REMAT_POLICIES[self.remat], prevent_cse=prevent_cse)
        if self.scan_layers:
            cached = () if cache is None else (0, nn.broadcast, nn.broadcast)  # the cache is scanned like the weights
            layers = nn.scan(block, variable_axes={"params": 0, "lora": 0},
                             split_rngs={"params": True, "dropout": True},
                             in_axes=(nn.broadcast, nn.broadcast, nn.broadcast) + cached,
                             length=cfg.n_layer, unroll=self.scan_unroll or cfg.n_layer,
                             metadata_params={nn.PARTITION_NAME: "layers"})
            args = () if cache is None else (cache, cache_index, kv_mask)
            x, cache = layers(opts, deterministic, name=STACKED)(x, cos, sin, segment_ids, *args)
        else:
            caches = []
            for i in range(cfg.n_layer):
                args = () if cache is None else (cache[i], cache_index, kv_mask)
                x, layer_cache = block(opts, deterministic, name=f"{STACKED}_{i}")(x, cos, sin, segment_ids, *args)
                caches.append(layer_cache)
            cache = None if cache is None else tuple(caches)
        x = RMSNorm(cfg.norm_eps, self.param_dtype, name="ln_f")(x)
        if not return_hidden:
            x = wte.attend(x) if cfg.tie_embeddings else \
                LMHead(cfg.padded_vocab_size, dtype=self.dtype, param_dtype=self.param_dtype, name="lm_head")(x)
        return x if cache is None else (x, cache)


def lm_head_kernel(params: Any) -> Any:
    """The LM head's (n_embd, padded_vocab) kernel in `params`: lm_head's own, or for a model
    with tied embeddings (which has no lm_head) the embedding table transposed."""
    if "lm_head" in params:
        return params["lm_head"]["kernel"]
    return params["wte"]["embedding"].T


def init_cache(model: LLaMA, batch: int, length: int, dtype: Any = None) -> Any:
    """An empty KV cache of `length` slots in the layout `model` reads: {"k", "v"} of shape
    (n_layer, B, n_kv, S, head_size) for scanned layers, a tuple of per-layer {"k", "v"}
    (B, n_kv, S, head_size) otherwise (each layer's cache its own buffer, updated in place);
    n_kv: the k/v heads it runs with, n_kv_head (Llama 3 8B: 8, a quarter of n_head)."""
    cfg = model.config
    shape = (batch, model_qkv_layout(model).run_kv, length, cfg.head_size)
    dtype = dtype or model.dtype
    if model.scan_layers:
        return {name: jnp.zeros((cfg.n_layer,) + shape, dtype) for name in ("k", "v")}
    return tuple({name: jnp.zeros(shape, dtype) for name in ("k", "v")} for _ in range(cfg.n_layer))
