"""What a run is made of, as typed settings for `jaxlora.train.build.build_run`: the base
weights, the adapters (`LoRAConfig`), the optimizer, the batch layout and the speed knobs.
`run_spec` makes one from resolved `TrainArgs`, so train.py and the benchmark build the same
run from the same settings and defaults."""
from __future__ import annotations

from dataclasses import dataclass

from jaxlora.config import LoRAConfig
from jaxlora.train.settings import TrainArgs

__all__ = ["BaseSource", "OptimizerSpec", "BatchLayout", "SpeedKnobs", "RunSpec", "run_spec"]


@dataclass(frozen=True)
class BaseSource:
    """The frozen weights: a path ('none': random), the preset they are checked against."""

    path: str | None
    preset: str | None


@dataclass(frozen=True)
class OptimizerSpec:
    """AdamW with warmup and a schedule (`jaxlora.train.optim`)."""

    learning_rate: float
    weight_decay: float
    warmup_steps: int
    schedule: str
    grad_clip: float  # 0: off


@dataclass(frozen=True)
class BatchLayout:
    """Samples per optimizer step, rows per batch shard per micro-batch, tokens per sample, mesh."""

    batch_size: int
    micro_batch_size: int
    max_seq_length: int
    mesh: str | None = None  # 'data=D,fsdp=F,tensor=T'; None: the default layout


@dataclass(frozen=True)
class SpeedKnobs:
    """How the step computes: precision, attention kernel, remat, layer loop, loss chunks, PRNG, and
    how the frozen kernels are stored (quantized or not)."""

    precision: str
    attention: str
    remat: str
    scan_layers: bool
    scan_unroll: int
    loss_chunk: int
    rng_impl: str
    quantize: str = "none"  # frozen kernels: none, nf4, nf4-dq, int8, fp8 (jaxlora.model.quantize)
    fp8_both_layouts: bool = False  # fp8 kernels also in the forward product's layout (None in TrainArgs: off)
    fuse_mlp: bool = False  # gate and up kernels as one (LLaMA.fused_mlp)


@dataclass(frozen=True)
class RunSpec:
    """One training run's make-up; `seed` draws the adapters (unless `init_adapters` gives them), dropout
    masks and random bases."""

    base: BaseSource
    lora: LoRAConfig
    optimizer: OptimizerSpec
    batch: BatchLayout
    speed: SpeedKnobs
    seed: int
    init_adapters: str | None = None  # adapters to start from (a directory or PEFT folder); None: fresh ones


def run_spec(a: TrainArgs) -> RunSpec:
    """The spec of resolved settings `a` (`jaxlora.train.settings.resolve_args`)."""
    return RunSpec(
        base=BaseSource(a.pretrained_path, a.preset),
        lora=LoRAConfig(r=a.lora_r, alpha=a.lora_alpha, dropout=a.lora_dropout, targets=a.lora_targets),
        optimizer=OptimizerSpec(a.learning_rate, a.weight_decay, a.warmup_steps, a.schedule, a.grad_clip),
        batch=BatchLayout(a.batch_size, a.micro_batch_size, a.max_seq_length, a.mesh),
        speed=SpeedKnobs(a.precision, a.attention, a.remat, a.scan_layers, a.scan_unroll, a.loss_chunk, a.rng_impl,
                         a.quantize, bool(a.fp8_both_layouts), a.fuse_mlp),
        seed=a.seed, init_adapters=a.init_adapters)
