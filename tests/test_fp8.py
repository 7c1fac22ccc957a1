"""`--quantize fp8`: e4m3 frozen kernels whose products run in FP8 (jaxlora.model.fp8).

Unlike int8 and NF4 (weight-only: the product is exact for the dequantized kernel), FP8 also
rounds the activations and the gradients to e4m3, so a step is not the step on the dequantized
weights: the bounds below are e4m3's rounding (2^-4 relative per value), averaged by the sums."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.model.fp8 import CUBLAS_GEMMS, E4M3, FASTER_FROM_TOKENS, xla_flags_for
from jaxlora.model.quantize import Int8Kernel, dense_dot, dequantize, quantize_kernel_as
from jaxlora.train.accounting import fp8_speed_note
from jaxlora.train.steps import make_loss_fn
from test_qlora import batch, setup


def rel(a, b) -> float:
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_kernel_values_within_e4m3_rounding():
    w = 0.02 * jax.random.normal(jax.random.key(0), (256, 384))
    k = quantize_kernel_as(w, "fp8")
    assert isinstance(k, Int8Kernel) and k.q.dtype == E4M3 and k.scale.shape == (384,)
    err = np.abs(np.asarray(dequantize(k)) - np.asarray(w))
    scale = np.asarray(k.scale)[None, :]
    # normal e4m3 values: half a step, 2^-4 of the value; subnormals (below 2^-6): 2^-10 absolute
    assert np.all(err <= np.maximum(2.0**-4 * np.abs(np.asarray(w)), 2.0**-10 * scale) * (1 + 1e-6))
    assert np.all(np.abs(np.asarray(w)).max(axis=0) == pytest.approx(448.0 * np.asarray(k.scale), rel=1e-6))


@pytest.mark.parametrize("out_shape", [(512,), (4, 128)])  # a plain kernel; q/k/v split by query group
def test_product_and_input_gradient_within_fp8_error(out_shape):
    kx, kw, kg = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (2, 16, 256))
    k = quantize_kernel_as(0.02 * jax.random.normal(kw, (256, *out_shape)), "fp8", out_ndim=len(out_shape))
    wd = dequantize(k)
    g = jax.random.normal(kg, (2, 16, *out_shape))
    y = dense_dot(x, k, jnp.float32)
    dx = jax.grad(lambda x: jnp.sum(dense_dot(x, k, jnp.float32) * g))(x)
    y_ref = jnp.tensordot(x, wd, axes=1, precision="highest")
    dx_ref = jnp.tensordot(g, wd, axes=(tuple(range(2, 2 + len(out_shape))), tuple(range(1, 1 + len(out_shape)))),
                           precision="highest")
    # measured 2.7% and 2.6%: one e4m3 rounding of x (or g) on top of the kernel's
    assert 0.01 < rel(y, y_ref) < 0.04
    assert 0.01 < rel(dx, dx_ref) < 0.04


def test_a_training_step_stays_near_the_float_step():
    """The loss and the adapters' gradients against the same step on the kernels' float values
    (seven targets, two layers): only the activations' and gradients' FP8 rounding differs."""
    model, lora, fp8, _ = setup(("q", "k", "v", "o", "gate", "up", "down"), "fp8")
    is_q = lambda k: isinstance(k, Int8Kernel)  # noqa: E731
    floats = jax.tree.map(lambda k: dequantize(k) if is_q(k) else k, fp8, is_leaf=is_q)
    ids = batch()["input_ids"][0]
    loss_and_grad = jax.jit(jax.value_and_grad(lambda lo, p: make_loss_fn(model)(lo, p, ids, ids, None)[0]))
    (loss_8, grad_8), (loss_f, grad_f) = loss_and_grad(lora, fp8), loss_and_grad(lora, floats)
    errors = [rel(a, b) for a, b in zip(jax.tree.leaves(grad_8), jax.tree.leaves(grad_f))]
    print(f"loss {float(loss_8):.6f} vs {float(loss_f):.6f}; gradient errors {max(errors):.4f} max")
    assert abs(float(loss_8) - float(loss_f)) < 0.005 * float(loss_f)
    assert max(errors) < 0.1  # measured 6.3%


def test_train_notes_fp8_only_where_it_was_not_measured_faster():
    assert "512 tokens" in fp8_speed_note(512, "gpu")
    assert fp8_speed_note(FASTER_FROM_TOKENS, "gpu") is None
    assert fp8_speed_note(512, "cpu") is None  # emulated there: no speed claim
    assert fp8_speed_note(4096, "gpu", "9.0") is None and fp8_speed_note(4096, "gpu", "8.9") is None
    a100 = fp8_speed_note(4096, "gpu", "8.0")
    assert "compute capability 8.0" in a100 and "no FP8 tensor cores" in a100


def test_fp8_processes_send_gemms_to_cublas_unless_the_user_chose():
    assert xla_flags_for("fp8", "") == CUBLAS_GEMMS
    assert xla_flags_for("fp8", "--xla_dump_to=/tmp/d") == f"--xla_dump_to=/tmp/d {CUBLAS_GEMMS}"
    chosen = "--xla_gpu_enable_triton_gemm=true"
    assert xla_flags_for("fp8", chosen) == chosen
    assert xla_flags_for(None, "") == "" and xla_flags_for("nf4", "--a") == "--a"  # only FP8's GEMMs need it
