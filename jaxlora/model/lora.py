"""LoRA: the `MergedLoRADense` layer, functional merging, and the trainable/frozen split.

A dense layer's frozen kernel lives in the `params` collection; its adapters live in the
separate `lora` collection, so gradients and optimizer state are taken over `lora` alone.

The output of a layer may be split into `groups` equal segments (3 for the fused q/k/v
projection); adapters exist only for the enabled segments. Adapter shapes, Flax
(in, out) order, one slice per enabled segment:

    lora_A: (n_enabled, in_features, r)      lora_B: (n_enabled, r, out_features / groups)

which is lit-llama's MergedLinear (`lora_A` (r*n_enabled, in), `lora_B` (out/groups*n_enabled, r))
reshaped and transposed; see `jaxlora.weights.lit_llama`. The update of segment g is
`scaling * dropout(x) @ A_g @ B_g`, scaling = alpha / r; disabled segments get none.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import unfreeze

from jaxlora.config import LORA_TARGETS, LoRAConfig, segment_widths
from jaxlora.model.nf4 import NF4Kernel
from jaxlora.model.quantize import Int8Kernel, dense_dot

Array = jax.Array
LORA_COLLECTION = "lora"
LORA_LEAVES = ("lora_A", "lora_B")
_QKV_MODULE = LORA_TARGETS["q"].module  # the one dense layer with several output segments


def lora_a_init(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
    """lit-llama's init of A: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1.0 / np.sqrt(shape[-2])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class MergedLoRADense(nn.Module):
    """y = x @ W (+ per-segment LoRA updates); W frozen in `params`, A/B in `lora`.

    Attributes:
      features: output width.
      groups: number of equal output segments (3 for fused q/k/v, else 1).
      enabled: per segment, whether it carries an adapter (len == groups).
      r, scaling, dropout: adapter rank, scale of the update (`LoRAConfig.scaling`, alpha / r),
        dropout on the adapter input.
      kernel_axes: logical axis names of the kernel (in, out), for sharding rules.
      dtype: compute dtype; param_dtype: frozen kernel storage; lora_dtype: adapter storage.
      out_dtype: output dtype of the frozen matmul (default: dtype); f32 for logits.
      segments: output widths of the segments (None: `groups` equal ones). Unequal segments
        (q wider than k and v under grouped-query attention) keep one lora_B of shape
        (n_enabled, r, widest enabled segment): a narrower segment uses its leading columns,
        the others are never read, so they get no gradient and stay zero.
      split_kernel: with groups > 1, hold the kernel in a run layout (`run_layout`, default
        (in, groups, out/groups)) and return (..., *run_shape): split over devices along its
        last axis, every device then holds the same columns of each group (for q/k/v: whole
        heads), where a fused (in, out) kernel split evenly puts shard boundaries inside the
        groups and the compiler must move the outputs between devices to separate q, k and v.
      run_layout: with split_kernel, an object with `run_shape` (slots, width), `to_run`
        (stored columns on the last axis -> (..., slots, width)) and `is_reshape` (whether the
        slots are the equal groups in order), e.g. layouts.QKVLayout.
    """

    features: int
    groups: int = 1
    enabled: tuple[bool, ...] = (False,)
    r: int = 0
    scaling: float = 1.0
    dropout: float = 0.0
    kernel_axes: tuple[str | None, str | None] = (None, None)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora_dtype: Any = jnp.float32
    out_dtype: Any = None
    kernel_init: Callable[..., Array] = nn.initializers.normal(0.02)
    segments: tuple[int, ...] | None = None
    split_kernel: bool = False
    run_layout: Any = None

    @property
    def n_enabled(self) -> int:
        return sum(self.enabled) if self.r > 0 else 0

    @property
    def widths(self) -> tuple[int, ...]:
        return self.segments or (self.features // self.groups,) * self.groups

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        if len(self.enabled) != self.groups or len(self.widths) != self.groups or sum(self.widths) != self.features:
            raise ValueError(f"{self.name}: {self.groups} groups, enabled={self.enabled}, features={self.features}, "
                             f"segments={self.widths}")
        in_features = x.shape[-1]
        in_axis, out_axis = self.kernel_axes
        x = x.astype(self.dtype)
        if self.split_kernel:
            shape = self.run_layout.run_shape if self.run_layout is not None else (self.groups, self.widths[0])
            kernel = self._kernel((in_features, *shape), (in_axis, None, out_axis))
        else:
            kernel = self._kernel((in_features, self.features), self.kernel_axes)
        # (in, *out) kernels, split or not, float or int8/NF4 (jaxlora.model.quantize); products of
        # few rows (decoding) padded on GPU, as every frozen product is
        y = dense_dot(x, kernel, self.dtype, self.out_dtype)
        if self.n_enabled == 0:
            return y

        width = max(w for w, on in zip(self.widths, self.enabled) if on)
        delta = adapter_update(self, x, deterministic, self.n_enabled, width).astype(y.dtype)
        if not self.split_kernel:
            return add_to_segments(y, delta, self.enabled, self.widths)
        if self.run_layout is None or self.run_layout.is_reshape:  # equal groups: add in place, no data moved
            return add_to_groups(y, delta, self.enabled)
        zeros = jnp.zeros(y.shape[:-2] + (self.features,), y.dtype)  # the update in stored column order
        return y + self.run_layout.to_run(add_to_segments(zeros, delta, self.enabled, self.widths))

    def _kernel(self, shape: tuple[int, ...], axes: tuple) -> Array | Int8Kernel | NF4Kernel:
        # A quantized kernel's leaves (codes, scales) have other shapes than the kernel they stand
        # for, which Flax's param() would refuse: take it as given.
        if self.has_variable("params", "kernel"):
            kernel = self.get_variable("params", "kernel")
            if isinstance(kernel, (Int8Kernel, NF4Kernel)):
                return kernel
        return self.param("kernel", nn.with_logical_partitioning(self.kernel_init, axes), shape, self.param_dtype)


class LoRAUpdate(nn.Module):
    """The adapters of one dense layer whose frozen kernel lives elsewhere (a model's fused
    gate|up kernel, `LLaMA.fused_mlp`): scaling * dropout(x) @ A @ B, (..., features). Its
    variables, dropout masks and maths are those of a `MergedLoRADense` of one segment of the
    same name, so checkpoints and adapters do not know which of the two ran."""

    features: int
    r: int
    scaling: float = 1.0
    dropout: float = 0.0
    kernel_axes: tuple[str | None, str | None] = (None, None)
    dtype: Any = jnp.float32
    lora_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        return adapter_update(self, x.astype(self.dtype), deterministic, 1, self.features)[..., 0, :]


def adapter_update(module: nn.Module, x: Array, deterministic: bool, n_enabled: int, width: int) -> Array:
    """scaling * dropout(x) @ A_g @ B_g for the n_enabled segments of `module` (a MergedLoRADense
    or LoRAUpdate, inside its call: its `lora` variables and dropout), (..., n_enabled, width) in
    its compute dtype. All segments in one batched matmul pair (q and v together)."""
    in_axis, out_axis = module.kernel_axes
    lora_a = _adapter(module, "lora_A", lora_a_init, ("lora_group", in_axis, "lora_rank"),
                      (n_enabled, x.shape[-1], module.r))
    lora_b = _adapter(module, "lora_B", nn.initializers.zeros, ("lora_group", "lora_rank", out_axis),
                      (n_enabled, module.r, width))
    h = nn.Dropout(module.dropout)(x, deterministic=deterministic or module.dropout == 0.0)
    xa = jnp.einsum("...i,gir->...gr", h, lora_a.astype(module.dtype))
    return jnp.einsum("...gr,gro->...go", xa, lora_b.astype(module.dtype)) * jnp.asarray(module.scaling, module.dtype)


def _adapter(module: nn.Module, name: str, init: Callable[..., Array], axes: tuple, shape: tuple) -> Array:
    # The rng is drawn lazily: only at init, never in apply.
    boxed_init = nn.with_logical_partitioning(init, axes)
    return module.variable(LORA_COLLECTION, name,
                           lambda: boxed_init(module.make_rng("params"), shape, module.lora_dtype)).value


def add_to_groups(y: Array, delta: Array, enabled: Sequence[bool]) -> Array:
    """Add delta (..., n_enabled, out_g) into the enabled groups of y (..., groups, out_g)."""
    if all(enabled):
        return y + delta
    index = iter(range(delta.shape[-2]))
    return jnp.stack([y[..., g, :] + delta[..., next(index), :] if on else y[..., g, :]
                      for g, on in enumerate(enabled)], axis=-2)


def add_to_segments(y: Array, delta: Array, enabled: Sequence[bool], widths: Sequence[int] | None = None) -> Array:
    """Add delta (..., n_enabled, w) into the enabled segments of y (..., sum(widths)); segment
    g takes the first widths[g] columns of its delta (widths None: equal segments)."""
    widths = tuple(widths or (y.shape[-1] // len(enabled),) * len(enabled))
    if all(enabled) and len(set(widths)) == 1:
        return y + delta.reshape(y.shape)
    pieces, k, start = [], 0, 0
    for width, on in zip(widths, enabled):
        seg = y[..., start:start + width]
        if on:
            seg = seg + delta[..., k, :width]
            k += 1
        pieces.append(seg)
        start += width
    return jnp.concatenate(pieces, axis=-1)


def lora_delta(lora_a: Array, lora_b: Array, enabled: Sequence[bool], scaling: float,
               widths: Sequence[int] | None = None) -> Array:
    """The dense update ΔW (..., in, sum(widths)) of one layer (leading layer axes allowed);
    widths None: equal segments as wide as lora_B."""
    # HIGHEST: on GPU/TPU the default float32 matmul may run in tf32/bf16 passes.
    per_group = jnp.einsum("...gir,...gro->...gio", lora_a.astype(jnp.float32), lora_b.astype(jnp.float32),
                           precision=jax.lax.Precision.HIGHEST) * scaling
    widths = tuple(widths or (per_group.shape[-1],) * len(enabled))
    pieces, k = [], 0
    for width, on in zip(widths, enabled):
        if on:
            pieces.append(per_group[..., k, :, :width])
            k += 1
        else:
            pieces.append(jnp.zeros(per_group.shape[:-3] + (per_group.shape[-2], width), per_group.dtype))
    return jnp.concatenate(pieces, axis=-1)


def merge_lora(params: Any, lora: Any, lora_config: LoRAConfig,
               kernel_merge: Callable[..., Array] | None = None) -> Any:
    """New params with every adapter folded into its kernel: W + scaling * ΔW.

    Which output segments an adapter covers comes from the target table (`LoRAConfig.enabled`
    of the layer's module, e.g. ("attn", "c_attn")), whatever the layout above it (stacked "h"
    or per-layer "h_i"). The inputs are not modified (lit-llama merges in place on eval(); we
    never do). The sum is formed in float32 and cast back to the kernel's dtype.
    kernel_merge: what folds one kernel (default `merged_kernel`; e.g. a jitted version that
    donates the old kernel, for a merge whose peak is one kernel more than the weights).
    """
    kernel_merge = kernel_merge or merged_kernel
    flat_params = traverse_util.flatten_dict(_as_dict(params))
    flat_lora = traverse_util.flatten_dict(_as_dict(lora))
    merged = dict(flat_params)
    for path, lora_a in flat_lora.items():
        if path[-1] != "lora_A":
            continue
        layer = path[:-1]
        merged[layer + ("kernel",)] = kernel_merge(flat_params[layer + ("kernel",)], lora_a,
                                                   flat_lora[layer + ("lora_B",)], lora_config.enabled(layer[-2:]),
                                                   lora_config.scaling)
    return traverse_util.unflatten_dict(merged)


def merged_kernel(kernel: Array, lora_a: Array, lora_b: Array, enabled: Sequence[bool], scaling: float) -> Array:
    """One kernel (in, out) with its adapter folded in: W + scaling * ΔW, summed in float32, in
    W's dtype. Its segments' widths follow from its shape (`config.segment_widths`: for the
    fused q/k/v kernel, q as wide as the input)."""
    in_f, out_f = kernel.shape[-2:]
    widths = segment_widths(_QKV_MODULE, in_f, out_f) if len(enabled) > 1 else (out_f,)
    return (kernel.astype(jnp.float32) + lora_delta(lora_a, lora_b, enabled, scaling, widths)).astype(kernel.dtype)


def trainable_labels(lora: Any) -> Any:
    """'train' for every adapter leaf, 'freeze' for anything else, as optax.multi_transform labels."""
    def label(path: tuple, _: Any) -> str:
        name = getattr(path[-1], "key", None)
        return "train" if name in LORA_LEAVES else "freeze"
    return jax.tree_util.tree_map_with_path(label, lora)


def _as_dict(tree: Any) -> Any:
    return unfreeze(tree) if hasattr(tree, "unfreeze") else tree
