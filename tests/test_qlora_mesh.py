"""QLoRA on 8 CPU devices: training with nf4-dq, int8 and fp8 frozen kernels on a data x fsdp x
tensor mesh (2 x 2 x 2) equals training on one device; the quantized leaves are sharded like
their float kernels; a mesh that would cut an NF4 block is refused by name.

Tolerances (float32, sums in another order): the loss and gradient norm of each of 3 steps (lr
1e-2) to rtol 2e-5 (measured <= 6e-6). Adapter gradients at given adapters agree to ~7e-7 of
their largest entry, as with float weights (measured on this mesh and data=8). The adapters
themselves are not compared after the steps: AdamW's first steps move each entry by about
+-lr whatever its gradient's size, so entries whose gradient is at float32 noise level go
either way (with float weights too; tests/test_sharding.py keeps its learning rates tiny).
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import json, os, sys, tempfile
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from jaxlora import LLaMA
    from jaxlora.config import LLaMAConfig
    from jaxlora.errors import MeshError
    from jaxlora.model.layouts import init_variables
    from jaxlora.model.nf4 import NF4Kernel
    from jaxlora.train.build import build_run
    from jaxlora.train.settings import TrainArgs, resolve_args
    from jaxlora.train.spec import run_spec
    from jaxlora.weights import jaxlora_dir as cio
    from jaxlora.weights.quantized import save_quantized

    assert len(jax.devices()) == 8
    # n_embd 128: the input axes split over fsdp=2 or tensor=2 keep whole NF4 blocks of 64
    config = LLaMAConfig(n_layer=1, n_head=4, n_embd=128, vocab_size=128, block_size=64)
    base = tempfile.mkdtemp() + "/base"
    cio.save_checkpoint(base, config, None, jax.tree.map(np.asarray, init_variables(LLaMA(config),
                                                                                   jax.random.key(0))["params"]))
    ids = np.asarray(jax.random.randint(jax.random.key(3), (1, 8, 16), 0, config.vocab_size))

    def args(mode, mesh, scan, shards):
        return resolve_args(TrainArgs(pretrained_path=base, quantize=mode, precision="32-true", scan_unroll=1,
                                      batch_size=8, micro_batch_size=8 // shards, max_seq_length=16, mesh=mesh,
                                      lora_targets="q,v,o,up", lora_dropout=0.0, scan_layers=scan, warmup_steps=0,
                                      learning_rate=1e-2, out_dir="-", data_path="-", tokenizer_path="-"))

    def train(mode, mesh, scan, shards):
        r = build_run(run_spec(args(mode, mesh, scan, shards)), max_steps=2)
        state, losses = jax.tree.map(jnp.copy, r.state), []
        for _ in range(3):
            state, m = r.train_step(state, r.params, r.batch({"input_ids": ids, "labels": ids}))
            losses.append([float(m["loss"]), float(m["grad_norm"])])
        return r, losses

    report = {}
    for mode, scan in (("nf4-dq", False), ("int8", True), ("fp8", False)):  # per-layer and stacked weights
        ref, ref_losses = train(mode, "data=1", scan, 1)
        r, losses = train(mode, "data=2,fsdp=2,tensor=2", scan, 4)
        if mode == "nf4-dq":  # the quantized base saved from the mesh (per layer, q/k/v split) = from one device
            saved = [save_quantized(f"{base}-{name}", run.model, run.params, run.quantized) for name, run in
                     (("mesh", r), ("one", ref))]
            a, b = (cio.ArrayTreeReader(d / cio.PARAMS_DIR) for d in saved)
            report["saved_equal"] = a.shapes() == b.shapes() and all(np.array_equal(a.read(p), b.read(p))
                                                                     for p in a.shapes())
        kernel = r.params["h_0" if not scan else "h"]["attn"]["c_attn"]["kernel"]
        first = kernel.codes if isinstance(kernel, NF4Kernel) else kernel.q
        report[mode] = {"losses": losses, "ref_losses": ref_losses, "qkv_out_ndim": kernel.out_ndim,
                        "qkv_spec": str(first.sharding.spec), "qkv_shard": list(first.addressable_shards[0].data.shape)}
    try:
        build_run(run_spec(args("nf4", "data=2,fsdp=4", True, 8)))
        report["refused"] = None
    except MeshError as e:
        report["refused"] = str(e)
    json.dump(report, open(sys.argv[1], "w"))
""")


def test_quantized_training_on_a_mesh_equals_one_device(tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(out)], capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for mode in ("nf4-dq", "int8", "fp8"):
        run = report[mode]
        # fp8 rounds activations and gradients to e4m3 (steps of 2^-4): a float32 difference of the
        # sharded sums can move a value across a rounding boundary, hence a wider bound for its first
        # step (measured 1.1e-5); after AdamW's steps (lr 1e-2, see the docstring) such flips and the
        # entries moved +-lr by noise-level gradients add up: 6.5e-4 seen on a Sapphire Rapids CPU
        first, later = (2e-5, 2e-5) if mode != "fp8" else (1e-4, 2e-3)
        np.testing.assert_allclose(run["losses"][0], run["ref_losses"][0], rtol=first, err_msg=mode)
        np.testing.assert_allclose(run["losses"][1:], run["ref_losses"][1:], rtol=later, err_msg=mode)
        assert run["losses"][2][0] < run["losses"][0][0], run  # the adapters did train
        assert run["qkv_out_ndim"] == 2  # q/k/v split by head group over the tensor axis
    # NF4 codes (C, slots, width, C/2): width over tensor, the packed input axis over fsdp; int8 as the kernel
    assert report["nf4-dq"]["qkv_spec"] == "P(None, 'tensor', 'fsdp')"
    assert report["nf4-dq"]["qkv_shard"] == [3, 64, 32]
    assert report["int8"]["qkv_spec"] == "P(None, 'fsdp', None, 'tensor')"
    assert report["int8"]["qkv_shard"] == [1, 64, 3, 64]
    assert report["fp8"]["qkv_spec"] == "P('fsdp', None, 'tensor')"  # as int8's, per layer (no layer axis)
    assert report["saved_equal"]
    assert "--quantize nf4 on mesh data=2 x fsdp=4" in report["refused"]
    assert "h/attn/c_attn/kernel (input axis over fsdp): 128 inputs over 4 devices are 32 each" in report["refused"]
