"""Several processes (hosts) as one JAX program: joining them, and the few things only one of
them should do.

Every process runs the same train.py; `jax.distributed.initialize` joins them (from flags, or
from the cluster's environment: SLURM, Open MPI, TPU pod slices, ...), after which
`jax.devices()` lists every process's devices and one mesh spans them all. Each process
feeds only the batch rows its own devices hold; files that describe the whole run (metrics,
plots, exports) are written by process 0 alone.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

_CLUSTER_VARIABLES = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Join the run's processes; returns True if this is a multi-process run.

    With no arguments, joins only when a cluster environment is detected (and leaves a plain
    single-process run alone). Must run before anything else touches JAX.
    """
    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError("--coordinator_address, --num_processes and --process_id go together (or none, to "
                         "take them from the cluster environment)")
    if all(given):
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id {process_id} must be in [0, --num_processes {num_processes})")
        # CPU devices of different processes talk through gloo (GPUs and TPUs ignore this).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return num_processes > 1
    if any(os.environ.get(name) for name in _CLUSTER_VARIABLES):
        jax.distributed.initialize()
        return jax.process_count() > 1
    return False


def is_primary() -> bool:
    """True in the process that writes the run's files (process 0)."""
    return jax.process_index() == 0


def to_host(tree: Any) -> Any:
    """A tree of (possibly sharded, possibly other hosts') arrays as numpy arrays, in every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def agree_on_batch(longest: int, tokens: int) -> tuple[int, int]:
    """A training batch's longest sample (max) and real-token count (sum) over every process,
    each of which knows only its own rows."""
    if jax.process_count() == 1:
        return longest, tokens
    both = np.asarray(multihost_utils.process_allgather(np.array([longest, tokens], np.int32)))
    return int(both[:, 0].max()), int(both[:, 1].sum())


def sum_over_processes(n: int) -> int:
    if jax.process_count() == 1:
        return n
    return int(np.asarray(multihost_utils.process_allgather(np.array(n, np.int32))).sum())
