"""How much of each GPU JAX's allocator may take, decided before JAX starts its GPU backend.

JAX's allocator takes 75% of a GPU by default (XLA_PYTHON_CLIENT_MEM_FRACTION, read once, when
the backend starts): 65B LoRA at 4 x 256 needs ~138 GiB of a 140 GiB H200, and trains only with
a larger share. `prepare_device_memory` (train.py calls it first) estimates the run's memory per
device from its settings alone (`jaxlora.train.accounting.estimate_device_bytes`, on the mesh
the run will get), reads the cards' memory without starting JAX (JAXLORA_GPU_MEMORY_MIB, else
`nvidia-smi`), and then:

- the share in effect holds the run, or no GPU is known (CPU, TPU, no nvidia-smi): nothing;
- the user set the share: a warning with the numbers, nothing changed;
- nearly the whole card (`usable_fraction`) holds it: XLA_PYTHON_CLIENT_MEM_FRACTION is set to
  that, with one line saying so (XLA_PYTHON_CLIENT_PREALLOCATE is never touched);
- not even that: `TrainingError` before anything is loaded, naming the estimate, the card and
  what to do.

With `--quantize fp8` and neither `--fp8_both_layouts` nor `--no-fp8_both_layouts`, it also decides
the second kernel layout (faster forward products, one byte a weight more): kept where the run
fits with it and the estimate's margin to spare, else dropped.
"""
from __future__ import annotations

import importlib.util
import math
import os
import pkgutil
import shutil
import subprocess
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, replace
from types import SimpleNamespace

import jax.numpy as jnp

from jaxlora.config import LLaMAConfig
from jaxlora.errors import TrainingError
from jaxlora.parallel import sharding as shd
from jaxlora.train.accounting import (
    GIB,
    MemoryEstimate,
    estimate_device_bytes,
    weight_bytes,
)
from jaxlora.train.build import fit_micro_batch
from jaxlora.train.settings import PRECISIONS, TrainArgs, resolve_args
from jaxlora.train.spec import run_spec
from jaxlora.weights.load import read_base_config

__all__ = ["CARDS_VAR", "FRACTION_VAR", "MemoryPlan", "plan_fp8_layouts", "plan_memory", "prepare_device_memory",
           "usable_fraction", "visible_gpus"]

FRACTION_VAR = "XLA_PYTHON_CLIENT_MEM_FRACTION"
CARDS_VAR = "JAXLORA_GPU_MEMORY_MIB"  # "143771" or "143771,143771": the GPUs' memory, instead of asking nvidia-smi
DEFAULT_FRACTION = 0.75  # JAX's own default
# Left outside XLA's allocator for the CUDA context and libraries' handles. The 65B bench ran at
# 0.99 of a 140.4 GiB H200 (1.4 GiB left) with a 137.9 GiB peak.
OUTSIDE_ALLOCATOR = GIB
TOLERANCE = 0.05  # how far the estimate may be above the card before the run is refused


@dataclass(frozen=True)
class MemoryPlan:
    """What was decided: the estimate on the mesh assumed, the card, and the share in effect."""

    estimate: MemoryEstimate
    mesh: dict[str, int]
    card_bytes: int
    fraction: float
    set_fraction: bool  # train.py set FRACTION_VAR
    message: str | None = None
    fp8_both_layouts: bool | None = None  # decided here (--quantize fp8 left to its default), else None

    @property
    def fits(self) -> bool:
        return self.estimate.total <= self.fraction * self.card_bytes


class _Card:
    """A GPU as `default_mesh_shape` reads a device (its allocator's limit and its process), before
    JAX has any devices."""

    def __init__(self, bytes_limit: int, process_index: int) -> None:
        self.bytes_limit, self.process_index = bytes_limit, process_index

    def memory_stats(self) -> dict[str, int]:
        return {"bytes_limit": self.bytes_limit}


def jax_gpu_plugin() -> bool:
    """Whether this JAX can run on NVIDIA GPUs (a CUDA plugin is installed), without importing it."""
    spec = importlib.util.find_spec("jax_plugins")  # a namespace package: finding it imports nothing
    paths = list(spec.submodule_search_locations or []) if spec else []
    return any("cuda" in m.name for m in pkgutil.iter_modules(paths)) or any(
        importlib.util.find_spec(f"jax_cuda{v}_plugin") for v in (12, 13))


def visible_gpus(env: Mapping[str, str]) -> list[int] | None:
    """Memory in bytes of each GPU this process will use, without starting JAX: CARDS_VAR, else
    nvidia-smi (CUDA_VISIBLE_DEVICES respected). None: no GPU, or none that JAX would use."""
    if env.get(CARDS_VAR):
        return [int(float(m) * 2**20) for m in env[CARDS_VAR].split(",") if m.strip()]
    platforms = env.get("JAX_PLATFORMS", env.get("JAX_PLATFORM_NAME", "")).lower()
    if platforms and not any(p in platforms for p in ("cuda", "gpu")):
        return None
    smi = shutil.which("nvidia-smi", path=env.get("PATH"))
    if smi is None or not jax_gpu_plugin():
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=index,uuid,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    gpus = [[p.strip() for p in line.split(",")] for line in out.splitlines() if line.count(",") == 2]
    chosen = env.get("CUDA_VISIBLE_DEVICES")
    if chosen is not None:
        wanted = [c.strip() for c in chosen.split(",") if c.strip()]
        gpus = [g for g in gpus if any(w == g[0] or (w.startswith("GPU-") and g[1].startswith(w)) for w in wanted)]
    return [int(g[2]) * 2**20 for g in gpus if g[2].isdigit()] or None


def usable_fraction(card_bytes: int) -> float:
    """The largest share of a card to give XLA's allocator (two decimals, at most 0.99)."""
    return min(0.99, math.floor(100 * (card_bytes - OUTSIDE_ALLOCATOR) / card_bytes) / 100)


def mesh_shape(a: TrainArgs, config: LLaMAConfig, cards: list[int], processes: int, fraction: float
               ) -> dict[str, int]:
    """The mesh the run will get: --mesh, or the default layout for these cards at this share."""
    n = len(cards) * processes
    shape = shd.parse_mesh(a.mesh)
    if shape:
        return {**shape, "data": shape["data"] if shape["data"] != -1 else max(1, n // (shape["fsdp"] * shape["tensor"]))}
    devices = [_Card(int(min(cards) * fraction), p) for p in range(processes) for _ in cards]
    return shd.default_mesh_shape(config, devices, jnp.dtype(PRECISIONS[a.precision][1]).itemsize)


def need_on(a: TrainArgs, config: LLaMAConfig, cards: list[int], processes: int, fraction: float
            ) -> tuple[MemoryEstimate, dict[str, int]]:
    """The per-device estimate on the mesh the run gets at this share, and that mesh's shape."""
    shape = mesh_shape(a, config, cards, processes, fraction)
    shards = shd.batch_shards(SimpleNamespace(shape=shape))  # it reads only the mesh's shape
    rows = fit_micro_batch(a.batch_size, a.micro_batch_size, shards, log=lambda msg: None)
    spec = run_spec(a)
    return estimate_device_bytes(config, spec.lora, spec.speed, shape, rows, a.max_seq_length), shape


def plan_memory(a: TrainArgs, config: LLaMAConfig, cards: list[int], processes: int = 1,
                env: Mapping[str, str] = os.environ) -> MemoryPlan:
    """The share of each card XLA's allocator should take for run `a` (resolved settings) of
    model `config` on GPUs of `cards` bytes each, `processes` hosts alike; see the module
    docstring. Raises `TrainingError` when not even the whole card would hold the run."""
    card, top = min(cards), usable_fraction(min(cards))
    user = env.get(FRACTION_VAR)
    platform = env.get("XLA_PYTHON_CLIENT_ALLOCATOR", "").lower() == "platform"  # no cap: the card is the limit
    current = float(user) if user else top if platform else DEFAULT_FRACTION
    est, shape = need_on(a, config, cards, processes, current)
    gib = (lambda x: f"{x / GIB:.1f} GiB")
    if est.total <= current * card:
        return MemoryPlan(est, shape, card, current, False)
    if user or platform:
        why = f"{FRACTION_VAR}={user}" if user else "XLA_PYTHON_CLIENT_ALLOCATOR=platform"
        return MemoryPlan(est, shape, card, current, False, (
            f"warning: this run needs {est.describe(' per GPU')}; {why} gives JAX {gib(current * card)} of the "
            f"{gib(card)} card: it may run out of memory"))
    est, shape = need_on(a, config, cards, processes, top)
    if est.total * (1 - TOLERANCE) > top * card:
        raise TrainingError(refusal(a, config, est, shape, card, top))
    message = (f"memory: this run needs {est.describe(' per GPU')}, more than JAX's default share of the {gib(card)} "
               f"card ({DEFAULT_FRACTION:.0%}, {gib(DEFAULT_FRACTION * card)}): set {FRACTION_VAR}={top:.2f} "
               f"({gib(top * card)}; set it yourself to choose another)")
    if est.total > top * card:
        message += "; the estimate is above even that, within its error: the run may run out of memory"
    return MemoryPlan(est, shape, card, top, True, message)


def plan_fp8_layouts(a: TrainArgs, config: LLaMAConfig, cards: list[int], processes: int = 1,
                     env: Mapping[str, str] = os.environ) -> MemoryPlan:
    """`plan_memory` for a `--quantize fp8` run whose `fp8_both_layouts` is left to its default
    (None): with both layouts where that run fits with the estimate's margin (`TOLERANCE`) to
    spare, else with one (a speed-up, not worth a run that may run out of memory); the plan
    records the choice."""
    try:
        both = plan_memory(replace(a, fp8_both_layouts=True), config, cards, processes, env)
    except TrainingError:
        both = None
    if both is not None and both.estimate.total * (1 + TOLERANCE) <= both.fraction * both.card_bytes:
        extra = (weight_bytes(config, a.precision, "fp8", True) - weight_bytes(config, a.precision, "fp8")
                 ) / (both.mesh["fsdp"] * both.mesh["tensor"])
        return replace(both, fp8_both_layouts=True, message=" ".join(filter(None, (both.message, (
            f"fp8: frozen kernels kept in both layouts (+{extra / GIB:.1f} GiB a GPU, faster forward products; "
            "--no-fp8_both_layouts saves it)")))))
    one = plan_memory(replace(a, fp8_both_layouts=False), config, cards, processes, env)
    return replace(one, fp8_both_layouts=False, message=" ".join(filter(None, (one.message, (
        "fp8: frozen kernels kept in one layout (with the second, the run would not fit the card with "
        f"{TOLERANCE:.0%} to spare; --fp8_both_layouts insists)")))))


def refusal(a: TrainArgs, config: LLaMAConfig, est: MemoryEstimate, shape: Mapping[str, int], card: int,
            top: float) -> str:
    """Why the run cannot fit, with the numbers and what to change."""
    mesh = ",".join(f"{k}={v}" for k, v in shape.items())
    nf4 = weight_bytes(config, a.precision, "nf4-dq") / (shape["fsdp"] * shape["tensor"])
    return (f"this run needs {est.describe(' per GPU')} on mesh {mesh} with micro-batches of "
            f"{a.micro_batch_size} x {a.max_seq_length} tokens, more than one {card / GIB:.1f} GiB GPU can give JAX "
            f"({top * card / GIB:.1f} GiB at {FRACTION_VAR}={top:.2f}). Use --quantize nf4-dq (frozen weights "
            f"{nf4 / GIB:.1f} GiB), more GPUs (--mesh tensor=N or fsdp=N), a smaller --micro_batch_size or "
            f"--max_seq_length, or --remat full. To try anyway, set {FRACTION_VAR} yourself: train.py then only "
            "warns")


def prepare_device_memory(args: TrainArgs, processes: int | None, log: Callable[[str], None],
                          env: MutableMapping[str, str] = os.environ) -> MemoryPlan | None:
    """Decide the allocator's share for run `args` and set it in `env` (see the module docstring).
    Call before anything starts JAX's backend. None: nothing to decide (no GPU known, or settings
    the run itself will report as wrong)."""
    cards = visible_gpus(env)
    if not cards:
        return None
    try:
        a = resolve_args(args)
        config, _ = read_base_config(a.pretrained_path, a.preset)
        planner = plan_fp8_layouts if a.quantize == "fp8" and a.fp8_both_layouts is None else plan_memory
        plan = planner(a, config, cards, processes or 1, env)
    except (OSError, ValueError):  # bad settings or inputs: the run reports them, all at once
        return None
    if plan.set_fraction:
        env[FRACTION_VAR] = f"{plan.fraction:.2f}"
    if plan.message:
        log(plan.message)
    return plan
