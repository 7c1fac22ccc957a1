"""Runs of the training loop on meshes of 8 CPU devices, for tests/test_sharding.py.

Run as a script in a fresh process (the device count is fixed when JAX starts):

    python tests/mesh_runs.py OUT_JSON

It writes one JSON report, a part per test (nothing is asserted here except by the tests):
    equality  data=8, fsdp=8, 2x2x2 vs one device
    resume    saved on 2x2x2, resumed on data=8 and on one device
    layout    every array's sharding vs the rules table
One process for the three: the one-device reference run serves the first two, and programs
compiled once (the 2x2x2 step, ...) are reused through the persistent compilation cache.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from test_train import tiny_args  # noqa: E402

from jaxlora.train import loop as trainer  # noqa: E402

# tensor=2 alone is left to test_gqa_sharding (and generate's tests): every mesh here costs a
# ~20 s compile on CI's two cores, and 2x2x2 already splits over tensor.
MESHES = ("data=8", "fsdp=8", "data=2,fsdp=2,tensor=2")
ONE_DEVICE = "data=1"


def mesh_args(out: Path, mesh: str, **kw):
    # 16 samples a step, as 2 micro-batches of 8 rows on every mesh (rows split over the batch
    # shards), so that dropout draws the same masks: they depend on how a batch is split into
    # micro-batches, not on how a micro-batch is split over devices (threefry is partitionable).
    from jaxlora.parallel import sharding as shd
    shape = shd.parse_mesh(mesh)
    shards = 8 // shape["tensor"] if shape["data"] == -1 else shape["data"] * shape["fsdp"]
    # Unpacked: packing fills rows per batch shard, so the rows (and their dropout masks) depend on
    # the mesh; here every mesh must see the same rows.
    values = dict(mesh=mesh, batch_size=16, micro_batch_size=8 // shards, max_steps=4, save_interval=2,
                  eval_interval=2, lora_targets="q,v,o,up", rng_impl="threefry2x32", packing=False)
    values.update(kw)
    return tiny_args(out, **values)


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def compare(a, b) -> dict:
    """Largest absolute and relative differences between two adapter trees."""
    abs_err = max(float(np.max(np.abs(x - y))) for x, y in zip(leaves(a), leaves(b)))
    scale = max(float(np.max(np.abs(y))) for y in leaves(b))
    return {"max_abs": abs_err, "max_rel": abs_err / scale}


def losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["type"] == "train"]


def equality(tmp: Path, ref: trainer.TrainResult) -> dict:
    report = {"ref_losses": losses(Path(ref.out_dir)), "runs": {}}
    for mesh in MESHES:
        out = tmp / mesh.replace(",", "_").replace("=", "")
        result = trainer.run(mesh_args(out, mesh))
        report["runs"][mesh] = {"losses": losses(out), "val_loss": result.val_loss_after,
                                "ref_val_loss": ref.val_loss_after, **compare(result.lora, ref.lora)}
    return report


def resume(tmp: Path, ref: trainer.TrainResult) -> dict:
    first = tmp / "resume_first"
    trainer.run(mesh_args(first, "data=2,fsdp=2,tensor=2", max_steps=2))
    report = {}
    for target in ("data=8", ONE_DEVICE):  # each resumes its own copy of the same 2 steps
        out = tmp / f"resume_{target.replace('=', '')}"
        shutil.copytree(first, out)
        resumed = trainer.run(mesh_args(out, target, max_steps=4, resume=True))
        report[target] = {"step": resumed.step, **compare(resumed.lora, ref.lora)}
    return report


def layout(tmp: Path) -> dict:
    """Each array of a 2x2x2 run against the sharding its logical axes give under the rules."""
    import flax.linen as nn

    from jaxlora.model.layouts import logical_axes
    from jaxlora.parallel import sharding as shd
    from jaxlora.train.build import build_run
    from jaxlora.train.settings import resolve_args
    from jaxlora.train.spec import run_spec
    r = build_run(run_spec(resolve_args(mesh_args(tmp / "layout", "data=2,fsdp=2,tensor=2", scan_layers=False))))
    axes = logical_axes(r.model, as_run=True)
    expected = nn.logical_to_mesh_axes  # logical names -> mesh axes by the rules table
    bad, checked = [], 0

    def check(kind: str, tree, names) -> None:
        nonlocal checked
        flat_arrays = jax.tree_util.tree_flatten_with_path(tree)[0]
        flat_names = jax.tree.leaves(names, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
        for (path, array), spec in zip(flat_arrays, flat_names):
            want = jax.sharding.NamedSharding(r.mesh, expected(spec, shd.DEFAULT_RULES))
            checked += 1
            if not array.sharding.is_equivalent_to(want, array.ndim):
                bad.append(f"{kind}{jax.tree_util.keystr(path)}: {array.sharding.spec} != {want.spec}")

    check("params", r.params, axes["params"])
    stored = logical_axes(r.model)["lora"]
    check("lora", r.state.lora, stored)
    mu = r.state.opt_state  # every AdamW moment must sit like its adapter
    moments = [x for x in jax.tree.leaves(mu) if getattr(x, "ndim", 0) > 0]
    lora_leaves = jax.tree.leaves(r.state.lora)
    for m in moments:
        match = [l for l in lora_leaves if l.shape == m.shape]
        checked += 1
        if not any(m.sharding.is_equivalent_to(l.sharding, m.ndim) for l in match):
            bad.append(f"optimizer moment {m.shape}: {m.sharding.spec}")
    kernel = r.params["h_0"]["mlp"]["c_fc1"]["kernel"]  # (embed=64, mlp=256) over fsdp=2, tensor=2
    return {"bad": bad, "checked": checked, "fc1_shard": list(kernel.addressable_shards[0].data.shape),
            "batch_spec": str(r.shardings.batch.spec)}


def main(tmp: Path) -> dict:
    ref = trainer.run(mesh_args(tmp / "one", ONE_DEVICE))  # 4 steps on one device
    return {"equality": equality(tmp, ref), "resume": resume(tmp, ref), "layout": layout(tmp)}


if __name__ == "__main__":
    out_json = sys.argv[1]
    assert len(jax.devices()) == 8, jax.devices()
    with tempfile.TemporaryDirectory(prefix="jaxlora-mesh-") as tmp:
        report = main(Path(tmp))
    Path(out_json).write_text(json.dumps(report, indent=1))
