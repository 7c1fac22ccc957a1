"""Training checkpoints with orbax: adapters, optimizer state, step, RNG, and data position.

One checkpoint per saved step under ``{out_dir}/checkpoints/{step}/``, written by an orbax
``CheckpointManager`` with two items:

- ``state``: the `TrainState` pytree ``{"step", "lora", "opt_state", "rng"}``, saved with
  ``StandardSave``. The PRNG key is stored as its raw ``key_data`` (uint32) and re-wrapped
  on restore. Frozen weights are never saved here (they come from ``--pretrained_path``).
- ``meta``: a JSON document: the data position (``Batcher.state()``), the model and LoRA
  configs, the run's settings, and the before-training evaluation numbers.

Orbax writes a checkpoint into ``{step}.orbax-checkpoint-tmp-*`` and renames it to ``{step}``
only when every file is written, so a run killed mid-write leaves a temporary folder that is
never mistaken for a checkpoint: the previous step stays the latest, and is what
``--resume`` restores. Only the last ``max_to_keep`` finished checkpoints are kept.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxlora.config import LLaMAConfig
from jaxlora.errors import CheckpointError, NonFiniteLossError, TrainingError
from jaxlora.parallel import distributed
from jaxlora.train.data import Batcher
from jaxlora.train.settings import RESUME_KEYS, TrainArgs, json_args
from jaxlora.train.steps import TrainState

__all__ = ["CHECKPOINTS_DIR", "CheckpointError", "Checkpointer", "RunCheckpoints", "Start", "open_checkpoints",
           "check_resumable", "state_to_tree", "tree_to_state"]

CHECKPOINTS_DIR = "checkpoints"


def state_to_tree(state: TrainState) -> dict[str, Any]:
    """The saveable pytree of a TrainState (PRNG key as raw key data)."""
    rng = state.rng
    if jnp.issubdtype(getattr(rng, "dtype", np.uint32), jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    return {"step": state.step, "lora": state.lora, "opt_state": state.opt_state, "rng": rng}


def tree_to_state(tree: dict[str, Any], template: TrainState) -> TrainState:
    """Inverse of `state_to_tree`, re-wrapping the key data like the template's key."""
    rng = tree["rng"]
    if jnp.issubdtype(getattr(template.rng, "dtype", np.uint32), jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(rng, impl=jax.random.key_impl(template.rng))
    return TrainState(step=jnp.asarray(tree["step"], jnp.int32), lora=tree["lora"],
                      opt_state=tree["opt_state"], rng=rng)


def _sharding(a: Any) -> Any:
    return getattr(a, "sharding", None) if isinstance(a, jax.Array) else None


class Checkpointer:
    """Save and restore training checkpoints in ``directory`` (created on first save).

    Saving is synchronous: when `save` returns, the checkpoint is on disk and final.
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = 3) -> None:
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    # ------------------------------------------------------------------ queries
    def all_steps(self) -> list[int]:
        """Finished checkpoints, oldest first (temporary folders of interrupted writes excluded)."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    # ------------------------------------------------------------------ save / restore
    def save(self, state: TrainState, meta: dict[str, Any], force: bool = True) -> int:
        """Write `state` and `meta` as the checkpoint of step ``int(state.step)``; returns the step.

        Sharded arrays are written shard by shard, by the processes that hold them; `meta`
        by the primary process."""
        step = int(jax.device_get(state.step))
        tree = state_to_tree(state)
        self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                                         meta=ocp.args.JsonSave(meta)), force=force)
        self._manager.wait_until_finished()
        return step

    def restore_meta(self, step: int | None = None) -> dict[str, Any]:
        step = self._resolve(step)
        try:
            return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # orbax raises several types for damaged folders
            raise CheckpointError(f"{self.step_dir(step)}: cannot read the checkpoint metadata: {e}") from e

    def restore(self, template: TrainState, step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
        """Restore step `step` (default: the latest) into the structure, shapes, dtypes and
        shardings of `template`: a checkpoint saved on one mesh restores onto any other."""
        step = self._resolve(step)
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=_sharding(a)),
                                state_to_tree(template))
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        except Exception as e:
            raise CheckpointError(f"{self.step_dir(step)}: cannot restore the training state (was it written "
                                  f"with other LoRA settings or another model?): {e}") from e
        state = tree_to_state(restored["state"], template)
        if int(state.step) != step:
            raise CheckpointError(f"{self.step_dir(step)}: holds step {int(state.step)}, expected {step}")
        return state, restored["meta"]

    def _resolve(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise CheckpointError(f"{self.directory}: no finished checkpoint to restore")
            return steps[-1]
        if step not in steps:
            raise CheckpointError(f"{self.directory}: no checkpoint for step {step} (have {steps})")
        return step

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ----------------------------------------------------------------------------- a run's checkpoints

def open_checkpoints(out: Path, a: TrainArgs, log: Callable[[str], None]) -> Checkpointer:
    """The run's Checkpointer; refuses a directory that holds another run unless --resume (or
    --overwrite, which the caller has already acted on), and says once when --resume has
    nothing to resume."""
    checkpointer = Checkpointer(out / CHECKPOINTS_DIR, max_to_keep=a.keep_checkpoints)
    latest = checkpointer.latest_step()
    if latest is not None and not a.resume:
        checkpointer.close()
        raise TrainingError(f"{checkpointer.directory} already holds checkpoints (latest: step {latest}); pass "
                            "--resume to continue that run, --overwrite to start a new one in its place (deleting "
                            "its checkpoints and outputs), or choose another --out_dir")
    if a.resume and latest is None:
        log(f"warning: --resume: no checkpoint in {checkpointer.directory}; starting a new run from step 0")
    return checkpointer


def remove_checkpoints(out: Path) -> None:
    """--overwrite: the old run's checkpoints go (the primary process deletes them)."""
    if distributed.is_primary():
        shutil.rmtree(out / CHECKPOINTS_DIR, ignore_errors=True)


def check_resumable(meta: dict[str, Any], a: TrainArgs, config: LLaMAConfig, where: Path) -> None:
    """A checkpoint continues this run only with the same run-defining settings and base model."""
    saved = meta.get("args", {})
    mine = json_args(a)
    keys = RESUME_KEYS + (("max_steps", "epochs") if a.schedule != "constant" else ())
    for key in keys:
        if key in saved and saved[key] != mine[key]:
            raise CheckpointError(f"{where}: saved with {key}={saved[key]!r}, this run has {key}={mine[key]!r}; "
                                  "resume with the same settings")
    if LLaMAConfig.from_dict(meta.get("model") or {}) != config:  # (older checkpoints lack newer fields)
        raise CheckpointError(f"{where}: saved for model {meta.get('model')}, this run's base model is "
                              f"{config.to_dict()}")


@dataclass
class Start:
    """Where a run starts: its first state and step, and the before-training evaluation
    (None: not measured yet)."""

    step: int
    state: TrainState
    baseline: dict[str, Any] | None = None


class RunCheckpoints:
    """A run's checkpoints: resume from the latest, save states with the run's metadata."""

    def __init__(self, checkpointer: Checkpointer, meta: dict[str, Any] | None = None) -> None:
        self.checkpointer = checkpointer
        self.meta = meta or {}  # the run's settings, configs and baseline, saved with every checkpoint
        self.last_saved: int | None = None

    def resume(self, a: TrainArgs, config: LLaMAConfig, state: TrainState, batcher: Batcher,
               log: Callable[[str], None]) -> Start:
        """The latest checkpoint restored onto `state`'s shardings and `batcher` moved to its data
        position, when resuming and there is one; else step 0 and `state`."""
        ckpt = self.checkpointer
        latest = ckpt.latest_step() if a.resume else None
        if latest is None:
            return Start(0, state)
        check_resumable(ckpt.restore_meta(latest), a, config, ckpt.step_dir(latest))
        state, meta = ckpt.restore(state, latest)
        try:
            batcher.restore(meta["data"])
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{ckpt.step_dir(latest)}: data position does not fit this data: {e}") from e
        self.last_saved = latest
        log(f"resumed from {ckpt.step_dir(latest)} (step {latest}, data epoch {batcher.epoch} position "
            f"{batcher.position})")
        return Start(latest, state, meta.get("baseline"))

    def save(self, state: TrainState, step: int, data: dict[str, Any]) -> None:
        """Checkpoint `state` (step `step`, data position `data`); non-finite adapters are refused."""
        if not all(bool(np.isfinite(np.asarray(x)).all()) for x in jax.tree.leaves(distributed.to_host(state.lora))):
            raise NonFiniteLossError(f"adapters became non-finite at step {step}; not saved. Last good checkpoint: "
                                     f"{self.last_good()}")
        self.checkpointer.save(state, {**self.meta, "data": data, "step": step})
        self.last_saved = step

    def last_good(self) -> str:
        step = self.checkpointer.latest_step()
        return "none yet" if step is None else f"step {step} in {self.checkpointer.step_dir(step)}"

    def close(self) -> None:
        self.checkpointer.close()
