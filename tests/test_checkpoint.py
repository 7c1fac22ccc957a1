"""Training checkpoints: round trip, retention, and runs interrupted while writing one."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
from test_train import ROOT, _env, assert_trees_equal, reference_run, small_assets, tiny_args

from jaxlora.config import LLaMAConfig, LoRAConfig
from jaxlora.model.layouts import init_variables
from jaxlora.model.llama import LLaMA
from jaxlora.train import loop as trainer
from jaxlora.train.checkpoints import Checkpointer, state_to_tree
from jaxlora.train.optim import make_optimizer
from jaxlora.train.steps import init_train_state, make_train_step

TMP_SUFFIX = ".orbax-checkpoint-tmp"


def _trained_state(steps: int = 2):
    config = LLaMAConfig.from_name("tiny")
    model = LLaMA(config, LoRAConfig(r=4, alpha=8, dropout=0.1))
    variables = init_variables(model, jax.random.key(0))
    optimizer = make_optimizer(1e-2, grad_clip=1.0)
    state = init_train_state(variables["lora"], optimizer, seed=7)
    step = make_train_step(model, optimizer, donate=False)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 128, (2, 2, 16)), jnp.int32)
    for _ in range(steps):
        state, _ = step(state, variables["params"], {"input_ids": ids, "labels": ids})
    return state, optimizer, variables


def test_round_trip_and_retention(tmp_path):
    state, optimizer, variables = _trained_state()
    fresh = init_train_state(variables["lora"], optimizer, seed=0)
    ckpt = Checkpointer(tmp_path / "ckpt", max_to_keep=2)
    meta = {"data": {"epoch": 1, "position": 5}, "note": "hello"}
    ckpt.save(state, meta)
    restored, got_meta = ckpt.restore(fresh)
    assert got_meta == meta
    assert_trees_equal(state_to_tree(restored), state_to_tree(state))  # lora, opt_state, step, rng key data
    assert jax.random.key_impl(restored.rng) == jax.random.key_impl(state.rng)
    # The same dropout key comes out of the restored rng.
    np.testing.assert_array_equal(jax.random.key_data(jax.random.fold_in(restored.rng, 3)),
                                  jax.random.key_data(jax.random.fold_in(state.rng, 3)))
    for step in (5, 6, 7):
        ckpt.save(state.replace(step=jnp.int32(step)), meta)
    assert ckpt.all_steps() == [6, 7]  # only the last max_to_keep
    ckpt.close()


def test_partial_write_left_behind_is_ignored_and_resume_works(tmp_path):
    """A crash mid-write leaves `{step}.orbax-checkpoint-tmp*` (as orbax names it): never taken for a checkpoint."""
    out = tmp_path / "out"
    trainer.run(tiny_args(out, max_steps=3))  # a finished checkpoint at step 3
    ckpt_dir = out / "checkpoints"
    # What an interrupted save of step 6 leaves: a temporary folder with part of the files.
    partial = ckpt_dir / f"6{TMP_SUFFIX}"
    shutil.copytree(ckpt_dir / "3" / "state", partial / "state.orbax-checkpoint-tmp")
    for f in list((partial / "state.orbax-checkpoint-tmp").rglob("*"))[::2]:
        if f.is_file():
            f.unlink()
    assert Checkpointer(ckpt_dir).latest_step() == 3
    resumed = trainer.run(tiny_args(out, resume=True))
    assert resumed.step == 6
    assert_trees_equal(resumed.lora, reference_run().lora)
    assert Checkpointer(ckpt_dir).all_steps() == [3, 6]


KILL_DURING_SAVE = textwrap.dedent("""
    import os, sys
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
    sys.path.insert(0, TESTS)
    real_rename = os.rename

    def rename(src, dst, *args, **kwargs):
        # Die (as with SIGKILL: no cleanup, no exception handlers) in the middle of writing step 6.
        if "/6.orbax-checkpoint-tmp" in os.fspath(src):
            os._exit(137)
        return real_rename(src, dst, *args, **kwargs)

    os.rename = rename
    from test_train import tiny_args
    from jaxlora.train import loop as trainer
    trainer.run(tiny_args(OUT, tokenizer_path=TOKENIZER, data_path=DATA))
    print("finished without being killed")
""")



def test_run_killed_while_writing_a_checkpoint(tmp_path):
    """A real process dies inside orbax's save of step 6: step 3 stays loadable and --resume completes the run."""
    out = tmp_path / "out"
    assets = small_assets()
    script = (KILL_DURING_SAVE.replace("TESTS", repr(str(ROOT / "tests"))).replace("OUT", repr(str(out)))
              .replace("TOKENIZER", repr(assets["tokenizer"])).replace("DATA", repr(assets["data"])))
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 137, (proc.returncode, proc.stdout[-1000:], proc.stderr[-3000:])
    ckpt_dir = out / "checkpoints"
    leftovers = [p.name for p in ckpt_dir.iterdir() if TMP_SUFFIX in p.name]
    assert leftovers, sorted(os.listdir(ckpt_dir))  # the write really was cut short
    ckpt = Checkpointer(ckpt_dir)
    assert ckpt.all_steps() == [3]
    assert ckpt.restore_meta()["step"] == 3
    ckpt.close()
    resumed = trainer.run(tiny_args(out, resume=True))
    assert resumed.step == 6
    assert_trees_equal(resumed.lora, reference_run().lora)
