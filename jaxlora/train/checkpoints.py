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
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxlora.errors import CheckpointError
from jaxlora.train.steps import TrainState

__all__ = ["CheckpointError", "Checkpointer", "state_to_tree", "tree_to_state"]


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
