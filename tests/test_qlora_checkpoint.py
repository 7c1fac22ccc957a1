"""Quantized checkpoints (train.py --save_quantized), quantized kernels in the tensor-parallel
q/k/v layout, and merged exports of adapters trained on a quantized base.

Tolerances: the checkpoint round trip and the run-layout conversions are exact (bit for bit);
a merged export merges in float32 and rounds once, so "trained" from a float base equals the
merge from a quantized checkpoint bit for bit, and equals merge_lora on the dequantized kernel
to float32 rounding (1e-6 of the kernel's scale).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxlora.config import LLaMAConfig, LoRAConfig
from jaxlora.errors import CheckpointError
from jaxlora.model.layouts import (
    QKV_KERNEL,
    init_variables,
    qkv_in_run_layout,
    qkv_in_stored_layout,
    quantize_in_run_layout,
)
from jaxlora.model.llama import LLaMA
from jaxlora.model.lora import merge_lora
from jaxlora.model.quantize import Int8Kernel, NF4Kernel, dequantize_program, quantize_kernel_as
from jaxlora.parallel import sharding as shd
from jaxlora.train.build import build_run, frozen_quantizer
from jaxlora.train.settings import TrainArgs, resolve_args
from jaxlora.train.spec import run_spec
from jaxlora.train.steps import make_loss_fn
from jaxlora.weights import jaxlora_dir as cio
from jaxlora.weights import lit_llama
from jaxlora.weights.convert import checkpoint_to_lit
from jaxlora.weights.load import load_checkpoint, load_params
from jaxlora.weights.quantized import record, requantized, save_quantized

TINY = LLaMAConfig.from_name("tiny")
GQA = LLaMAConfig(n_layer=1, n_head=4, n_kv_head=2, n_embd=64, vocab_size=64, block_size=32)
MODES = ("nf4", "nf4-dq", "int8")
is_q = lambda x: isinstance(x, (Int8Kernel, NF4Kernel))  # noqa: E731


def flat(params):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def assert_same_leaves(a, b):
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for key in fa:
        assert fa[key].dtype == fb[key].dtype and np.array_equal(fa[key], fb[key]), key


@pytest.fixture(scope="module")
def float_base(tmp_path_factory):
    """A tiny float32 base as a jaxlora checkpoint (random N(0, 0.02) kernels)."""
    directory = tmp_path_factory.mktemp("base") / "ck"
    params = jax.tree.map(np.asarray, init_variables(LLaMA(TINY), jax.random.key(0))["params"])
    cio.save_checkpoint(directory, TINY, None, params)
    return directory


def load(model, source, mode=None):
    shardings = shd.variable_shardings(model, shd.make_mesh(data=1), as_run=True)["params"]
    transform = frozen_quantizer(mode, model) if mode else None
    return load_params(model, "jaxlora", str(source), 0, jnp.float32, shardings, transform)


@pytest.mark.parametrize("mode, scan_layers", [("nf4", True), ("nf4-dq", False), ("int8", True), ("fp8", False)])
def test_a_quantized_checkpoint_loads_back_bit_for_bit_without_quantizing(float_base, tmp_path, mode, scan_layers):
    model = LLaMA(TINY, param_dtype=jnp.float32, scan_layers=scan_layers)
    fresh = load(model, float_base, mode)
    save_quantized(tmp_path / "q", model, fresh, record(mode, jnp.float32))
    assert cio.read_quantized(tmp_path / "q") == {"mode": mode, "dtype": "float32"}
    again = load(model, tmp_path / "q")  # no transform: nothing is quantized again
    kernels = [x for x in jax.tree.leaves(again, is_leaf=is_q) if is_q(x)]
    assert len(kernels) == (5 if scan_layers else 5 * TINY.n_layer)
    assert_same_leaves(again, fresh)
    other = LLaMA(TINY, param_dtype=jnp.float32, scan_layers=not scan_layers)  # the other run layout
    assert_same_leaves(load(other, tmp_path / "q"), load(other, float_base, mode))


def test_training_from_a_quantized_checkpoint_equals_training_from_fresh_quantization(float_base, tmp_path):
    def args(base):
        return resolve_args(TrainArgs(pretrained_path=str(base), preset="tiny", quantize="nf4-dq", precision="32-true",
                                      batch_size=4, micro_batch_size=2, max_seq_length=32, lora_targets="q,v,up",
                                      warmup_steps=0, learning_rate=1e-2, out_dir="-", data_path="-",
                                      tokenizer_path="-"))
    fresh = build_run(run_spec(args(float_base)), max_steps=2)
    save_quantized(tmp_path / "q", fresh.model, fresh.params, fresh.quantized)
    loaded = build_run(run_spec(args(tmp_path / "q")), max_steps=2)
    assert loaded.quantized == fresh.quantized == {"mode": "nf4-dq", "dtype": "float32"}
    assert_same_leaves(loaded.params, fresh.params)
    ids = np.asarray(jax.random.randint(jax.random.key(1), (2, 2, 32), 0, TINY.vocab_size))
    batch = fresh.batch({"input_ids": ids, "labels": ids})
    runs = []
    for params in (fresh.params, loaded.params):  # the same compiled step on each
        state = jax.tree.map(jnp.copy, fresh.state)  # the step donates its state
        for _ in range(2):
            state, metrics = fresh.train_step(state, params, batch)
        runs.append((float(metrics["loss"]), flat(state.lora)))
    assert runs[0][0] == runs[1][0]
    assert all(np.array_equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


def test_a_quantized_checkpoint_serves_only_its_own_mode(float_base, tmp_path):
    model = LLaMA(TINY, param_dtype=jnp.float32)
    save_quantized(tmp_path / "q", model, load(model, float_base, "nf4"), record("nf4", jnp.float32))
    with pytest.raises(FileExistsError, match="already exists"):  # written once, atomically
        save_quantized(tmp_path / "q", model, load(model, float_base, "nf4"), record("nf4", jnp.float32))
    with pytest.raises(CheckpointError, match="not nf4-dq-quantized as expected"):
        save_quantized(tmp_path / "bad", model, load(model, float_base, "nf4"), record("nf4-dq", jnp.float32))
    assert not (tmp_path / "bad").exists() and [p.name for p in tmp_path.iterdir()] == ["q"]
    for wanted, pattern in (("int8", r"holds nf4-quantized frozen weights, --quantize int8 was asked for"),
                            ("none", r"holds nf4-quantized frozen weights; load it with --quantize nf4")):
        a = resolve_args(TrainArgs(pretrained_path=str(tmp_path / "q"), preset="tiny", quantize=wanted,
                                   precision="32-true", batch_size=2, micro_batch_size=2, max_seq_length=32))
        with pytest.raises(CheckpointError, match=pattern):
            build_run(run_spec(a))
    with pytest.raises(CheckpointError, match="a quantized checkpoint"):
        load_checkpoint(tmp_path / "q")
    with pytest.raises(ValueError, match="--save_quantized .* needs --quantize"):
        resolve_args(TrainArgs(save_quantized=str(tmp_path / "x")))


@pytest.mark.parametrize("mode", MODES)
def test_quantized_qkv_kernel_in_the_tensor_parallel_layout(mode):
    """Grouped-query attention split by query group (not a reshape of the stored columns):
    quantizing the run-layout kernel gives the stored kernel's quantization moved there (double
    quantization over the stored order, each row recording its stored row), and back exactly."""
    model = LLaMA(GQA, param_dtype=jnp.float32, split_qkv=True)
    path = ("h",) + QKV_KERNEL
    stored = 0.02 * jax.random.normal(jax.random.key(3), (GQA.n_layer, GQA.n_embd, GQA.n_embd + 2 * GQA.kv_size))
    run = qkv_in_run_layout(model, path, stored)
    assert run.shape == (GQA.n_layer, GQA.n_embd, 4, 32)  # (C, group + 2, run_kv * hs): slots re-ordered
    got = quantize_in_run_layout(model, path, run, mode)
    want = quantize_kernel_as(stored, mode)
    assert got.out_ndim == 2 and (getattr(got, "rows", None) is not None) == (mode == "nf4-dq")
    assert_same_leaves(got, qkv_in_run_layout(model, path, want))
    np.testing.assert_array_equal(dequantize_program(got), qkv_in_run_layout(model, path, dequantize_program(want)))
    assert_same_leaves(qkv_in_stored_layout(model, path, got), want)


def test_the_split_qkv_model_on_quantized_kernels_computes_the_fused_one(mode="nf4-dq"):
    """The tensor-parallel layout's product (x @ (C, slots, width) kernel and its backward) on
    quantized kernels: same logits and adapter gradients as the stored layout (float32)."""
    lora_config = LoRAConfig(r=4, alpha=8, targets=("q", "k", "v", "o"))
    fused = LLaMA(GQA, lora_config, param_dtype=jnp.float32)
    variables = init_variables(fused, jax.random.key(0))
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), variables["lora"])
    params = traverse_util.unflatten_dict({p: quantize_kernel_as(x, mode) if p[-1] == "kernel" and p[0] != "lm_head"
                                           else x for p, x in traverse_util.flatten_dict(variables["params"]).items()})
    split = fused.clone(split_qkv=True)
    split_params = traverse_util.unflatten_dict({p: qkv_in_run_layout(split, p, x) for p, x in
                                                 traverse_util.flatten_dict(params, is_leaf=lambda _, x: is_q(x)).items()})
    ids = jax.random.randint(jax.random.key(2), (2, 8), 0, GQA.vocab_size)

    def loss(model, frozen):
        return jax.jit(jax.value_and_grad(lambda lo, p: make_loss_fn(model)(lo, p, ids, ids, None)[0]))(lora, frozen)
    with jax.default_matmul_precision("highest"):
        want, want_grad = loss(fused, params)
        got, got_grad = loss(split, split_params)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(jnp.abs(b).max()))


def test_merged_export_folds_qlora_adapters_into_the_kernels_they_were_trained_on(float_base, tmp_path):
    """Adapters recorded as trained on an nf4-dq base: the merged lit-llama file folds them into
    the dequantized kernels by default, from the float base or from the quantized checkpoint
    alike; --merge_into original folds them into the float weights, off by NF4's error."""
    torch = pytest.importorskip("torch")
    lora_config = LoRAConfig(r=4, alpha=8, targets=("q", "v"))
    rng = np.random.default_rng(1)
    lora = traverse_util.unflatten_dict({p: (0.05 * rng.standard_normal(x.shape)).astype(np.float32) for p, x in
                                         cio.expected_variables(TINY, lora_config)["lora"].items()})
    trained_on = record("nf4-dq", jnp.float32)
    cio.save_checkpoint(tmp_path / "adapters", TINY, lora_config, None, lora, base=str(float_base), quantized=trained_on)
    quantized = load(LLaMA(TINY, param_dtype=jnp.float32), float_base, "nf4-dq")
    save_quantized(tmp_path / "q", LLaMA(TINY, param_dtype=jnp.float32), quantized, trained_on)
    notes = []
    for base, name, into in ((float_base, "trained", "trained"), (tmp_path / "q", "from_q", "trained"),
                             (float_base, "original", "original")):
        checkpoint_to_lit(base, tmp_path / f"{name}.pth", kind="merged", adapters_dir=tmp_path / "adapters",
                          merge_into=into, progress=False, log=notes.append)
    assert "dequantized as in training" in notes[0] and "dequantized kernels of" in notes[1]
    assert "original float kernels" in notes[2]
    out = {n: {k: v.numpy() for k, v in torch.load(tmp_path / f"{n}.pth").items()}
           for n in ("trained", "from_q", "original")}
    for key in out["trained"]:
        np.testing.assert_array_equal(out["trained"][key], out["from_q"][key], err_msg=key)
    # the reference: merge_lora on the dequantized kernels, in float32
    dequantized = jax.tree.map(lambda x: dequantize_program(x) if is_q(x) else x, quantized, is_leaf=is_q)
    want = lit_llama.tree_to_lit({"params": merge_lora(dequantized, lora, lora_config)},
                                 lit_llama.base_maps(TINY), TINY.n_layer)
    for key, value in want.items():
        np.testing.assert_allclose(out["trained"][key], value, rtol=0, atol=1e-6 * np.abs(value).max(), err_msg=key)
    deviation = {k: np.linalg.norm(out["trained"][k] - v) / np.linalg.norm(v) for k, v in out["original"].items()}
    kernels = [k for k in deviation if k.endswith(".weight") and "transformer.h." in k]
    assert all(0.05 < deviation[k] < 0.15 for k in kernels), deviation  # NF4's error (README: ~10%)
    assert all(deviation[k] == 0 for k in deviation if k not in kernels)  # norms, embeddings, LM head as stored
    # a base quantized otherwise, or asked for float weights it does not store, is refused by name
    with pytest.raises(CheckpointError, match="no original float weights"):
        checkpoint_to_lit(tmp_path / "q", tmp_path / "x.pth", kind="merged", adapters_dir=tmp_path / "adapters",
                          merge_into="original", progress=False)
    cio.save_checkpoint(tmp_path / "int8_adapters", TINY, lora_config, None, lora, quantized=record("int8", "float32"))
    with pytest.raises(CheckpointError, match="trained on a int8-quantized base, but .* holds nf4-dq"):
        checkpoint_to_lit(tmp_path / "q", tmp_path / "x.pth", kind="merged", adapters_dir=tmp_path / "int8_adapters",
                          progress=False)
    assert not (tmp_path / "x.pth").exists()


def test_requantized_is_what_the_run_multiplies_by():
    """The merged export's stand-in for a trained-on kernel: the run's storage dtype, quantized,
    dequantized (bf16-true: quantized from the bf16 weights)."""
    w = np.asarray(0.02 * jax.random.normal(jax.random.key(4), (128, 64)))
    got = requantized(w, record("nf4", jnp.bfloat16))
    want = dequantize_program(quantize_kernel_as(jnp.asarray(w, jnp.bfloat16), "nf4"))
    np.testing.assert_array_equal(got, np.asarray(want))
