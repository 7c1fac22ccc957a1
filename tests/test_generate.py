"""KV-cache generation (jaxlora.infer.decode) against full forward passes and a naive decoder.

Tiny random model, float32. Tolerances: cached logits equal the full forward's within 1e-5
(observed ~2e-7). int8 accuracy: tests/test_quantize.py.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.config import LLaMAConfig, LoRAConfig
from jaxlora.infer.decode import GREEDY, Sampling, generate, greedy_generate, prepare, sample_logits
from jaxlora.model.layouts import init_variables, layered
from jaxlora.model.llama import LLaMA, init_cache
from jaxlora.model.nf4 import NF4Kernel
from jaxlora.model.quantize import Int8Kernel, dequantize


@pytest.fixture(scope="module")
def model_and_vars():
    config = LLaMAConfig.from_name("tiny")
    model = LLaMA(config, LoRAConfig(r=4, targets=("q", "v", "o", "up")))
    variables = init_variables(model, jax.random.key(0))
    # Non-zero B, so the adapters take part.
    variables["lora"] = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape),
                                     variables["lora"])
    return model, variables


_APPLY = {}
_NAIVE_LEN = 32


def naive_greedy(model, variables, prompt, n, vocab_size=None):
    """The reference: a full forward pass over the whole sequence for every new token (in a
    fixed right-padded buffer, so it compiles once: causal attention hides the padding)."""
    ids = list(prompt)
    apply = _APPLY.setdefault(model, jax.jit(model.apply))
    for _ in range(n):
        buf = np.zeros((1, _NAIVE_LEN), np.int32)
        buf[0, :len(ids)] = ids
        logits = np.asarray(apply(variables, buf))[0, len(ids) - 1]
        ids.append(int(np.argmax(logits[:vocab_size or model.config.vocab_size])))
    return np.asarray(ids[len(prompt):], np.int32)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_cached_decoding_gives_the_full_forward_logits(model_and_vars, scan_layers):
    model, variables = model_and_vars
    model = model.clone(scan_layers=scan_layers)
    variables = {k: layered(model, t) for k, t in variables.items()}
    seq = jax.random.randint(jax.random.key(2), (2, 12), 0, model.config.vocab_size)
    full = np.asarray(model.apply(variables, seq))
    prefill = 5
    logits, cache = jax.jit(lambda v, s: model.apply(v, s, cache=init_cache(model, 2, 64)))(variables, seq[:, :prefill])
    step = jax.jit(lambda v, tok, t, c: model.apply(v, tok, positions=jnp.full((2, 1), t), cache=c, cache_index=t,
                                                    kv_mask=jnp.broadcast_to(jnp.arange(64) <= t, (2, 64))))
    got = [np.asarray(logits)]
    for t in range(prefill, seq.shape[1]):  # one token at a time, each at its slot
        logits, cache = step(variables, seq[:, t:t + 1], jnp.int32(t), cache)
        got.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(got, axis=1), full, atol=1e-5, rtol=0)


def test_batch_of_prompts_matches_naive_loop_and_each_prompt_alone(model_and_vars):
    model, variables = model_and_vars
    prompts = [[1, 5, 9], [3, 4, 8, 20, 7, 2], [11]]
    got = greedy_generate(model, variables, prompts, 5, eos_id=None)
    for p, g in zip(prompts, got):
        np.testing.assert_array_equal(g, naive_greedy(model, variables, p, 5))
        np.testing.assert_array_equal(g, greedy_generate(model, variables, p, 5, eos_id=None))


def test_vocab_limit_keeps_ids_decodable(model_and_vars):
    """A tokenizer smaller than the model's vocabulary: no id it cannot decode comes out."""
    model, variables = model_and_vars
    got = greedy_generate(model, variables, [2, 7, 1], 8, eos_id=None, vocab_size=6)
    assert got.max() < 6
    np.testing.assert_array_equal(got, naive_greedy(model, variables, [2, 7, 1], 8, vocab_size=6))


def test_per_layer_model_and_merged_adapters_generate_the_same_tokens(model_and_vars):
    model, variables = model_and_vars
    want = greedy_generate(model, variables, [4, 4, 9], 6, eos_id=None)
    per_layer = model.clone(scan_layers=False)
    # stacked variables, converted inside the program
    np.testing.assert_array_equal(greedy_generate(per_layer, variables, [4, 4, 9], 6, eos_id=None), want)
    for merge in (True, False):  # prepare: per-layer weights split once; adapters merged or not
        m, v = prepare(per_layer, jax.tree.map(jnp.copy, variables), merge=merge)
        assert ("lora" in v) == (not merge) and (m.lora is None) == merge
        np.testing.assert_array_equal(generate(m, v, [[4, 4, 9]], 6)[0], want)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_gate_and_up_fused_for_decoding_compute_what_they_did_apart(model_and_vars, scan_layers):
    """prepare fuses each block's gate and up kernels into one (C, 2, H) kernel (adapters merged
    here): the same logits as the two kernels apart (float32: within 1e-5, the same sums per
    column), the same tokens; int8 kernels likewise (values and scales fused)."""
    model, variables = model_and_vars
    model = model.clone(scan_layers=scan_layers)
    seq = jax.random.randint(jax.random.key(4), (2, 12), 0, model.config.vocab_size)
    C, H = model.config.n_embd, model.config.n_hidden
    for quantize in (None, "int8"):
        fused_model, fused = prepare(model, jax.tree.map(jnp.copy, variables), quantize=quantize)
        apart_model, apart = prepare(model, jax.tree.map(jnp.copy, variables), quantize=quantize, fuse_mlp=False)
        assert fused_model.fused_mlp and not apart_model.fused_mlp
        mlp = fused["params"]["h" if scan_layers else "h_1"]["mlp"]
        assert set(mlp) == {"c_fc", "c_proj"}, set(mlp)
        kernel = mlp["c_fc"]["kernel"]
        if quantize:
            assert isinstance(kernel, Int8Kernel) and kernel.out_ndim == 2 and kernel.scale.shape[-2:] == (2, H)
        assert kernel.shape[-3:] == (C, 2, H)
        np.testing.assert_allclose(np.asarray(fused_model.apply(fused, seq)), np.asarray(apart_model.apply(apart, seq)),
                                   rtol=1e-5, atol=1e-5, err_msg=str(quantize))
        prompts = [[3, 1, 4, 1, 5], [9, 2]]
        for a, b in zip(generate(fused_model, fused, prompts, 6), generate(apart_model, apart, prompts, 6)):
            np.testing.assert_array_equal(a, b)


def test_unmerged_adapters_on_fused_gate_and_up_keep_their_own_variables(model_and_vars):
    model, variables = model_and_vars  # adapters on up
    fused_model, fused = prepare(model, jax.tree.map(jnp.copy, variables), merge=False)
    assert fused_model.fused_mlp and "c_fc" in fused["params"]["h"]["mlp"] and "c_fc2" in fused["lora"]["h"]["mlp"]
    apart_model, apart = prepare(model, jax.tree.map(jnp.copy, variables), merge=False, fuse_mlp=False)
    seq = jax.random.randint(jax.random.key(4), (2, 12), 0, model.config.vocab_size)
    np.testing.assert_allclose(np.asarray(fused_model.apply(fused, seq)), np.asarray(apart_model.apply(apart, seq)),
                               rtol=1e-5, atol=1e-5)


def test_eos_stops_each_row_and_is_not_returned(model_and_vars):
    model, variables = model_and_vars
    free = greedy_generate(model, variables, [[5, 6, 7], [9, 1]], 8, eos_id=None)
    k = next(i for i in range(1, 8) if free[0][i] not in free[0][:i])
    eos = int(free[0][k])
    got = greedy_generate(model, variables, [[5, 6, 7], [9, 1]], 8, eos_id=eos)
    np.testing.assert_array_equal(got[0], free[0][:k])
    cut = np.flatnonzero(free[1] == eos)
    np.testing.assert_array_equal(got[1], free[1][:cut[0]] if len(cut) else free[1])
    streamed = []
    generate(model, variables, [[5, 6, 7]], 8, eos_id=eos, chunk=2, on_tokens=lambda rows: streamed.extend(rows[0]))
    np.testing.assert_array_equal(streamed, free[0][:k])  # streaming in chunks gives the same tokens


def test_twenty_steps_give_the_naive_tokens_and_a_late_eos_ends_them(model_and_vars):
    model, variables = model_and_vars
    n = 20
    free = greedy_generate(model, variables, [3, 8, 2], n, eos_id=None)
    np.testing.assert_array_equal(free, naive_greedy(model, variables, [3, 8, 2], n))
    k = next((i for i in range(9, n) if free[i] not in free[:i]), None)
    if k is not None:  # an EOS late in the run: the tokens before it, nothing after
        np.testing.assert_array_equal(greedy_generate(model, variables, [3, 8, 2], n, eos_id=int(free[k])), free[:k])


def test_top_k_and_top_p_never_sample_outside(model_and_vars):
    logits = jax.random.normal(jax.random.key(5), (4, 50)) * 1.5
    keys = jax.random.split(jax.random.key(6), 300)
    for sampling in (Sampling(1.0, top_k=5), Sampling(1.0, top_k=None, top_p=0.6), Sampling(0.7, top_k=8, top_p=0.5)):
        draws = np.asarray(jax.vmap(lambda key: sample_logits(logits, key, sampling))(keys))  # (300, 4)
        for b, row in enumerate(np.asarray(logits)):
            order = np.argsort(-row)
            allowed = order[:sampling.top_k] if sampling.top_k else order
            probs = np.exp(row[allowed] / sampling.temperature)
            probs /= probs.sum()
            before = np.cumsum(probs) - probs
            allowed = allowed[before < sampling.top_p]  # the nucleus of the top-k
            assert set(draws[:, b]) <= set(allowed), (sampling, b)
            assert len(set(draws[:, b])) == len(allowed)  # it samples (300 draws reach every allowed id)


def test_same_seed_same_sample(model_and_vars):
    model, variables = model_and_vars
    s = Sampling(temperature=1.0, top_k=50)
    a = generate(model, variables, [[1, 2, 3]], 10, s, seed=3)[0]
    b = generate(model, variables, [[1, 2, 3]], 10, s, seed=3)[0]
    c = generate(model, variables, [[1, 2, 3]], 10, s, seed=4)[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_decode_runs_on_int8_kernels(model_and_vars):
    """Accuracy of int8 against float32: tests/test_quantize.py."""
    model, variables = model_and_vars
    m, v = prepare(model, jax.tree.map(jnp.copy, variables), merge=True, quantize="int8")
    assert isinstance(v["params"]["h"]["attn"]["c_attn"]["kernel"], Int8Kernel)
    seq = [3, 1, 4, 1, 5, 9, 2, 6]
    got = generate(m, v, [seq, seq[:5]], 6)
    assert [len(o) for o in got] == [6, 6]
    # the same model with each int8 kernel replaced by the float32 kernel it stands for: same tokens
    dequantized = jax.tree.map(lambda k: dequantize(k) if isinstance(k, Int8Kernel) else k, v,
                               is_leaf=lambda k: isinstance(k, Int8Kernel))
    for a, b in zip(got, generate(m, dequantized, [seq, seq[:5]], 6)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mode, scan_layers", [("nf4", True), ("nf4-dq", False)])
def test_nf4_decoding_with_the_cache_equals_the_full_forward_of_the_same_quantized_model(model_and_vars, mode,
                                                                                        scan_layers):
    """generate --quantize nf4: NF4 kernels (the LM head kept), adapters unmerged as QLoRA trains
    them; greedy tokens with the KV cache = argmax of full forward passes of that model."""
    model, variables = model_and_vars
    m, v = prepare(model.clone(scan_layers=scan_layers), jax.tree.map(jnp.copy, variables), merge=True, quantize=mode)
    layer = v["params"]["h" if scan_layers else "h_1"]
    assert isinstance(layer["mlp"]["c_fc1"]["kernel"], NF4Kernel) and "lora" in v and m.lora is not None
    assert not isinstance(v["params"]["lm_head"]["kernel"], NF4Kernel)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [7, 7]]
    for prompt, got in zip(prompts, generate(m, v, prompts, 6, GREEDY)):
        np.testing.assert_array_equal(got, naive_greedy(m, v, prompt, 6))


def test_bad_input_is_named(model_and_vars):
    model, variables = model_and_vars
    with pytest.raises(ValueError, match="empty prompt"):
        greedy_generate(model, variables, [[1, 2], []], 3, eos_id=None)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate(model, variables, [[1] * 250], 10, GREEDY)
    with pytest.raises(ValueError, match="top_k must be > 0"):
        Sampling(top_k=0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        Sampling(temperature=-0.5)


SHARDED = """
import os
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
import jax, numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
from jaxlora import LLaMA, LLaMAConfig, LoRAConfig, init_variables
from jaxlora.infer.decode import greedy_generate, prepare
from jaxlora.model.layouts import split_layers_on_device
from jaxlora.parallel.sharding import make_mesh, variable_shardings
model = LLaMA(LLaMAConfig.from_name("tiny"), LoRAConfig(r=4, targets=("q", "v", "up")), scan_layers=False)
v = init_variables(model, jax.random.key(0))
v["lora"] = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), v["lora"])
prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11]]
want = greedy_generate(model, v, prompts, 6, eos_id=None)
mesh = make_mesh(data=2, fsdp=2, tensor=2)
stacked, run = variable_shardings(model, mesh), variable_shardings(model, mesh, as_run=True)
def placed(tree, shardings):  # fresh arrays: device_put may return its input, and splitting consumes them
    return jax.device_put(jax.tree.map(np.array, tree), shardings)
params = split_layers_on_device(model, placed(v["params"], stacked["params"]), run["params"])
got = greedy_generate(model, {"params": params, "lora": jax.device_put(v["lora"], stacked["lora"])}, prompts, 6,
                      eos_id=None)
assert all(np.array_equal(a, b) for a, b in zip(want, got)), (want, got)
# prepared on the mesh: adapters merged into the sharded kernels, gate and up fused
params = split_layers_on_device(model, placed(v["params"], stacked["params"]), run["params"])
m, pv = prepare(model, {"params": params, "lora": jax.device_put(v["lora"], stacked["lora"])})
assert m.fused_mlp
got = greedy_generate(m, pv, prompts, 6, eos_id=None)
assert all(np.array_equal(a, b) for a, b in zip(want, got)), (want, got)
print("OK")
"""


def test_params_sharded_over_a_mesh_give_the_same_tokens():
    """8 CPU devices, weights split per layer on a (data, fsdp, tensor) mesh: jit follows their shardings."""
    out = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
