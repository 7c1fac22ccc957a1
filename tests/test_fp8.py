"""`--quantize fp8`: e4m3 frozen kernels whose products run in FP8 (jaxlora.model.fp8).

Unlike int8 and NF4 (weight-only: the product is exact for the dequantized kernel), FP8 also
rounds the activations and the gradients to e4m3, so a step is not the step on the dequantized
weights: the bounds below are e4m3's rounding (2^-4 relative per value), averaged by the sums."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.model.fp8 import CUBLAS_GEMMS, E4M3, FASTER_FROM_TOKENS, xla_flags_for
from jax.sharding import PartitionSpec

from jaxlora.model.quantize import (
    Int8Kernel,
    dense_dot,
    dequantize,
    int8_specs,
    quantize_kernel_as,
    with_forward_layouts,
    without_forward_layouts,
)
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


def test_fp8_processes_with_one_layout_send_gemms_to_cublas_unless_the_user_chose():
    assert xla_flags_for("fp8", "") == CUBLAS_GEMMS
    assert xla_flags_for("fp8", "", both_layouts=True) == ""  # XLA's defaults were faster there
    assert xla_flags_for("fp8", "--xla_dump_to=/tmp/d") == f"--xla_dump_to=/tmp/d {CUBLAS_GEMMS}"
    chosen = "--xla_gpu_enable_triton_gemm=true"
    assert xla_flags_for("fp8", chosen) == chosen
    assert xla_flags_for(None, "") == "" and xla_flags_for("nf4", "--a") == "--a"  # only FP8's GEMMs need it


@pytest.mark.parametrize("out_shape", [(96,), (3, 32)])
def test_a_kernel_in_both_layouts_computes_the_same_product_and_gradient(out_shape):
    """--fp8_both_layouts: the forward product reads the transposed copy instead of transposing q."""
    kx, kw = jax.random.split(jax.random.key(3))
    x = jax.random.normal(kx, (2, 8, 64))
    k = quantize_kernel_as(0.02 * jax.random.normal(kw, (64, *out_shape)), "fp8", out_ndim=len(out_shape))
    both = with_forward_layouts({"layer": {"kernel": k}, "norm": jnp.ones(3)})
    kb = both["layer"]["kernel"]
    assert kb.qt.shape == (*out_shape, 64) and kb.qt.dtype == E4M3 and kb.nbytes == k.nbytes + k.q.size
    np.testing.assert_array_equal(np.asarray(kb.qt, np.float32), np.moveaxis(np.asarray(k.q, np.float32), 0, -1))
    f = jax.jit(lambda x, kern: dense_dot(x, kern, jnp.float32))
    np.testing.assert_allclose(f(x, kb), f(x, k), rtol=1e-6, atol=1e-6)
    grad = jax.jit(jax.grad(lambda x, kern: jnp.sum(jnp.sin(dense_dot(x, kern, jnp.float32)))))
    np.testing.assert_allclose(grad(x, kb), grad(x, k), rtol=1e-6, atol=1e-6)
    assert without_forward_layouts(both)["layer"]["kernel"].qt is None


def test_both_layouts_shard_the_copy_like_its_kernel():
    k = quantize_kernel_as(jnp.ones((4, 16, 24)), "fp8")  # a stacked (layer, in, out) kernel
    specs = int8_specs(with_forward_layouts(k), PartitionSpec(None, "fsdp", "tensor"))
    assert specs.q == PartitionSpec(None, "fsdp", "tensor") and specs.scale == PartitionSpec(None, "tensor")
    assert specs.qt == PartitionSpec(None, "tensor", "fsdp")
    assert int8_specs(k, PartitionSpec(None, "fsdp", "tensor")).qt is None


def test_train_py_keeps_fp8_kernels_in_both_layouts_when_asked():
    from jaxlora.train.accounting import weight_bytes
    from jaxlora.train.build import build_run
    from jaxlora.train.settings import TrainArgs, resolve_args
    from jaxlora.train.spec import run_spec

    def run(both: bool) -> tuple:
        a = resolve_args(TrainArgs(preset="tiny", pretrained_path="none", quantize="fp8", precision="32-true",
                                   batch_size=2, micro_batch_size=2, max_seq_length=32, scan_layers=False,
                                   fp8_both_layouts=both))
        r = build_run(run_spec(a), max_steps=2)
        ids = np.asarray(jax.random.randint(jax.random.key(0), (1, 2, 32), 0, r.config.vocab_size))
        _, metrics = r.train_step(r.state, r.params, r.batch({"input_ids": ids, "labels": ids}))
        kernels = [k for k in jax.tree.leaves(r.params, is_leaf=lambda x: isinstance(x, Int8Kernel))
                   if isinstance(k, Int8Kernel)]
        return float(metrics["loss"]), kernels, r.config

    loss_one, kernels_one, config = run(False)
    loss_both, kernels_both, _ = run(True)
    assert all(k.qt is None for k in kernels_one) and all(k.qt is not None for k in kernels_both)
    assert len(kernels_both) == 5 * config.n_layer
    assert loss_both == pytest.approx(loss_one, rel=1e-6)
    one, both = (weight_bytes(config, "32-true", "fp8", b) for b in (False, True))
    dense = config.n_layer * sum(i * o for i, o in config.dense_shapes().values())
    assert both - one == dense  # one more byte a dense weight
    with pytest.raises(ValueError, match="--fp8_both_layouts needs --quantize fp8"):
        resolve_args(TrainArgs(preset="tiny", pretrained_path="none", quantize="int8", fp8_both_layouts=True))
