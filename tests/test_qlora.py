"""QLoRA: training with NF4 or int8 frozen weights is training with their dequantized values,
and keeps no dequantized kernel for the backward pass."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.config import LLaMAConfig, LoRAConfig
from jaxlora.model.layouts import init_variables
from jaxlora.model.llama import LLaMA
from jaxlora.model.nf4 import NF4Kernel, dequantize_nf4
from jaxlora.model.quantize import Int8Kernel, dequantize, quantize_params
from jaxlora.train.steps import make_loss_fn

CONFIG = LLaMAConfig(n_layer=2, n_head=2, n_embd=128, vocab_size=96, block_size=64)


def dequantized_params(params):
    is_q = lambda k: isinstance(k, (NF4Kernel, Int8Kernel))  # noqa: E731
    return jax.tree.map(lambda k: (dequantize_nf4(k) if isinstance(k, NF4Kernel) else dequantize(k)) if is_q(k) else k,
                        params, is_leaf=is_q)


def setup(targets=("q", "v"), mode="nf4-dq"):
    lora_config = LoRAConfig(r=4, alpha=8, dropout=0.0, targets=targets)
    model = LLaMA(CONFIG, lora_config, dtype=jnp.float32, param_dtype=jnp.float32)
    variables = init_variables(model, jax.random.key(0))
    lora = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(1), x.shape), variables["lora"])
    quantized = quantize_params(variables["params"], mode, head=False)
    return model, lora, quantized, dequantized_params(quantized)


def batch(seed=0, n_micro=2, rows=2, length=16):
    ids = jax.random.randint(jax.random.key(seed), (n_micro, rows, length), 0, CONFIG.vocab_size)
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("mode", ["nf4", "nf4-dq"])
def test_every_layer_kernel_is_nf4_and_the_rest_is_not(mode):
    _, _, quantized, _ = setup(mode=mode)
    layer = quantized["h"]
    kernels = [layer["attn"]["c_attn"]["kernel"], layer["attn"]["c_proj"]["kernel"], layer["mlp"]["c_fc1"]["kernel"],
               layer["mlp"]["c_fc2"]["kernel"], layer["mlp"]["c_proj"]["kernel"]]
    assert all(isinstance(k, NF4Kernel) and k.double_quantized == (mode == "nf4-dq") for k in kernels)
    assert kernels[0].shape == (CONFIG.n_layer, CONFIG.n_embd, 3 * CONFIG.n_embd)
    assert not isinstance(quantized["lm_head"]["kernel"], NF4Kernel)  # QLoRA keeps the LM head
    assert not isinstance(quantized["wte"]["embedding"], NF4Kernel)


@pytest.mark.parametrize("mode", ["nf4-dq", "int8"])
def test_loss_and_gradients_on_quantized_weights_equal_those_on_their_dequantized_values(mode):
    model, lora, quantized, dequantized = setup(("q", "k", "v", "o", "gate", "up", "down"), mode)
    ids = batch()["input_ids"][0]
    loss_and_grad = jax.jit(jax.value_and_grad(lambda lo, p: make_loss_fn(model)(lo, p, ids, ids, None)[0]))
    (loss_q, grad_q), (loss_f, grad_f) = loss_and_grad(lora, quantized), loss_and_grad(lora, dequantized)
    # float32 everywhere: the same numbers up to the order XLA sums them in (measured ~1e-7)
    np.testing.assert_allclose(loss_q, loss_f, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grad_q), jax.tree.leaves(grad_f)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.abs(b).max()))


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_the_backward_pass_keeps_no_dequantized_kernel(mode):
    model, lora, quantized, dequantized = setup(mode=mode)
    loss = make_loss_fn(model)
    b = batch(n_micro=1)
    ids = b["input_ids"][0]

    def residual_shapes(params):
        residuals = jax.eval_shape(lambda: jax.vjp(lambda lo: loss(lo, params, ids, ids, None)[0], lora)[1])
        return {tuple(x.shape) for x in jax.tree.leaves(residuals) if jnp.issubdtype(x.dtype, jnp.floating)}

    C, H, L = CONFIG.n_embd, CONFIG.n_hidden, CONFIG.n_layer
    kernel_shapes = {(L, C, 3 * C), (L, C, C), (L, C, H), (L, H, C)}  # the scanned layers' stacked kernels
    assert kernel_shapes & residual_shapes(dequantized)  # float weights: the kernels are residuals
    assert not kernel_shapes & residual_shapes(quantized)  # quantized: only codes and scales are kept


def test_train_py_quantizes_the_frozen_kernels_while_loading():
    from jaxlora.train.build import build_run
    from jaxlora.train.settings import TrainArgs, resolve_args
    from jaxlora.train.spec import run_spec
    a = resolve_args(TrainArgs(preset="tiny", pretrained_path="none", quantize="nf4-dq", precision="32-true",
                               batch_size=2, micro_batch_size=2, max_seq_length=32, scan_layers=False))
    r = build_run(run_spec(a), max_steps=2)
    kernels = {path: leaf for path, leaf in jax.tree_util.tree_flatten_with_path(
        r.params, is_leaf=lambda x: isinstance(x, NF4Kernel))[0]}
    quantized = [p for p, k in kernels.items() if isinstance(k, NF4Kernel)]
    assert len(quantized) == 5 * r.config.n_layer  # every projection of every layer, and nothing else
    assert not isinstance(r.params["lm_head"]["kernel"], NF4Kernel)
    ids = jax.random.randint(jax.random.key(0), (1, 2, 32), 0, r.config.vocab_size)
    state, metrics = r.train_step(r.state, r.params, r.batch({"input_ids": np.asarray(ids), "labels": np.asarray(ids)}))
    assert np.isfinite(float(metrics["loss"])) and int(state.step) == 1
