"""Our Flax model vs an independent PyTorch implementation of lit-llama (tests/lit_reference.py).

Same random weights (LoRA B non-zero) through the lit-llama mapping; float32 logits must
agree to <= 1e-5 relative (Frobenius) error.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import random_lit_state_dict
from lit_reference import RefConfig, RefLLaMA

from jaxlora.config import LLaMAConfig, LoRAConfig
from jaxlora.model.llama import LLaMA
from jaxlora.weights import lit_llama

TOL = 1e-5


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def build_pair(config: LLaMAConfig, lora: LoRAConfig, seed: int = 0):
    ref = RefLLaMA(RefConfig(config.n_layer, config.n_head, config.n_embd, config.vocab_size), lora_r=lora.r,
                   lora_alpha=lora.alpha, lora_dropout=0.0, lora_targets=lora.targets).eval()
    sd = random_lit_state_dict(ref, seed)
    base = {k: v for k, v in sd.items() if "lora_" not in k}
    adapters = {k: v for k, v in sd.items() if "lora_" in k}
    variables = {"params": lit_llama.lit_to_params(base, config),
                 "lora": lit_llama.lit_to_lora(adapters, config, lora)}
    return ref, LLaMA(config, lora), variables


@pytest.mark.parametrize("targets", [("q", "v"), ("k",), ("q", "k", "v", "o", "gate", "up", "down")])
def test_logits_match_reference(tiny_config, targets):
    lora = LoRAConfig(r=4, alpha=8, dropout=0.0, targets=targets)
    ref, model, variables = build_pair(tiny_config, lora)
    idx = np.random.default_rng(1).integers(0, tiny_config.vocab_size, (2, 24))
    with torch.no_grad():
        expected = ref(torch.from_numpy(idx)).numpy()
    got = np.asarray(model.apply(variables, jnp.asarray(idx)))
    assert got.shape == (2, 24, tiny_config.padded_vocab_size) and got.dtype == np.float32
    err = rel_err(got, expected)
    assert err <= TOL, err
    # The adapters matter: without them the logits move far beyond the tolerance.
    no_lora = np.asarray(LLaMA(tiny_config).apply({"params": variables["params"]}, jnp.asarray(idx)))
    assert rel_err(no_lora, expected) > 100 * TOL


def test_rope_position_offset_matches_slicing(tiny_config):
    """Explicit positions give the same logits as the implicit arange (a KV-cache prerequisite)."""
    model = LLaMA(tiny_config)
    _, _, variables = build_pair(tiny_config, LoRAConfig(r=0, targets=()))
    idx = jnp.asarray(np.random.default_rng(2).integers(0, 128, (1, 16)))
    a = model.apply({"params": variables["params"]}, idx)
    b = model.apply({"params": variables["params"]}, idx, positions=jnp.arange(16))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bf16_compute_close_to_f32(tiny_config):
    """bf16 frozen weights + bf16 compute stay near the float32 function (bf16: ~1e-2)."""
    lora = LoRAConfig(r=4, dropout=0.0)
    ref, model, variables = build_pair(tiny_config, lora)
    idx = jnp.asarray(np.random.default_rng(3).integers(0, 128, (2, 16)))
    f32 = np.asarray(model.apply(variables, idx))
    bf16_model = LLaMA(tiny_config, lora, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), variables["params"])
    got = np.asarray(bf16_model.apply({"params": params16, "lora": variables["lora"]}, idx))
    assert got.dtype == np.float32
    assert rel_err(got, f32) < 3e-2


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_and_unroll_do_not_change_the_function(tiny_config, tiny_lora, remat):
    _, model, variables = build_pair(tiny_config, tiny_lora)
    idx = jnp.asarray(np.random.default_rng(4).integers(0, 128, (2, 16)))
    base = np.asarray(model.apply(variables, idx))
    other = LLaMA(tiny_config, tiny_lora, remat=remat, scan_unroll=2)
    np.testing.assert_allclose(np.asarray(other.apply(variables, idx)), base, rtol=1e-6, atol=1e-6)


def test_per_layer_model_matches_reference(tiny_config):
    """scan_layers=False (per-layer weights, unrolled loop) computes the same function."""
    from jaxlora.model.layouts import layered
    lora = LoRAConfig(r=4, alpha=8, dropout=0.0, targets=("q", "v", "down"))
    ref, _, variables = build_pair(tiny_config, lora)
    model = LLaMA(tiny_config, lora, scan_layers=False, remat="dots")
    idx = np.random.default_rng(5).integers(0, tiny_config.vocab_size, (2, 24))
    with torch.no_grad():
        expected = ref(torch.from_numpy(idx)).numpy()
    per_layer = {name: layered(model, tree) for name, tree in variables.items()}
    assert sorted(k for k in per_layer["params"] if k.startswith("h")) == [f"h_{i}" for i in range(tiny_config.n_layer)]
    got = np.asarray(model.apply(per_layer, jnp.asarray(idx)))
    assert rel_err(got, expected) <= TOL
