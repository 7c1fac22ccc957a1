"""MergedLoRADense semantics, functional merging, and the adapter-only optimizer."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.config import LLaMAConfig, LoRAConfig
from jaxlora.model.layouts import init_variables
from jaxlora.model.llama import LLaMA
from jaxlora.model.lora import MergedLoRADense, merge_lora
from jaxlora.train.optim import make_optimizer
from jaxlora.train.steps import init_train_state, make_train_step


def randomize_lora(lora, seed=0):
    """Non-zero A and B (a fresh adapter has B = 0 and would hide mistakes)."""
    leaves, treedef = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [0.1 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def jit_apply(model):
    """model.apply compiled once per signature (eager apply re-traces the layer scan every call)."""
    return jax.jit(model.apply, static_argnames=("deterministic",))


def tokens(seed, shape=(2, 16), vocab=128):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape))


@pytest.mark.parametrize("targets", [("q", "v"), ("k", "v"), ("q", "k", "v", "o", "gate", "up", "down")])
def test_merged_forward_equals_unmerged(tiny_config, targets):
    lora_cfg = LoRAConfig(r=4, alpha=8, dropout=0.0, targets=targets)
    model = LLaMA(tiny_config, lora_cfg)
    variables = init_variables(model, jax.random.key(0))
    lora = randomize_lora(variables["lora"])
    params_before = jax.tree.map(np.array, variables["params"])
    merged = merge_lora(variables["params"], lora, lora_cfg)
    idx = tokens(1)
    unmerged_logits = model.apply({"params": variables["params"], "lora": lora}, idx)
    merged_logits = LLaMA(tiny_config).apply({"params": merged}, idx)
    np.testing.assert_allclose(np.asarray(merged_logits), np.asarray(unmerged_logits), rtol=1e-5, atol=1e-5)
    # The merge is functional: the original frozen weights are untouched.
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), variables["params"], params_before)
    # and it did change the targeted kernels (k is untouched for q,v).
    c_attn = np.asarray(merged["h"]["attn"]["c_attn"]["kernel"]) - params_before["h"]["attn"]["c_attn"]["kernel"]
    C = tiny_config.n_embd
    for g, name in enumerate("qkv"):
        block = c_attn[..., g * C:(g + 1) * C]
        assert (np.abs(block).max() > 0) == (name in targets), name


def test_fresh_adapter_is_identity(tiny_config):
    variables = init_variables(LLaMA(tiny_config, LoRAConfig(r=8)), jax.random.key(0))
    assert all(float(jnp.abs(b).max()) == 0 for b in jax.tree.leaves(variables["lora"])[1::2])  # B = 0
    assert all(float(jnp.abs(a).max()) > 0 for a in jax.tree.leaves(variables["lora"])[0::2])  # A random
    idx = tokens(2)
    with_lora = LLaMA(tiny_config, LoRAConfig(r=8)).apply(variables, idx)
    without = LLaMA(tiny_config).apply({"params": variables["params"]}, idx)
    np.testing.assert_array_equal(np.asarray(with_lora), np.asarray(without))


def test_lora_a_init_bound():
    layer = MergedLoRADense(features=96, groups=3, enabled=(True, False, True), r=8)
    v = layer.init(jax.random.key(0), jnp.ones((1, 400)))
    a = np.asarray(v["lora"]["lora_A"].value if hasattr(v["lora"]["lora_A"], "value") else v["lora"]["lora_A"])
    assert a.shape == (2, 400, 8)
    assert np.abs(a).max() <= 1 / np.sqrt(400) and np.abs(a).max() > 0.9 / np.sqrt(400)


def test_dropout_only_when_not_deterministic(tiny_config):
    lora_cfg = LoRAConfig(r=4, dropout=0.5)
    model = LLaMA(tiny_config, lora_cfg)
    variables = init_variables(model, jax.random.key(0))
    variables = {"params": variables["params"], "lora": randomize_lora(variables["lora"])}
    idx = tokens(3)
    apply = jit_apply(model)
    eval_a = apply(variables, idx, deterministic=True)
    eval_b = apply(variables, idx, deterministic=True, rngs={"dropout": jax.random.key(7)})
    np.testing.assert_array_equal(np.asarray(eval_a), np.asarray(eval_b))
    train_a = apply(variables, idx, deterministic=False, rngs={"dropout": jax.random.key(1)})
    train_b = apply(variables, idx, deterministic=False, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(np.asarray(train_a), np.asarray(eval_a))
    assert not np.allclose(np.asarray(train_a), np.asarray(train_b))
    # Dropout is on the adapter input only: with B = 0 training-mode output equals eval output.
    fresh = init_variables(model, jax.random.key(0))
    np.testing.assert_array_equal(
        np.asarray(apply(fresh, idx, deterministic=False, rngs={"dropout": jax.random.key(1)})),
        np.asarray(apply(fresh, idx, deterministic=True)))


def test_optimizer_step_updates_adapters_only(tiny_config):
    lora_cfg = LoRAConfig(r=4, dropout=0.05, targets=("q", "v", "down"))
    model = LLaMA(tiny_config, lora_cfg)
    variables = init_variables(model, jax.random.key(0))
    params = variables["params"]
    frozen_before = jax.tree.map(np.array, params)
    optimizer = make_optimizer(1e-2, weight_decay=0.01)
    state = init_train_state(variables["lora"], optimizer)
    lora_before = jax.tree.map(np.array, state.lora)

    # The optimizer state holds adapter-shaped leaves only (Adam's mu and nu, plus counters).
    adapter_shapes = sorted(x.shape for x in jax.tree.leaves(state.lora))
    state_shapes = [x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert sorted(state_shapes) == sorted(adapter_shapes * 2)
    frozen_shapes = {x.shape for x in jax.tree.leaves(params)}
    assert not frozen_shapes & set(state_shapes)

    step = make_train_step(model, optimizer, donate=False)
    ids = tokens(4, (2, 2, 16))
    for _ in range(2):  # the first step has lr 0 under warmup-from-zero; this schedule is constant
        state, metrics = step(state, params, {"input_ids": ids, "labels": ids})
    assert np.isfinite(float(metrics["loss"]))
    for a, b in zip(jax.tree.leaves(state.lora), jax.tree.leaves(lora_before)):
        assert not np.array_equal(np.asarray(a), b)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, frozen_before)


def test_targets_validated():
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        LoRAConfig(targets=("q", "wq"))
    assert LoRAConfig(targets=("v", "q")).targets == ("q", "v")


def test_7b_counts_from_shapes():
    config = LLaMAConfig.from_name("7B")
    assert config.n_hidden == 11008 and config.padded_vocab_size == 32000
    assert config.num_params() == 6_738_415_616
    assert LoRAConfig(r=8).num_params(config) == 4_194_304


def test_target_table_places_each_adapter_where_the_model_and_the_mapping_put_it(tiny_config):
    """Each target alone: the model's adapter sits at the table's module, covers one segment, and
    the lit-llama mapping and parse_targets (PEFT names) agree with the table."""
    from flax import traverse_util

    from jaxlora.config import LORA_TARGETS, parse_targets
    from jaxlora.model.layouts import abstract_variables
    from jaxlora.weights import lit_llama
    assert parse_targets(",".join(t.peft_name for t in LORA_TARGETS.values())) == tuple(LORA_TARGETS)
    for target in LORA_TARGETS.values():
        lora = LoRAConfig(r=4, targets=(target.name,))
        flat = traverse_util.flatten_dict(abstract_variables(LLaMA(tiny_config, lora))["lora"])
        assert set(flat) == {("h", *target.module, "lora_A"), ("h", *target.module, "lora_B")}, target
        assert flat[("h", *target.module, "lora_A")].shape[:2] == (tiny_config.n_layer, 1)
        enabled = lora.enabled(target.module)
        assert sum(enabled) == 1 and enabled[target.group or 0]
        keys = [m.lit_key for m in lit_llama.lora_maps(tiny_config, lora)]
        assert keys == [f"transformer.h.{{i}}.{target.lit_module}.lora_A", f"transformer.h.{{i}}.{target.lit_module}.lora_B"]


def test_split_kernel_equals_the_fused_kernel():
    """MergedLoRADense(split_kernel=True) reads (in, 3, out/3) and returns (..., 3, out/3): the
    fused layer's output, group by group, adapters on the first and last group."""
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    fused = MergedLoRADense(features=24, groups=3, enabled=(True, False, True), r=4, scaling=2.0)
    split = fused.clone(split_kernel=True)
    variables = nn.unbox(fused.init(jax.random.key(1), x))
    variables["lora"] = jax.tree.map(lambda v: v + 0.1, variables["lora"])  # B non-zero
    kernel = variables["params"]["kernel"]
    grouped = {**variables, "params": {"kernel": kernel.reshape(16, 3, 8)}}
    want = fused.apply(variables, x).reshape(2, 5, 3, 8)
    np.testing.assert_allclose(split.apply(grouped, x), want, rtol=1e-6, atol=1e-6)
