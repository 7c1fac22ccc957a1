"""Tensor-parallel training of grouped-query attention models on 8 CPU devices equals one device.

k/v heads split over tensor when it divides n_kv_head (2 kv heads, tensor=2, with gate and up in one
kernel as --fuse_mlp holds them) and replicated when it does not (multi-query, tensor=2); adapters on
q, k, v, o and up. float32, as test_sharding;
three SGD steps, adapters compared to float32 noise.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from fast_compile import default_env

from jaxlora.config import LLaMAConfig
from jaxlora.errors import MeshError
from jaxlora.parallel.sharding import check_mesh

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np, optax
    jax.config.update("jax_default_matmul_precision", "highest")
    from jaxlora import LLaMA, LLaMAConfig, LoRAConfig, init_variables
    from jaxlora.model.layouts import fuse_gate_up, split_layers_on_device
    from jaxlora.parallel import sharding as shd
    from jaxlora.train.steps import init_train_state, make_train_step

    assert len(jax.devices()) == 8
    # Plain SGD: the step is the gradient scaled, so the sharded sums' float32 noise stays noise
    # (AdamW moves an entry whose gradient is at noise level by +-lr, either way).
    optimizer = optax.sgd(0.05)
    ids = jax.random.randint(jax.random.key(1), (2, 8, 32), 0, 128)
    batch = {"input_ids": ids, "labels": ids}

    def run(model, params, lora, batch):
        step = make_train_step(model, optimizer, donate=False)
        state = init_train_state(lora, optimizer)
        for _ in range(3):
            state, m = step(state, params, batch)
        return state, m

    # 2 kv heads: split over tensor, per-layer weights (as on GPU), gate|up fused (--fuse_mlp);
    # 1: replicated, scanned layers
    for kv, spec, scan_layers, fused in ((2, "data=2,fsdp=2,tensor=2", False, True), (1, "tensor=2", True, False)):
        config = LLaMAConfig(n_layer=2, n_head=4, n_kv_head=kv, n_embd=64, vocab_size=128, block_size=64,
                             intermediate_size=96, rope_type="llama3", rope_factor=8.0, rope_original_context=16)
        model = LLaMA(config, LoRAConfig(r=4, dropout=0.0, targets=("q", "k", "v", "o", "up")))
        variables = init_variables(model, jax.random.key(0))
        # B != 0, so the k/v adapters matter: small and of random sign (a constant added to A and B
        # made every adapter push q and k the same way, saturating attention; the gradient then
        # moved by 1e-3 for a 3e-8 change of the adapters, and the check compared chaos)
        variables["lora"] = jax.tree_util.tree_map_with_path(
            lambda path, x: x + 0.05 * jax.random.normal(jax.random.key(x.size), x.shape)
            if "lora_B" in jax.tree_util.keystr(path) else x, variables["lora"])
        ref_state, ref_m = run(model, variables["params"], variables["lora"], batch)
        mesh = shd.mesh_from_spec(spec, config)
        sharded = model.clone(mesh=mesh, rules=shd.DEFAULT_RULES, split_qkv=True, scan_layers=scan_layers)
        stored, run_sh = shd.variable_shardings(model, mesh), shd.variable_shardings(sharded, mesh, as_run=True)
        params = split_layers_on_device(sharded, jax.device_put(jax.tree.map(np.array, variables["params"]),
                                                                stored["params"]), run_sh["params"])
        if fused:  # the fused (C, 2, H) kernel split along H: each device both halves of its columns
            sharded = sharded.clone(fused_mlp=True)
            params = fuse_gate_up(params, shd.variable_shardings(sharded, mesh, as_run=True)["params"])
            up = params["h_0"]["mlp"]["c_fc"]["kernel"]
            assert up.shape == (64, 2, 96) and up.addressable_shards[0].data.shape == (32, 2, 48), up.sharding
        lora = jax.device_put(variables["lora"], stored["lora"])
        state, m = run(sharded, params, lora, jax.device_put(batch, shd.batch_sharding(mesh)))
        np.testing.assert_allclose(float(m["loss"]), float(ref_m["loss"]), rtol=1e-5)
        paths = [p for p, _ in jax.tree_util.tree_leaves_with_path(state.lora)]
        for path, a, b, init in zip(paths, *(jax.tree.leaves(t) for t in (state.lora, ref_state.lora, variables["lora"]))):
            moved = np.max(np.abs(np.asarray(b) - np.asarray(init)))
            # float32 noise: 1.5e-8 apart measured, against 2e-4 (up's A) to 8e-3 moved
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
            assert moved > 1e-4, (jax.tree_util.keystr(path), moved)  # trained: the check is not vacuous
        layer = params["h"] if scan_layers else params["h_0"]
        kernel = layer["attn"]["c_attn"]["kernel"]  # (C, group + 2, run_kv * hs), last axis over tensor
        run_kv = max(kv, 2)
        assert kernel.shape[-2:] == (4 // run_kv + 2, run_kv * 16), kernel.shape
        assert kernel.addressable_shards[0].data.shape[-1] == run_kv * 16 // 2  # whole query groups per device
        print("ok", kv, spec, scan_layers, float(m["loss"]))
    print("OK")
""")


def test_gqa_tensor_parallel_training_matches_one_device():
    # At XLA's default optimization level, where its tolerances were measured (-O0 machine code,
    # tests/fast_compile.py, sums in another order).
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=900, cwd=ROOT,
                         env=default_env())
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]


def test_mesh_check_names_the_numbers():
    config = LLaMAConfig(n_layer=1, n_head=8, n_kv_head=2, n_embd=64, vocab_size=128)
    check_mesh({"data": 1, "fsdp": 1, "tensor": 4}, config)  # k/v heads replicated: 2 -> 4
    with pytest.raises(MeshError, match="tensor=3 does not divide n_head=8"):
        check_mesh({"data": 1, "fsdp": 1, "tensor": 3}, config)
