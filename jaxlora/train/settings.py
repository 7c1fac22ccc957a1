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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import jax.numpy as jnp

from jaxlora.config import LoRAConfig, parse_targets
from jaxlora.demo import DEMO_BASE, DEMO_DATA, DEMO_INSTRUCTION, DEMO_OUT_DIR, DEMO_TOKENIZER
from jaxlora.model.llama import ATTENTION_IMPLS, REMAT_POLICIES
from jaxlora.model.quantize import QUANTIZE_MODES
from jaxlora.text.prompts import PROMPT_STYLES
from jaxlora.parallel.sharding import default_mesh_shape
from jaxlora.train.optim import SCHEDULES
from jaxlora.weights.load import adapters_config

LIT_PRESETS = ("7b", "13b", "30b", "65b")
SMALL_PRESETS = ("demo", "tiny")  # not real models: the demo profile
PRECISIONS: dict[str, tuple[Any, Any]] = {  # name -> (compute dtype, frozen-weight storage dtype)
    "bf16-true": (jnp.bfloat16, jnp.bfloat16),
    "bf16-mixed": (jnp.bfloat16, jnp.float32),
    "32-true": (jnp.float32, jnp.float32),
}
RNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
# The default layout, in the words of the function that chooses it (its docstring's first paragraph).
_MESH_DOC = " ".join(default_mesh_shape.__doc__.split("\n\n")[0].split())
DEFAULT_MESH = _MESH_DOC[0].lower() + _MESH_DOC[1:]
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
    # Each step's 128 samples packed into rows of max_seq_length: the same samples and token-weighted
    # loss as lit-llama's padded micro-batches (up to float rounding), less padding computed.
    # --no-packing: lit-llama's batches (4 samples a micro-batch, padded to a bucket length).
    packing=True,
)

# The built-in demo: `python train.py` with no flags (about two minutes on a 2-core CPU).
DEMO_PROFILE: dict[str, Any] = dict(
    preset="demo", data_path=str(DEMO_DATA), tokenizer_path=str(DEMO_TOKENIZER),
    pretrained_path=str(DEMO_BASE), out_dir=str(DEMO_OUT_DIR),
    lora_r=8, lora_alpha=16.0, lora_dropout=0.0, lora_targets="q,v",
    learning_rate=3e-3, weight_decay=0.01, warmup_steps=20, schedule="constant", grad_clip=0.0,
    batch_size=16, micro_batch_size=16, max_steps=500, max_seq_length=64,
    eval_interval=100, eval_iters=8, save_interval=250, val_size=200,
    precision="32-true", mask_inputs=True, exact_match_samples=50, max_new_tokens=16,
    sample_instruction=DEMO_INSTRUCTION, scan_layers=True, scan_unroll=4, remat="none",
    # unpacked: its samples (~55 tokens) nearly fill its 64-token rows, so packing saves no work and
    # its mask costs some (measured 2026-12-01: same exact match, no speed-up)
    rng_impl="threefry2x32", loss_chunk=0, packing=False,
)


# Flag groups of train.py, in the order --help shows them.
GROUPS = ("model and files", "LoRA", "optimization", "devices and hosts", "evaluation and checkpoints")


def setting(help: str = "", group: str = "", default: Any = None, choices: Sequence[str] | None = None,
            negated: str | None = None, exclusive: str | None = None) -> Any:
    """A TrainArgs field with what train.py's flag needs: its help, group and choices (checked
    by `resolve_args` too). No help: not a flag. negated: the flag that sets a True default to
    False (``--no_plot``). exclusive: a group of flags of which at most one may be given."""
    meta = {"help": help, "group": group, "choices": choices, "negated": negated, "exclusive": exclusive}
    return field(default=default, metadata=meta)


FILES, LORA, OPTIM, DEVICES, EVAL = GROUPS


@dataclass
class TrainArgs:
    """Settings of one run. None means: take the profile's value (see `profile_for`).

    Each field's metadata is its train.py flag (`setting`): the CLI is generated from these."""

    preset: str | None = setting(
        "model: 7b, 13b, 30b, 65b (lit-llama's presets, with its file locations), llama2-7b/13b/70b, "
        "llama3.1-8b/70b, llama3.2-1b/3b, mistral-7b (each selects lit-llama's recipe as defaults, as do weights "
        "given without a preset), or demo/tiny. Checked against the weights; read from them when left out", FILES)
    pretrained_path: str | None = setting(
        "frozen base weights: a lit-llama .pth file (read tensor by tensor, no torch needed), a jaxlora "
        "checkpoint directory (convert/from_lit_llama.py) or a Hugging Face LLaMA directory (config.json + "
        "safetensors); 'none' for random weights (smoke tests)", FILES)
    tokenizer_path: str | None = setting(
        "SentencePiece tokenizer.model, HF tokenizer.json, or a model directory holding one (a real model's "
        "own directory by default)", FILES)
    data_path: str | None = setting(
        "Alpaca-style data: a JSON list (or JSONL) of {instruction, input, output} records, split into "
        "train/validation here; or a directory with lit-llama's prepared train.pt and test.pt", FILES)
    out_dir: str | None = setting("where checkpoints, metrics and the adapters go", FILES)
    resume: bool = setting(
        "continue the run in --out_dir from its latest checkpoint (adapters, optimizer, step, RNG and data "
        "position), bit-identically; the run-defining flags must be the same. With no checkpoint there, a "
        "new run starts (and says so)", FILES, default=False)
    overwrite: bool = setting(
        "start a new run in an --out_dir that holds one, deleting its checkpoints and outputs", FILES,
        default=False)
    init_adapters: str | None = setting(
        "start from these adapters instead of fresh ones (B = 0): an adapters directory (train.py's "
        "OUT_DIR/adapters, convert/*'s), a PEFT LoRA folder or a litgpt LoRA directory, made for this base model. "
        "Their rank, alpha and targets are the run's (--lora_r/--lora_alpha/--lora_targets, if given, must "
        "agree); the optimizer, schedule and step start afresh", LORA)
    lora_r: int | None = setting("adapter rank", LORA)
    lora_alpha: float | None = setting("adapter scale numerator (scaling = alpha / r)", LORA)
    lora_dropout: float | None = setting("dropout on the adapter input", LORA)
    lora_targets: str | Sequence[str] | None = setting(
        "comma-separated projections with adapters: q,k,v,o,gate,up,down, or 'all' (PEFT names like q_proj "
        "also work); lit-llama's LoRA file is written for q,v only", LORA)
    learning_rate: float | None = setting("peak AdamW learning rate", OPTIM)
    weight_decay: float | None = setting(
        "AdamW decoupled weight decay (lit-llama's effective value is torch's default 0.01)", OPTIM)
    warmup_steps: int | None = setting("linear warmup from 0 over this many optimizer steps", OPTIM)
    schedule: str | None = setting(
        "after warmup: constant (lit-llama), or cosine/linear decay to 10% at the last step", OPTIM,
        choices=SCHEDULES)
    grad_clip: float | None = setting(
        "clip the global gradient norm to this; 0 = off (lit-llama does not clip)", OPTIM)
    batch_size: int | None = setting("samples per optimizer step", OPTIM)
    micro_batch_size: int | None = setting(
        "samples per forward/backward pass on each batch shard of the mesh (data x fsdp devices); gradients "
        "are accumulated over batch_size / (micro_batch_size x shards) of them inside one jitted step", OPTIM)
    max_steps: int | None = setting("optimizer steps to train", OPTIM, exclusive="run length")
    epochs: float | None = setting(
        "passes over the training data instead of --max_steps (each epoch in a new shuffled order)", OPTIM,
        exclusive="run length")
    max_seq_length: int | None = setting(
        "tokens per sample (longer ones are truncated); batches are padded to a few bucket lengths up to this",
        OPTIM)
    packing: bool | None = setting(
        "several samples per row of max_seq_length (first-fit decreasing), each attending only to itself, "
        "positions restarting per sample: the same samples per step and the same token-weighted loss, less "
        "padding computed; micro_batch_size then counts rows. --no-packing: one sample a row, padded to a "
        "bucket length (lit-llama's batches)", OPTIM)
    mask_inputs: bool | None = setting(
        "no loss on the prompt tokens (lit-llama's mask_inputs); validation loss is then over response tokens "
        "only", OPTIM)
    seed: int = setting("adapter init, dropout and data order", OPTIM, default=1337)
    prompt_style: str = setting(
        "how a record becomes a prompt: alpaca (lit-llama's template), plain (instruction and input as they "
        "are), llama2-chat / llama3-chat (Meta's chat formats), chat-template (the model's own, from its "
        "tokenizer_config.json). Only the response is trained on with --mask_inputs, as with alpaca", OPTIM,
        default="alpaca",
        choices=PROMPT_STYLES)
    quantize: str = setting(
        "frozen weights quantized on the device, kernel by kernel, as they are loaded: nf4 (QLoRA's 4-bit "
        "NormalFloat, blocks of 64, ~4.5 bits a weight), nf4-dq (and the block scales in 8 bits: ~4.13 bits), "
        "int8 (per output channel), fp8 (e4m3 per output channel, and the frozen products run in FP8 on "
        "Hopper-class GPUs: faster, ~3% rounding per product); none keeps the storage dtype. Adapters, norms, embeddings and the LM head "
        "stay as they are", OPTIM, default="none", choices=("none",) + QUANTIZE_MODES)
    fp8_both_layouts: bool | None = setting(
        "with --quantize fp8: keep each frozen kernel also transposed (one byte a weight more: bf16's memory), "
        "so no forward product transposes it every step (Hopper's FP8 GEMMs take the contracted axis "
        "innermost; 7B on an H200: +12% tok/s at 4 x 256, +4% at 2 x 2048). Default: on where train.py's "
        "memory estimate says the run still fits the GPU with it, else off (and off without a GPU)", OPTIM)
    fuse_mlp: bool = setting(
        "hold each block's gate and up kernels as one (C, 2, H) kernel while training: one GEMM twice as "
        "wide for both, and one for their input gradient (a run layout: checkpoints, adapters and exports "
        "do not change). Float, int8 and fp8 kernels (fp8: the input gradient takes one e4m3 scale per token "
        "for gate and up together)", OPTIM, default=False)
    save_quantized: str | None = setting(
        "with --quantize: also write the quantized frozen weights, as loaded, to this jaxlora checkpoint "
        "directory (codes and scales, ~4.1-8 bits a weight) before training; a later run reads it as "
        "--pretrained_path with the same --quantize, without quantizing again", OPTIM)
    precision: str | None = setting(
        "bf16-true: bf16 frozen weights and compute (lit-llama); bf16-mixed: f32 weights, bf16 compute; "
        "32-true: all f32 (use on CPU). Adapters and optimizer state are always f32", OPTIM, choices=PRECISIONS)
    remat: str | None = setting(
        "activation rematerialization per layer: none keeps everything; dots/dots_no_batch keep matmul "
        "outputs and recompute the rest (less memory, and faster on an H100); full recomputes each layer",
        OPTIM, choices=REMAT_POLICIES)
    scan_layers: bool | None = setting(
        "run the layers as one scan over stacked weights (compiles in seconds); --no-scan_layers loops over "
        "per-layer weights (fastest on GPU, ~30 s compile per batch length at 7B on an H100)", OPTIM)
    scan_unroll: int | None = setting("layers per scan iteration with --scan_layers; 0 unrolls the scan", OPTIM)
    attention: str = setting(
        "attention kernel: auto = cuDNN flash attention on a GPU with 16-bit compute (packed rows: the "
        "segment mask as a bias), splash on a TPU, else XLA; cudnn-ragged: cuDNN's packed layout for packed "
        "rows (skips masked blocks; measured slower on an H200)", OPTIM,
        default="auto", choices=ATTENTION_IMPLS)
    loss_chunk: int | None = setting(
        "tokens per cross-entropy chunk (the float32 logits of one chunk at a time); 0 = the whole "
        "micro-batch at once", OPTIM)
    rng_impl: str | None = setting(
        "PRNG of the dropout masks; rbg is cheaper on GPUs, its masks depend on the mesh", OPTIM,
        choices=RNG_IMPLS)
    mesh: str | None = setting(
        "device mesh 'data=D,fsdp=F,tensor=T' (axes left out are 1; data=-1 or left out takes the devices the "
        "others leave). data: replicas of the frozen model; fsdp: the frozen weights sharded and gathered "
        "layer by layer; tensor: heads and MLP split (stays within a host). Default: " + DEFAULT_MESH, DEVICES)
    val_size: int | float | None = setting(
        "validation records split off the data (a count, or a fraction < 1); split with seed 42", EVAL)
    eval_interval: int | None = setting("validate every this many steps", EVAL)
    eval_iters: int | None = setting(
        "validation micro-batches per evaluation (the same first eval_iters x micro_batch_size validation "
        "samples each time)", EVAL)
    save_interval: int | None = setting("checkpoint every this many steps (and at the end)", EVAL)
    keep_checkpoints: int = setting("finished checkpoints to keep", EVAL, default=3)
    exact_match_samples: int | None = setting(
        "held-out prompts whose greedy response is compared with the reference before and after training; "
        "0 = off", EVAL)
    max_new_tokens: int | None = setting("length limit of sample generations", EVAL)
    sample_instruction: str | None = setting("fixed instruction answered (greedily) at every evaluation", EVAL)
    progress: bool = setting("no progress bar", EVAL, default=True, negated="no_progress")
    plot: bool = setting("do not write loss.png", EVAL, default=True, negated="no_plot")
    num_samples: int = 3
    verbose: bool = True
    export_lit: bool = True


def profile_for(preset: str | None, pretrained_path: str | None = None) -> dict[str, Any]:
    """The defaults of a run. lit-llama's recipe for a real model: its presets 7B-65B (with
    lit-llama's file locations), any other model preset (Llama 2/3, Mistral), or weights given
    without a preset; the tokenizer of such a model defaults to its own directory (an HF model
    ships tokenizer.json or tokenizer.model). The demo profile for the demo, tiny, or nothing."""
    named = preset.lower() if preset else None
    if named in LIT_PRESETS:
        prof = dict(LIT_LLAMA_RECIPE)
        prof["pretrained_path"] = prof["pretrained_path"].format(preset=preset.upper())
        return prof
    real_weights = pretrained_path is not None and str(pretrained_path).lower() not in ("none", "random") \
        and Path(pretrained_path).resolve() != DEMO_BASE.resolve()  # the demo's base by any path is the demo
    if named in SMALL_PRESETS or (named is None and not real_weights):
        return dict(DEMO_PROFILE)
    prof = {k: v for k, v in LIT_LLAMA_RECIPE.items() if k != "pretrained_path"}
    if real_weights and Path(pretrained_path).is_dir():
        prof["tokenizer_path"] = str(pretrained_path)
    return prof


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
    prof = profile_for(args.preset, args.pretrained_path)
    values = dataclasses.asdict(args)
    if args.init_adapters:
        values.update(initial_adapter_settings(args))
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
    for f in dataclasses.fields(TrainArgs):
        allowed = f.metadata.get("choices")
        if allowed is not None and getattr(a, f.name) not in allowed:
            raise ValueError(f"{f.name} must be one of {list(allowed)}, got {getattr(a, f.name)!r}")
    if a.save_quantized and a.quantize == "none":
        raise ValueError(f"--save_quantized {a.save_quantized} needs --quantize (nf4, nf4-dq, int8 or fp8): it writes "
                         "the quantized frozen weights")
    if a.fp8_both_layouts and a.quantize != "fp8":
        raise ValueError(f"--fp8_both_layouts needs --quantize fp8 (got --quantize {a.quantize}): it keeps the FP8 "
                         "kernels in a second layout")
    if a.fuse_mlp and a.quantize.startswith("nf4"):
        raise ValueError(f"--fuse_mlp keeps float, int8 or fp8 kernels, not --quantize {a.quantize} (NF4 blocks "
                         "are laid out per kernel)")
    if a.resume and a.overwrite:
        raise ValueError("give --resume (continue the run in out_dir) or --overwrite (replace it), not both")
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


def initial_adapter_settings(args: TrainArgs) -> dict[str, Any]:
    """lora_r, lora_alpha and lora_targets of a run that starts from --init_adapters: theirs; a value
    given that disagrees is refused, naming both."""
    theirs = adapters_config(args.init_adapters)
    wanted = {"lora_r": theirs.r, "lora_alpha": theirs.alpha, "lora_targets": theirs.targets}
    for name, value in wanted.items():
        given = getattr(args, name)
        if name == "lora_targets" and given is not None:  # canonical order, as LoRAConfig keeps them
            given = LoRAConfig(targets=parse_targets(given) if isinstance(given, str) else tuple(given)).targets
        if given is not None and given != value:
            shown = ",".join(value) if name == "lora_targets" else value
            raise ValueError(f"--{name} {getattr(args, name)} disagrees with --init_adapters {args.init_adapters}, "
                             f"which has {shown}: leave --{name} out to take theirs")
    return wanted


def json_args(a: TrainArgs) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(a).items()}


# Settings a resumed run must share with the checkpoint, or the continuation is not the same
# run. The mesh and micro_batch_size are not among them: the loss is the mean over the whole
# batch and the data order does not depend on how a batch is split, so a run may resume on
# another mesh (the dropout masks of rng_impl 'rbg' do depend on the mesh).
RESUME_KEYS = ("init_adapters", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "batch_size", "max_seq_length",
               "seed", "mask_inputs", "precision", "val_size", "learning_rate", "weight_decay", "warmup_steps",
               "schedule", "grad_clip", "prompt_style", "quantize")
