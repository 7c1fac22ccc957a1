"""--fuse_mlp: each block's gate and up kernels held as one (C, 2, H) kernel while training.

A run layout: the same step as with the kernels apart (float32; int8 and fp8 kernels fused values
and scales alike; fp8's input gradient shares one e4m3 scale per token over gate|up), the same
train state (adapters keep their modules), the same quantized checkpoint written from it. Tolerances: losses and gradient norms of two AdamW steps within 1e-5
(the input gradient of the fused product sums over 2H columns at once: float32 noise, ~3e-7 of a
gradient measured); the tensor-parallel case is in tests/test_gqa_sharding.py.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from jaxlora.config import LLaMAConfig
from jaxlora.model.layouts import fuse_gate_up, init_variables, split_layers_on_device
from jaxlora.model.llama import LLaMA
from jaxlora.model.quantize import Int8Kernel, quantize_params
from jaxlora.train.build import build_run
from jaxlora.train.settings import TrainArgs, resolve_args
from jaxlora.train.spec import run_spec
from jaxlora.weights import jaxlora_dir as cio
from jaxlora.weights.quantized import save_quantized

SETTINGS = dict(preset="tiny", pretrained_path="none", precision="32-true", batch_size=4, micro_batch_size=2,
                max_seq_length=32, lora_targets="q,v,o,gate,up,down", lora_dropout=0.1, rng_impl="threefry2x32",
                scan_unroll=1, learning_rate=1e-2, warmup_steps=0)


@functools.lru_cache(maxsize=None)  # a run serves several tests (each build compiles: seconds on CI)
def _run(fuse: bool, quantize: str, scan_layers: bool, both_layouts: bool = False):
    a = TrainArgs(**SETTINGS, quantize=quantize, scan_layers=scan_layers, fuse_mlp=fuse,
                  fp8_both_layouts=both_layouts or None)
    r = build_run(run_spec(resolve_args(a)), max_steps=2)
    ids = np.asarray(jax.random.randint(jax.random.key(0), (2, 2, 32), 0, r.config.vocab_size))
    state, rows = r.state, []
    for _ in range(2):
        state, m = r.train_step(state, r.params, r.batch({"input_ids": ids, "labels": ids}))
        rows.append([float(m["loss"]), float(m["grad_norm"])])
    return r, state, rows


@pytest.mark.parametrize("quantize, scan_layers, both_layouts", [("none", False, False), ("int8", True, False),
                                                                ("fp8", False, False), ("fp8", False, True)])
def test_a_step_with_gate_and_up_fused_is_the_step_with_them_apart(quantize, scan_layers, both_layouts):
    apart, apart_state, want = _run(False, quantize, scan_layers, both_layouts)
    fused, fused_state, got = _run(True, quantize, scan_layers, both_layouts)
    assert fused.model.fused_mlp and not apart.model.fused_mlp
    mlp = fused.params["h" if scan_layers else "h_1"]["mlp"]
    assert set(mlp) == {"c_fc", "c_proj"}
    C, H = fused.config.n_embd, fused.config.n_hidden
    kernel = mlp["c_fc"]["kernel"]
    assert kernel.shape[-3:] == (C, 2, H) and isinstance(kernel, Int8Kernel) == (quantize != "none")
    if both_layouts:  # the forward product's copy fused alike: (2, H, C)
        assert kernel.qt.shape[-3:] == (2, H, C)
    # fp8: the fused input gradient is scaled to e4m3 per token over gate|up together (apart: a scale
    # each), so it rounds differently: 2.7e-3 measured, against e4m3's ~3% per product
    np.testing.assert_allclose(got, want, rtol=1e-5 if quantize != "fp8" else 1e-2, err_msg=quantize)
    # the train state is the same tree: checkpoints and exports cannot tell
    assert jax.tree.structure(fused_state.lora) == jax.tree.structure(apart_state.lora)


def test_a_quantized_checkpoint_written_from_fused_kernels_is_the_one_written_apart(tmp_path):
    written = []
    for fuse in (False, True):
        r, _, _ = _run(fuse, "int8", True)
        written.append(cio.ArrayTreeReader(save_quantized(tmp_path / str(fuse), r.model, r.params, r.quantized)
                                           / cio.PARAMS_DIR))
    apart, fused = written
    assert apart.shapes() == fused.shapes()
    for path in apart.shapes():
        np.testing.assert_array_equal(fused.read(path), apart.read(path), err_msg=str(path))


def test_nf4_kernels_are_not_fused_and_say_why():
    with pytest.raises(ValueError, match="--fuse_mlp keeps float, int8 or fp8 kernels, not --quantize nf4-dq"):
        resolve_args(TrainArgs(**SETTINGS, quantize="nf4-dq", fuse_mlp=True))


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_fusing_frees_each_gate_and_up_pair_as_it_goes(quantize):
    """Donation cannot reuse a (C, H) buffer for the (C, 2, H) result, and the caller's tree holds
    every block's pair until fuse_gate_up returns: unless each pair is freed at once, the peak is the
    weights plus every fused kernel (8B bf16 decoding on an H200: 35.0 against 28.0 GiB)."""
    model = LLaMA(LLaMAConfig.from_name("tiny"), scan_layers=False)
    params = split_layers_on_device(model, init_variables(model, jax.random.key(0))["params"])
    if quantize:
        params = quantize_params(params, quantize)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    pairs = [x for path, x in leaves if any(m in jax.tree_util.keystr(path) for m in ("c_fc1", "c_fc2"))]
    others = [x for path, x in leaves if "attn" in jax.tree_util.keystr(path)]
    fused = fuse_gate_up(params)
    assert pairs and all(leaf.is_deleted() for leaf in pairs)
    assert not any(leaf.is_deleted() for leaf in others)
    assert fused["h_0"]["mlp"]["c_fc"]["kernel"].shape[-2] == 2
