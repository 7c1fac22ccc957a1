"""Sharded training on 8 CPU devices computes what one device computes."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from jaxlora import LLaMA, LLaMAConfig, LoRAConfig, init_variables
    from jaxlora.optim import make_optimizer
    from jaxlora.sharding import make_mesh, variable_shardings, batch_sharding
    from jaxlora.steps import init_train_state, make_train_step

    assert len(jax.devices()) == 8
    model = LLaMA(LLaMAConfig.from_name("tiny"), LoRAConfig(r=4, dropout=0.0, targets=("q", "v", "up")))
    variables = init_variables(model, jax.random.key(0))
    optimizer = make_optimizer(1e-2)
    ids = jax.random.randint(jax.random.key(1), (2, 8, 32), 0, 128)
    batch = {"input_ids": ids, "labels": ids}
    step = make_train_step(model, optimizer, donate=False)

    def run(params, lora, batch):
        state = init_train_state(lora, optimizer)
        for _ in range(3):
            state, m = step(state, params, batch)
        return state, m

    ref_state, ref_m = run(variables["params"], variables["lora"], batch)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sh = variable_shardings(model, mesh)
    params = jax.device_put(variables["params"], sh["params"])
    lora = jax.device_put(variables["lora"], sh["lora"])
    kernel = params["h"]["mlp"]["c_fc1"]["kernel"]
    assert len(kernel.sharding.device_set) == 8 and kernel.addressable_shards[0].data.shape == (2, 32, 128)
    state, m = run(params, lora, jax.device_put(batch, batch_sharding(mesh)))
    np.testing.assert_allclose(float(m["loss"]), float(ref_m["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state.lora), jax.tree.leaves(ref_state.lora)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)

    # Per-layer weights (scan_layers=False): split on the mesh, same result; adapters stay stacked.
    from jaxlora.model import split_layers_on_device
    per_layer = model.clone(scan_layers=False)
    step = make_train_step(per_layer, optimizer, donate=False)
    run_sh = variable_shardings(per_layer, mesh, as_run=True)
    split = split_layers_on_device(per_layer, jax.device_put(variables["params"], sh["params"]), run_sh["params"])
    fc1 = split["h_1"]["mlp"]["c_fc1"]["kernel"]
    assert fc1.sharding == run_sh["params"]["h_1"]["mlp"]["c_fc1"]["kernel"] and fc1.addressable_shards[0].data.shape == (32, 128)
    state, m = run(split, lora, jax.device_put(batch, batch_sharding(mesh)))
    np.testing.assert_allclose(float(m["loss"]), float(ref_m["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state.lora), jax.tree.leaves(ref_state.lora)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    print("OK")
""")


def test_sharded_step_matches_single_device():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
