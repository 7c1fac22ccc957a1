"""QLoRA: training with NF4 frozen weights is training with their dequantized values, and keeps
no dequantized kernel for the backward pass."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.config import LLaMAConfig, LoRAConfig
from jaxlora.model.layouts import init_variables
from jaxlora.model.llama import LLaMA
from jaxlora.model.nf4 import NF4Kernel, dequantize_nf4
from jaxlora.model.quantize import quantize_params
from jaxlora.train.optim import make_optimizer
from jaxlora.train.steps import init_train_state, make_loss_fn, make_train_step

CONFIG = LLaMAConfig(n_layer=2, n_head=2, n_embd=128, vocab_size=96, block_size=64)


def setup(targets=("q", "v"), mode="nf4-dq"):
    lora_config = LoRAConfig(r=4, alpha=8, dropout=0.0, targets=targets)
    model = LLaMA(CONFIG, lora_config, dtype=jnp.float32, param_dtype=jnp.float32)
    variables = init_variables(model, jax.random.key(0))
    lora = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(1), x.shape), variables["lora"])
    quantized = quantize_params(variables["params"], mode)
    dequantized = jax.tree.map(lambda k: dequantize_nf4(k) if isinstance(k, NF4Kernel) else k, quantized,
                               is_leaf=lambda x: isinstance(x, NF4Kernel))
    return model, lora, quantized, dequantized


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


@pytest.mark.parametrize("targets", [("q", "k", "v", "o", "gate", "up", "down")])
def test_a_train_step_on_nf4_weights_equals_one_on_their_dequantized_values(targets):
    model, lora, quantized, dequantized = setup(targets)
    optimizer = make_optimizer(1e-2)
    step = make_train_step(model, optimizer, donate=False)
    b = batch()
    _, m_q = step(init_train_state(lora, optimizer), quantized, b)
    _, m_f = step(init_train_state(lora, optimizer), dequantized, b)
    # float32 everywhere: the same numbers up to the order XLA sums them in (measured ~1e-7)
    np.testing.assert_allclose(m_q["loss"], m_f["loss"], rtol=1e-6)
    np.testing.assert_allclose(m_q["grad_norm"], m_f["grad_norm"], rtol=1e-5)
    # the gradients themselves (Adam's first step divides by |g| and would amplify float noise in tiny entries)
    grad = jax.jit(jax.grad(lambda lo, p: make_loss_fn(model)(lo, p, b["input_ids"][0], b["labels"][0], None)[0]))
    for a, b_ in zip(jax.tree.leaves(grad(lora, quantized)), jax.tree.leaves(grad(lora, dequantized))):
        np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-6 * float(jnp.abs(b_).max()))


def test_the_backward_pass_keeps_no_dequantized_kernel():
    model, lora, quantized, dequantized = setup()
    loss = make_loss_fn(model)
    b = batch(n_micro=1)
    ids = b["input_ids"][0]

    def residual_shapes(params):
        _, vjp = jax.vjp(lambda lo: loss(lo, params, ids, ids, None)[0], lora)
        return {tuple(x.shape) for x in jax.tree.leaves(vjp) if jnp.issubdtype(x.dtype, jnp.floating)}

    C, H, L = CONFIG.n_embd, CONFIG.n_hidden, CONFIG.n_layer
    kernel_shapes = {(L, C, 3 * C), (L, C, C), (L, C, H), (L, H, C)}  # the scanned layers' stacked kernels
    assert kernel_shapes & residual_shapes(dequantized)  # float weights: the kernels are residuals
    assert not kernel_shapes & residual_shapes(quantized)  # NF4: only codes and scales are kept
