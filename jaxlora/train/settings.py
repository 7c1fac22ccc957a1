"""The settings of one training run: `TrainArgs`, its two profiles of defaults, and checks.

One source for every default: a field of `TrainArgs` that is None takes its value from the
run's profile (`profile_for`); the others have their default in `TrainArgs` itself. train.py
builds its flags from these (help text shows both profiles' values), the trainer and the
benchmark read them, so the benchmark times the step that train.py runs.

- ``LIT_LLAMA_RECIPE`` when the preset is 7B/13B/30B/65B: lit-llama's finetune/lora.py
  (r=8, alpha=16, dropout 0.05, AdamW lr 3e-4 and weight decay 0.01, batch 128 = 32 x 4,
  100 warmup steps then constant, 256 tokens, 1,171 steps, eval/save every 100 steps,
  bf16-true) and its file locations, with the speed settings measured best on an H100.
- ``DEMO_PROFILE`` otherwise (including no flags at all): the built-in demo, a tiny base
  model pretrained on the shipped corpus, fine-tuned on the shipped instruction data in about
  two minutes on a 2-core CPU, reporting held-out loss and exact match before vs after.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import jax.numpy as jnp

from jaxlora.config import parse_targets
from jaxlora.demo import DEMO_BASE, DEMO_DATA, DEMO_TOKENIZER
from jaxlora.model.llama import ATTENTION_IMPLS, REMAT_POLICIES
from jaxlora.train.optim import SCHEDULES

LIT_PRESETS = ("7b", "13b", "30b", "65b")
PRECISIONS: dict[str, tuple[Any, Any]] = {  # name -> (compute dtype, frozen-weight storage dtype)
    "bf16-true": (jnp.bfloat16, jnp.bfloat16),
    "bf16-mixed": (jnp.bfloat16, jnp.float32),
    "32-true": (jnp.float32, jnp.float32),
}
RNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
LIT_SAMPLE_INSTRUCTION = "Recommend a movie for me to watch during the weekend and explain the reason."

# lit-llama's finetune/lora.py, used whenever the preset is one of LIT_PRESETS.
LIT_LLAMA_RECIPE: dict[str, Any] = dict(
    data_path="data/alpaca", tokenizer_path="checkpoints/lit-llama/tokenizer.model",
    pretrained_path="checkpoints/lit-llama/{preset}/lit-llama.pth", out_dir="out/lora/alpaca",
    lora_r=8, lora_alpha=16.0, lora_dropout=0.05, lora_targets="q,v",
    learning_rate=3e-4, weight_decay=0.01, warmup_steps=100, schedule="constant", grad_clip=0.0,
    batch_size=128, micro_batch_size=4, max_steps=1171, max_seq_length=256,
    eval_interval=100, eval_iters=100, save_interval=100, val_size=2000,
    precision="bf16-true", mask_inputs=False, exact_match_samples=0, max_new_tokens=100,
    sample_instruction=LIT_SAMPLE_INSTRUCTION,
    # Fastest measured on an H100 (docs/benchmarks.md): per-layer weights in an unrolled layer
    # loop (~30 s compile per bucket length), matmul-output remat (+4%, 30% less activation
    # memory), dropout masks from XLA's RngBitGenerator (+1%; masks then depend on the mesh),
    # cross-entropy in 4096-token chunks (the same speed, less memory at large batches).
    scan_layers=False, scan_unroll=1, remat="dots_no_batch", rng_impl="rbg", loss_chunk=4096,
)

# The built-in demo: `python train.py` with no flags (about two minutes on a 2-core CPU).
DEMO_PROFILE: dict[str, Any] = dict(
    preset="demo", data_path=str(DEMO_DATA), tokenizer_path=str(DEMO_TOKENIZER),
    pretrained_path=str(DEMO_BASE), out_dir="out/demo",
    lora_r=8, lora_alpha=16.0, lora_dropout=0.0, lora_targets="q,v",
    learning_rate=3e-3, weight_decay=0.01, warmup_steps=20, schedule="constant", grad_clip=0.0,
    batch_size=16, micro_batch_size=16, max_steps=500, max_seq_length=64,
    eval_interval=100, eval_iters=8, save_interval=250, val_size=200,
    precision="32-true", mask_inputs=True, exact_match_samples=50, max_new_tokens=16,
    sample_instruction="Reverse the word rocket.", scan_layers=True, scan_unroll=4, remat="none",
    rng_impl="threefry2x32", loss_chunk=0,
)


@dataclass
class TrainArgs:
    """Settings of one run. None means: take the profile's value (see `profile_for`)."""

    preset: str | None = None
    pretrained_path: str | None = None
    tokenizer_path: str | None = None
    data_path: str | None = None
    out_dir: str | None = None
    lora_r: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float | None = None
    lora_targets: str | Sequence[str] | None = None
    learning_rate: float | None = None
    weight_decay: float | None = None
    warmup_steps: int | None = None
    schedule: str | None = None
    grad_clip: float | None = None
    batch_size: int | None = None
    micro_batch_size: int | None = None  # per batch shard (device group) of the mesh
    max_steps: int | None = None
    epochs: float | None = None
    max_seq_length: int | None = None
    eval_interval: int | None = None
    eval_iters: int | None = None
    save_interval: int | None = None
    val_size: int | float | None = None
    precision: str | None = None
    exact_match_samples: int | None = None
    max_new_tokens: int | None = None
    sample_instruction: str | None = None
    scan_layers: bool | None = None
    scan_unroll: int | None = None
    remat: str | None = None
    rng_impl: str | None = None
    loss_chunk: int | None = None
    mesh: str | None = None  # 'data=D,fsdp=F,tensor=T'; None: the default layout (jaxlora.parallel.sharding)
    resume: bool = False
    seed: int = 1337
    mask_inputs: bool | None = None
    keep_checkpoints: int = 3
    num_samples: int = 3
    attention: str = "auto"
    progress: bool = True
    verbose: bool = True
    plot: bool = True
    export_lit: bool = True


def profile_for(preset: str | None) -> dict[str, Any]:
    """The defaults of a run: lit-llama's recipe for 7B/13B/30B/65B, the demo profile otherwise."""
    if preset is not None and preset.lower() in LIT_PRESETS:
        prof = dict(LIT_LLAMA_RECIPE)
        prof["pretrained_path"] = prof["pretrained_path"].format(preset=preset.upper())
        return prof
    return dict(DEMO_PROFILE)


def parse_val_size(value: float | int | str | None) -> int | float | None:
    """A count (integral values, e.g. 2000 or 2000.0) or a fraction < 1 of the records."""
    if value is None:
        return None
    value = float(value)
    if value < 0:
        raise ValueError(f"val_size must be >= 0, got {value:g}")
    return int(value) if value >= 1 and value.is_integer() else value


def resolve_args(args: TrainArgs) -> TrainArgs:
    """A copy of `args` with every None filled in from its profile, and checked."""
    prof = profile_for(args.preset)
    values = dataclasses.asdict(args)
    for name, default in prof.items():
        if values.get(name) is None:
            if name == "max_steps" and values.get("epochs") is not None:
                continue
            if name == "preset" and values.get("pretrained_path") is not None:
                continue  # inferred from (and checked against) the given weights
            values[name] = default
    if args.epochs is not None and args.max_steps is not None:
        raise ValueError("give max_steps or epochs, not both")
    a = TrainArgs(**values)
    a.val_size = parse_val_size(a.val_size)
    for name, allowed in (("precision", PRECISIONS), ("schedule", SCHEDULES), ("remat", REMAT_POLICIES),
                          ("attention", ATTENTION_IMPLS), ("rng_impl", RNG_IMPLS)):
        if getattr(a, name) not in allowed:
            raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(a, name)!r}")
    for name in ("batch_size", "micro_batch_size", "max_seq_length", "eval_interval", "save_interval", "eval_iters"):
        if getattr(a, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(a, name)}")
    if a.batch_size % a.micro_batch_size:
        raise ValueError(f"batch_size {a.batch_size} is not a multiple of micro_batch_size {a.micro_batch_size}")
    if a.max_steps is not None and a.max_steps < 0:
        raise ValueError(f"max_steps must be >= 0, got {a.max_steps}")
    if a.epochs is not None and a.epochs <= 0:
        raise ValueError(f"epochs must be > 0, got {a.epochs}")
    if a.loss_chunk < 0:
        raise ValueError(f"loss_chunk must be >= 0, got {a.loss_chunk}")
    if isinstance(a.lora_targets, str):
        a.lora_targets = parse_targets(a.lora_targets)
    a.lora_targets = tuple(a.lora_targets)
    return a


def json_args(a: TrainArgs) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(a).items()}


# Settings a resumed run must share with the checkpoint, or the continuation is not the same
# run. The mesh and micro_batch_size are not among them: the loss is the mean over the whole
# batch and the data order does not depend on how a batch is split, so a run may resume on
# another mesh (the dropout masks of rng_impl 'rbg' do depend on the mesh).
RESUME_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_targets", "batch_size", "max_seq_length", "seed",
               "mask_inputs", "precision", "val_size", "learning_rate", "weight_decay", "warmup_steps", "schedule",
               "grad_clip")
