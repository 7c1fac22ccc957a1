"""Greedy generation against a naive loop of full forward passes (tiny random model)."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxlora.config import LLaMAConfig, LoRAConfig
from jaxlora.generate import greedy_generate
from jaxlora.model import LLaMA, init_variables


@pytest.fixture(scope="module")
def model_and_vars():
    config = LLaMAConfig.from_name("tiny")
    model = LLaMA(config, LoRAConfig(r=4))
    variables = init_variables(model, jax.random.key(0))
    # Non-zero B, so the adapters take part.
    variables["lora"] = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape),
                                     variables["lora"])
    return model, variables


_APPLY = {}


def naive_greedy(model, variables, prompt, n, vocab_size=None):
    ids = list(prompt)
    apply = _APPLY.setdefault(model, jax.jit(model.apply))  # one jit per model: each length compiles once
    for _ in range(n):
        logits = np.asarray(apply(variables, np.asarray([ids], np.int32)))[0, -1]
        ids.append(int(np.argmax(logits[:vocab_size or model.config.vocab_size])))
    return np.asarray(ids[len(prompt):], np.int32)


def test_batch_of_prompts_matches_naive_loop(model_and_vars):
    model, variables = model_and_vars
    prompts = [[1, 5, 9], [3, 4, 8, 20, 7, 2], [11]]
    got = greedy_generate(model, variables, prompts, 5, eos_id=None)
    for p, g in zip(prompts, got):
        np.testing.assert_array_equal(g, naive_greedy(model, variables, p, 5))


def test_vocab_limit_keeps_ids_decodable(model_and_vars):
    """A tokenizer smaller than the model's vocabulary: no id it cannot decode comes out."""
    model, variables = model_and_vars
    got = greedy_generate(model, variables, [2, 7, 1], 8, eos_id=None, vocab_size=6)
    assert got.max() < 6
    np.testing.assert_array_equal(got, naive_greedy(model, variables, [2, 7, 1], 8, vocab_size=6))


def test_per_layer_model_generates_the_same_tokens(model_and_vars):
    model, variables = model_and_vars
    per_layer = model.clone(scan_layers=False)
    a = greedy_generate(model, variables, [4, 4, 9], 6, eos_id=None)
    b = greedy_generate(per_layer, variables, [4, 4, 9], 6, eos_id=None)  # stacked variables, converted inside
    np.testing.assert_array_equal(a, b)
