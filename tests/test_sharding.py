"""Sharded training on 8 CPU devices computes what one device computes; meshes are checked.

Tolerances: float32 throughout. Losses of sharded runs equal the single-device run's to
rtol 1e-6 (only the order of the sums differs), adapters to 5e-5 of their largest value.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from jaxlora import LLaMA, LLaMAConfig, LoRAConfig, init_variables
    from jaxlora.train.optim import make_optimizer
    from jaxlora.parallel.sharding import make_mesh, variable_shardings, batch_sharding
    from jaxlora.train.steps import init_train_state, make_train_step

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
    from jaxlora.model.layouts import split_layers_on_device
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


LOAD_SCRIPT = textwrap.dedent("""
    import os, sys, tempfile
    from pathlib import Path
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    sys.path.insert(0, "tests")
    import jax, jax.numpy as jnp, numpy as np
    from flax import traverse_util
    from jaxlora import LLaMA, LoRAConfig
    from jaxlora.weights import jaxlora_dir as checkpoint_io
    from jaxlora.parallel import sharding as shd
    from jaxlora.weights.lit_files import load_lit_llama
    from jaxlora.model.layouts import layered
    from jaxlora.weights.load import load_params
    from test_convert import TINY, save_lit

    tmp = Path(tempfile.mkdtemp())
    pth = save_lit(tmp / "lit", LoRAConfig(r=0))[0]
    _, _, stored = load_lit_llama(pth)  # numpy, stacked layers, fused q/k/v
    want = traverse_util.flatten_dict(stored["params"])
    checkpoint_io.save_checkpoint(tmp / "ck", TINY, None, params=stored["params"])
    mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
    for kind, source in (("lit", pth), ("jaxlora", tmp / "ck")):
        for scan_layers in (True, False):
            for split_qkv in (False, True):
                model = LLaMA(TINY, param_dtype=jnp.float32, scan_layers=scan_layers, split_qkv=split_qkv,
                              mesh=mesh, rules=shd.DEFAULT_RULES)
                shardings = shd.variable_shardings(model, mesh, as_run=True)["params"]
                params = load_params(model, kind, str(source), 0, jnp.float32, shardings)
                assert jax.tree.structure(params) == jax.tree.structure(shardings)
                for got, where in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
                    assert got.sharding == where, (kind, scan_layers, split_qkv, got.sharding, where)
                got = traverse_util.flatten_dict(layered(LLaMA(TINY), params))  # back to the stored layout
                assert got.keys() == want.keys()
                for path, value in want.items():
                    np.testing.assert_array_equal(np.asarray(got[path]).reshape(value.shape), value,
                                                  err_msg=str((kind, scan_layers, split_qkv, path)))
    print("OK")
""")


def test_checkpoints_load_straight_into_every_run_layout():
    """lit-llama .pth and jaxlora checkpoints go to the devices in the run's layout (per-layer or
    stacked, q/k/v split or fused) on a 2x2x2 mesh, layer by layer, bit for bit and sharded by
    the rules: no stacked copy is split on the device afterwards."""
    out = subprocess.run([sys.executable, "-c", LOAD_SCRIPT], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


# ----------------------------------------------------------------------------- the training loop on meshes

@pytest.fixture(scope="module")
def mesh_reports(tmp_path_factory) -> dict:
    """tests/mesh_runs.py's report: the runs of the three tests below, in one process."""
    out = tmp_path_factory.mktemp("mesh") / "report.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "mesh_runs.py"), str(out)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_training_on_meshes_matches_one_device(mesh_reports):
    """data=8, fsdp=8 and 2x2x2: 4 steps with dropout and accumulation."""
    report = mesh_reports["equality"]
    assert set(report["runs"]) == {"data=8", "fsdp=8", "data=2,fsdp=2,tensor=2"}
    for mesh, run in report["runs"].items():
        np.testing.assert_allclose(run["losses"], report["ref_losses"], rtol=1e-6, err_msg=mesh)
        np.testing.assert_allclose(run["val_loss"], run["ref_val_loss"], rtol=1e-6, err_msg=mesh)
        assert run["max_rel"] < 5e-5, (mesh, run)


def test_checkpoint_resumes_on_another_mesh_and_on_one_device(mesh_reports):
    """2 steps on 2x2x2, then 2 more on data=8 / on one device == 4 steps on one device."""
    report = mesh_reports["resume"]
    for target, run in report.items():
        assert run["step"] == 4, target
        assert run["max_rel"] < 5e-5, (target, run)


def test_every_array_is_sharded_as_the_rules_say(mesh_reports):
    report = mesh_reports["layout"]
    assert report["checked"] > 30 and report["bad"] == []
    assert report["fc1_shard"] == [32, 128]  # (embed 64 / fsdp 2, mlp 256 / tensor 2)
    assert report["batch_spec"] == "P(None, ('data', 'fsdp'), None)"


def _env(devices: int) -> dict[str, str]:
    flags = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    return {**os.environ, "XLA_FLAGS": flags,
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "JAXLORA_COMPILE_CACHE": ""}


def test_demo_trains_on_a_2x2x2_mesh_from_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "--mesh", "data=2,fsdp=2,tensor=2", "--max_steps", "4",
                           "--out_dir", str(tmp_path / "demo"), "--exact_match_samples", "4", "--no_progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=_env(8))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mesh: data=2 x fsdp=2 x tensor=2 over 8 cpu device(s) on 1 host(s)" in proc.stdout
    assert "=== LoRA fine-tuning: 4 steps" in proc.stdout
    assert (tmp_path / "demo" / "adapters").is_dir() and (tmp_path / "demo" / "checkpoints" / "4").is_dir()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
    """Two processes of 4 CPU devices each, joined by jax.distributed, == one process of 8."""
    import torch
    sys.path.insert(0, str(ROOT / "tests"))
    from test_train import small_assets
    assets = small_assets()
    common = ["--preset", "tiny", "--pretrained_path", "none", "--tokenizer_path", assets["tokenizer"],
              "--data_path", assets["data"], "--mesh", "data=2,fsdp=2,tensor=2", "--batch_size", "16",
              "--micro_batch_size", "2", "--max_steps", "4", "--lora_r", "4", "--lora_alpha", "8",
              "--lora_dropout", "0.1", "--rng_impl", "threefry2x32", "--max_seq_length", "96", "--eval_interval", "2",
              "--eval_iters", "1", "--save_interval", "2", "--val_size", "8", "--precision", "32-true",
              "--exact_match_samples", "2", "--sample_instruction=Reverse the word.", "--max_new_tokens", "4",
              "--no_progress", "--no_plot"]
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "train.py", *common, "--out_dir", str(tmp_path / "two"),
                               "--coordinator_address", f"localhost:{port}", "--num_processes", "2",
                               "--process_id", str(i)], cwd=ROOT, env=_env(4), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    # the one-process run at the same time: the pair alone leaves a core idle much of the time
    # (its output to a file: a pipe left unread until the pair ends could fill and stall it)
    with open(tmp_path / "one.err", "w") as log:
        one = subprocess.Popen([sys.executable, "train.py", *common, "--out_dir", str(tmp_path / "one")], cwd=ROOT,
                               env=_env(8), stdout=subprocess.DEVNULL, stderr=log)
        try:
            outs = [p.communicate(timeout=600) for p in procs]
            one.wait(timeout=600)
        finally:
            for p in (*procs, one):
                if p.poll() is None:
                    p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert one.returncode == 0, (tmp_path / "one.err").read_text()[-3000:]
    assert "on 2 host(s)" in outs[0][0]
    for marker in ("data:", "mesh:", "step", "outputs in"):  # process 1 prints nothing of ours (gloo may chatter)
        assert marker not in outs[1][0], outs[1][0]

    def read(run: str) -> tuple[list, dict]:
        rows = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        lora = torch.load(tmp_path / run / "lit-llama-lora-finetuned.pth", weights_only=True)
        return rows, {k: v.float().numpy() for k, v in lora.items()}
    rows_two, lora_two = read("two")
    rows_one, lora_one = read("one")
    assert [r["type"] for r in rows_two] == [r["type"] for r in rows_one]
    for a, b in zip(rows_two, rows_one):
        for key in ("loss", "val_loss", "exact_match"):
            if b.get(key) is not None:
                np.testing.assert_allclose(a[key], b[key], rtol=1e-6, err_msg=key)
    for key in lora_one:
        scale = np.abs(lora_one[key]).max()
        np.testing.assert_allclose(lora_two[key], lora_one[key], atol=5e-5 * scale, err_msg=key)


# ----------------------------------------------------------------------------- bad meshes

@pytest.mark.parametrize("spec, pattern", [
    ("data=2,fsdp", r"'fsdp' is not AXIS=SIZE"),
    ("pipeline=2", r"unknown axes \['pipeline'\]"),
    ("tensor=two", r"size of 'tensor' is not an integer"),
    ("fsdp=0", r"axis sizes must be >= 1"),
])
def test_bad_mesh_specs_are_refused(spec, pattern):
    from jaxlora.errors import MeshError
    from jaxlora.parallel.sharding import parse_mesh
    with pytest.raises(MeshError, match=pattern):
        parse_mesh(spec)


def test_meshes_that_do_not_fit_devices_or_model_fail_at_once():
    from jaxlora.config import LLaMAConfig
    from jaxlora.errors import MeshError
    from jaxlora.parallel.sharding import check_mesh, make_mesh
    devices = [object()] * 8
    with pytest.raises(MeshError, match=r"fsdp=3 x tensor=1 = 3 does not divide the 8 devices"):
        make_mesh(fsdp=3, devices=devices)
    with pytest.raises(MeshError, match=r"data=3 x fsdp=1 x tensor=1 = 3 devices does not divide the 8 devices"):
        make_mesh(data=3, devices=devices)
    tiny = LLaMAConfig.from_name("tiny")  # 4 heads, n_embd 64, MLP 256, vocab 128
    with pytest.raises(MeshError, match=r"tensor=3 does not divide n_head=4"):
        check_mesh({"data": 1, "fsdp": 1, "tensor": 3}, tiny)
    with pytest.raises(MeshError, match=r"fsdp=3 does not divide n_embd=64"):
        check_mesh({"data": 1, "fsdp": 3, "tensor": 1}, tiny)
    with pytest.raises(MeshError, match=r"tensor=8 does not divide n_head=4"):
        check_mesh({"data": 1, "fsdp": 1, "tensor": 8}, tiny)


def test_batch_must_divide_over_the_batch_shards():
    from jaxlora.errors import MeshError
    from jaxlora.train.build import fit_micro_batch
    with pytest.raises(MeshError, match=r"batch_size 6 does not divide over the mesh's 4 batch shards"):
        fit_micro_batch(6, 1, 4, print)
    assert fit_micro_batch(16, 16, 4, lambda m: None) == 4  # the demo's 16-row micro-batch on 4 shards
    assert fit_micro_batch(128, 4, 4, lambda m: None) == 4


def test_default_layout_shards_only_what_does_not_fit():
    from types import SimpleNamespace

    from jaxlora.config import LLaMAConfig
    from jaxlora.parallel.sharding import default_mesh_shape

    def gpus(n, gib=80):
        stats = {"bytes_limit": gib << 30}
        return [SimpleNamespace(process_index=0, memory_stats=lambda: stats) for _ in range(n)]
    assert default_mesh_shape(LLaMAConfig.from_name("7B"), gpus(4)) == {"data": 4, "fsdp": 1, "tensor": 1}
    assert default_mesh_shape(LLaMAConfig.from_name("13B"), gpus(2)) == {"data": 2, "fsdp": 1, "tensor": 1}
    assert default_mesh_shape(LLaMAConfig.from_name("30B"), gpus(4)) == {"data": 2, "fsdp": 1, "tensor": 2}
    assert default_mesh_shape(LLaMAConfig.from_name("30B"), gpus(2, gib=141)) == {"data": 2, "fsdp": 1, "tensor": 1}
    assert default_mesh_shape(LLaMAConfig.from_name("65B"), gpus(4)) == {"data": 1, "fsdp": 1, "tensor": 4}
    assert default_mesh_shape(LLaMAConfig.from_name("65B"), gpus(2, gib=141)) == {"data": 1, "fsdp": 1, "tensor": 2}
    two_hosts = gpus(2, gib=40) + [SimpleNamespace(process_index=1, memory_stats=gpus(1, gib=40)[0].memory_stats)
                                   for _ in range(2)]  # 65B on 4 x 40 GB over 2 hosts: tensor inside, fsdp across
    assert default_mesh_shape(LLaMAConfig.from_name("65B"), two_hosts) == {"data": 1, "fsdp": 2, "tensor": 2}


TP_SCRIPT = textwrap.dedent("""
    import os, re
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    import numpy as np
    from jaxlora.train.build import build_run
    from jaxlora.train.settings import TrainArgs, resolve_args
    from jaxlora.train.spec import run_spec

    a = resolve_args(TrainArgs(preset="tiny", pretrained_path="none", tokenizer_path="-", data_path="-", out_dir="-",
                               batch_size=8, micro_batch_size=4, max_seq_length=64, precision="32-true",
                               mesh="data=2,tensor=4", scan_layers=False))
    r = build_run(run_spec(a), max_steps=4)
    ids = np.zeros((1, 8, 64), np.int32)
    hlo = r.train_step.lower(r.state, r.params, r.batch({"input_ids": ids, "labels": ids})).compile().as_text()
    print({op: len(re.findall("= [^ ]+ " + op + "(-start)?[(]", hlo))
           for op in ("all-to-all", "collective-permute", "all-gather", "all-reduce")})
""")


def test_tensor_parallel_step_moves_only_the_all_reduces():
    """q, k and v split at head boundaries (run-time (C, 3, C) kernels): a tensor=4 train step
    needs no collective but the all-reduces (a fused (C, 3C) kernel split in four put shard
    boundaries inside q/k/v: 14 collective-permutes and 3 all-gathers per step here)."""
    out = subprocess.run([sys.executable, "-c", TP_SCRIPT], capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    counts = eval(out.stdout.strip().splitlines()[-1])
    assert counts["all-to-all"] == counts["collective-permute"] == counts["all-gather"] == 0, counts
    assert counts["all-reduce"] > 0, counts
