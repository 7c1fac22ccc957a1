"""Stacked vs per-layer variable layouts (jaxlora.model.llama): conversions and the train step."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlora.config import LLaMAConfig, LoRAConfig
from jaxlora.model.layouts import init_variables, layered, split_layers_on_device, stack_layers, unstack_layers
from jaxlora.model.llama import LLaMA
from jaxlora.train.steps import init_train_state, make_train_step


def _trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_unstack_then_stack_is_the_identity():
    tree = {"h": {"w": jnp.arange(24.0).reshape(3, 2, 4), "b": jnp.arange(3.0)}, "head": jnp.ones(5)}
    per_layer = unstack_layers(tree, 3)
    assert set(per_layer) == {"h_0", "h_1", "h_2", "head"}
    np.testing.assert_array_equal(per_layer["h_2"]["w"], tree["h"]["w"][2])
    _trees_equal(stack_layers(per_layer), tree)
    assert unstack_layers(per_layer, 3) == per_layer and stack_layers(tree) == tree  # already in that layout


def test_init_is_the_same_whichever_layout_runs():
    config, lora = LLaMAConfig.from_name("tiny"), LoRAConfig(r=4)
    a = init_variables(LLaMA(config, lora), jax.random.key(3))
    b = init_variables(LLaMA(config, lora, scan_layers=False), jax.random.key(3))
    _trees_equal(a, b)
    assert "h" in b["params"] and "h" in b["lora"]  # stored stacked


def test_split_on_device_equals_unstack():
    config = LLaMAConfig.from_name("tiny")
    model = LLaMA(config, scan_layers=False)
    params = init_variables(model, jax.random.key(0))["params"]
    expected = unstack_layers(jax.tree.map(np.asarray, params), config.n_layer)
    stacked = jax.tree.leaves(params["h"])
    _trees_equal(split_layers_on_device(model, params), expected)
    # consumed a leaf at a time: a slice cannot take over a stacked buffer by donation, and the
    # caller's tree holds them all, so without deleting each one the peak is twice the weights
    # (8B decoding on an H200: 28.0 GiB for 15.0 of weights)
    assert stacked and all(x.is_deleted() for x in stacked)
    assert not params["wte"]["embedding"].is_deleted()


def test_train_step_with_per_layer_weights_matches_scanned():
    """Same adapters, loss and grad norm after two steps; the train state stays stacked.
    (Without dropout: the two layouts draw their dropout masks from different key splits.)"""
    config, lora_cfg = LLaMAConfig.from_name("tiny"), LoRAConfig(r=4, dropout=0.0)
    scanned, per_layer = LLaMA(config, lora_cfg, remat="dots"), LLaMA(config, lora_cfg, remat="dots", scan_layers=False)
    variables = init_variables(scanned, jax.random.key(0))
    # Non-zero B, so the adapters shape the loss and the gradients of A are non-zero.
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), variables["lora"])
    ids = jax.random.randint(jax.random.key(2), (1, 2, 16), 0, config.vocab_size)
    batch = {"input_ids": ids, "labels": ids}
    opt = optax.adam(1e-2)
    results = []
    for model, params in ((scanned, variables["params"]), (per_layer, layered(per_layer, variables["params"]))):
        state = init_train_state(lora, opt, seed=7)
        step = make_train_step(model, opt, donate=False)
        for _ in range(2):
            state, metrics = step(state, params, batch)
        results.append((state, metrics))
    (s1, m1), (s2, m2) = results
    assert "h" in s2.lora and jax.tree.structure(s1.lora) == jax.tree.structure(s2.lora)
    for x, y in zip(jax.tree.leaves(s1.lora), jax.tree.leaves(s2.lora)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m1["grad_norm"]), float(m2["grad_norm"]), rtol=1e-5)


def test_random_base_weights_are_the_same_in_every_run_layout():
    """train.py's random base (run.random_params) is drawn per layer in the layout the run reads,
    so no device holds a stacked copy to split: the numbers must not depend on that layout."""
    from flax import traverse_util

    from jaxlora.parallel import sharding as shd
    from jaxlora.weights.load import random_params

    config, mesh = LLaMAConfig.from_name("tiny"), shd.make_mesh(data=1)
    reference_model = LLaMA(config, param_dtype=jnp.bfloat16)  # stacked, fused q/k/v: the stored layout
    reference = traverse_util.flatten_dict(
        random_params(reference_model, 3, shd.variable_shardings(reference_model, mesh)["params"]))
    for scan_layers in (True, False):
        for split_qkv in (False, True):
            model = LLaMA(config, param_dtype=jnp.bfloat16, scan_layers=scan_layers, split_qkv=split_qkv)
            params = random_params(model, 3, shd.variable_shardings(model, mesh, as_run=True)["params"])
            flat = traverse_util.flatten_dict(layered(reference_model, params))  # back to stacked
            assert flat.keys() == reference.keys()
            for path, want in reference.items():
                got = np.asarray(flat[path]).reshape(want.shape)  # (C, 3, C) -> (C, 3C) for split q/k/v
                np.testing.assert_array_equal(got, np.asarray(want), err_msg=str((scan_layers, split_qkv, path)))
    kernel = np.asarray(reference[("h", "attn", "c_attn", "kernel")], np.float32)
    assert abs(kernel.std() - 0.02) < 0.002 and not np.array_equal(kernel[0], kernel[1])  # N(0, 0.02), per layer
    assert (np.asarray(reference[("h", "rms_1", "scale")]) == 1).all()
