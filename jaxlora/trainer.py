"""The LoRA instruction fine-tuning loop behind ``train.py`` (a library: ``run(TrainArgs(...))``).

One run: load the tokenizer, the instruction data (split train/validation deterministically),
the frozen base model (a lit-llama ``.pth`` or a converted jaxlora checkpoint directory),
fresh adapters; evaluate; train with one jitted step per optimizer update (gradient
accumulation over micro-batches inside it); evaluate every ``eval_interval`` steps; save an
orbax checkpoint every ``save_interval`` steps and at the end; write the adapters as
lit-llama's ``lit-llama-lora-finetuned.pth``, ``metrics.jsonl``, ``loss.png`` and
``summary.json`` into ``out_dir``.

Defaults come from one of two profiles (`profile_for`):

- ``LIT_LLAMA_RECIPE`` when the preset is 7B/13B/30B/65B: lit-llama's finetune/lora.py
  (r=8, alpha=16, dropout 0.05, AdamW lr 3e-4 and weight decay 0.01, batch 128 = 32 x 4,
  100 warmup steps then constant, 256 tokens, 1,171 steps, eval/save every 100 steps,
  bf16-true) and its file locations.
- ``DEMO_PROFILE`` otherwise (including no flags at all): the built-in demo, a tiny base
  model pretrained on the shipped corpus, fine-tuned on the shipped instruction data in about
  two minutes on a 2-core CPU, reporting held-out loss and exact match before vs after.

Any field set explicitly wins over the profile.

Resuming (``resume=True``) restores adapters, optimizer state, step, RNG key and the data
position from the latest checkpoint in ``{out_dir}/checkpoints``; the per-step dropout key is
``fold_in(rng, step)``, so a resumed run reproduces the uninterrupted one bit for bit on CPU.

A non-finite loss or gradient norm stops the run with `NonFiniteLossError` before anything
from that step is saved; the last checkpoint on disk is the last good state.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.checkpoint import CheckpointError, Checkpointer
from jaxlora.config import LLaMAConfig, LoRAConfig, parse_targets
from jaxlora.data import (DEMO_DIR, Batcher, DataError, eval_batches, generate_prompt, load_prepared, load_records,
                          prepare_records, split_records)
from jaxlora.generate import greedy_generate
from jaxlora.model import LLaMA, init_adapters, init_variables, split_layers_on_device
from jaxlora.optim import SCHEDULES, learning_rate_schedule, make_optimizer
from jaxlora.steps import TrainState, init_train_state, make_eval_step, make_train_step
from jaxlora.tokenizer import Tokenizer

__all__ = ["TrainArgs", "TrainResult", "NonFiniteLossError", "TrainingError", "DEMO_PROFILE", "LIT_LLAMA_RECIPE",
           "LIT_PRESETS", "PRECISIONS", "profile_for", "resolve_args", "run", "load_base_model"]

LIT_PRESETS = ("7b", "13b", "30b", "65b")
PRECISIONS: dict[str, tuple[Any, Any]] = {  # name -> (compute dtype, frozen-weight storage dtype)
    "bf16-true": (jnp.bfloat16, jnp.bfloat16),
    "bf16-mixed": (jnp.bfloat16, jnp.float32),
    "32-true": (jnp.float32, jnp.float32),
}
DEMO_BASE = DEMO_DIR / "lit-llama-demo.pth"
LIT_SAMPLE_INSTRUCTION = "Recommend a movie for me to watch during the weekend and explain the reason."
LORA_FILE = "lit-llama-lora-finetuned.pth"
ADAPTERS_DIR = "adapters"  # the final adapters as an adapters-only jaxlora directory
RANDOM_BASE = ("none", "random")

# lit-llama's finetune/lora.py, used whenever the preset is one of LIT_PRESETS.
LIT_LLAMA_RECIPE: dict[str, Any] = dict(
    data_path="data/alpaca", tokenizer_path="checkpoints/lit-llama/tokenizer.model",
    pretrained_path="checkpoints/lit-llama/{preset}/lit-llama.pth", out_dir="out/lora/alpaca",
    lora_r=8, lora_alpha=16.0, lora_dropout=0.05, lora_targets="q,v",
    learning_rate=3e-4, weight_decay=0.01, warmup_steps=100, schedule="constant", grad_clip=0.0,
    batch_size=128, micro_batch_size=4, max_steps=1171, max_seq_length=256,
    eval_interval=100, eval_iters=100, save_interval=100, val_size=2000,
    precision="bf16-true", mask_inputs=False, exact_match_samples=0, max_new_tokens=100, sample_instruction=LIT_SAMPLE_INSTRUCTION,
    # Fastest measured on an H100 (docs/benchmarks.md): per-layer weights in an unrolled layer
    # loop (~30 s compile per bucket length) and matmul-output remat (+4%, 30% less
    # activation memory).
    scan_layers=False, scan_unroll=1, remat="dots_no_batch",
)

# The built-in demo: `python train.py` with no flags (about two minutes on a 2-core CPU).
DEMO_PROFILE: dict[str, Any] = dict(
    preset="demo", data_path=str(DEMO_DIR / "instructions.json"), tokenizer_path=str(DEMO_DIR / "tokenizer.model"),
    pretrained_path=str(DEMO_BASE), out_dir="out/demo",
    lora_r=8, lora_alpha=16.0, lora_dropout=0.0, lora_targets="q,v",
    learning_rate=3e-3, weight_decay=0.01, warmup_steps=20, schedule="constant", grad_clip=0.0,
    batch_size=16, micro_batch_size=16, max_steps=500, max_seq_length=64,
    eval_interval=100, eval_iters=8, save_interval=250, val_size=200,
    precision="32-true", mask_inputs=True, exact_match_samples=50, max_new_tokens=16,
    sample_instruction="Reverse the word rocket.", scan_layers=True, scan_unroll=4, remat="none",
)


class TrainingError(RuntimeError):
    """The run cannot go on (bad settings for a resumed run, nothing to train on, ...)."""


class NonFiniteLossError(TrainingError):
    """The loss or gradient norm became NaN or infinite; nothing from that step was saved."""


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
    micro_batch_size: int | None = None
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
    resume: bool = False
    seed: int = 1337
    mask_inputs: bool | None = None
    keep_checkpoints: int = 3
    num_samples: int = 3
    remat: str | None = None
    attention: str = "auto"
    progress: bool = True
    verbose: bool = True
    plot: bool = True
    export_lit: bool = True


@dataclass
class TrainResult:
    """What a run reports (also written to ``{out_dir}/summary.json``, without `lora`)."""

    out_dir: str
    step: int
    val_loss_before: float | None
    val_loss_after: float | None
    exact_match_before: float | None
    exact_match_after: float | None
    samples_before: list[dict[str, str]] = field(default_factory=list)
    samples_after: list[dict[str, str]] = field(default_factory=list)
    train_seconds: float = 0.0
    total_seconds: float = 0.0
    tokens_per_second: float | None = None
    lit_lora_path: str | None = None
    adapters_dir: str | None = None
    loss_png: str | None = None
    lora: Any = None

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("lora")
        return d


# ----------------------------------------------------------------------------- settings

def profile_for(preset: str | None) -> dict[str, Any]:
    """The defaults of a run: lit-llama's recipe for 7B/13B/30B/65B, the demo profile otherwise."""
    if preset is not None and preset.lower() in LIT_PRESETS:
        prof = dict(LIT_LLAMA_RECIPE)
        prof["pretrained_path"] = prof["pretrained_path"].format(preset=preset.upper())
        return prof
    return dict(DEMO_PROFILE)


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
    if a.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {a.precision!r}")
    if a.schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {a.schedule!r}")
    for name in ("batch_size", "micro_batch_size", "max_seq_length", "eval_interval", "save_interval", "eval_iters"):
        if getattr(a, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(a, name)}")
    if a.batch_size % a.micro_batch_size:
        raise ValueError(f"batch_size {a.batch_size} is not a multiple of micro_batch_size {a.micro_batch_size}")
    if a.max_steps is not None and a.max_steps < 0:
        raise ValueError(f"max_steps must be >= 0, got {a.max_steps}")
    if a.epochs is not None and a.epochs <= 0:
        raise ValueError(f"epochs must be > 0, got {a.epochs}")
    if isinstance(a.lora_targets, str):
        a.lora_targets = parse_targets(a.lora_targets)
    a.lora_targets = tuple(a.lora_targets)
    return a


def _json_args(a: TrainArgs) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(a).items()}


# Settings a resumed run must share with the checkpoint, or the continuation is not the same run.
_RESUME_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_targets", "batch_size", "micro_batch_size",
                "max_seq_length", "seed", "mask_inputs", "precision", "val_size", "learning_rate", "weight_decay",
                "warmup_steps", "schedule", "grad_clip")


# ----------------------------------------------------------------------------- loading

def load_base_model(pretrained_path: str | os.PathLike | None, preset: str | None, param_dtype: Any,
                    seed: int = 0) -> tuple[LLaMAConfig, Any, str]:
    """The frozen weights: (config, params, description).

    pretrained_path: a lit-llama ``.pth`` file (needs torch), a jaxlora checkpoint directory,
    or "none"/"random" for random weights of `preset` (for smoke tests only). When `preset`
    is given the weights must match it; a mismatch raises an error naming the file and key.
    """
    preset_cfg = LLaMAConfig.from_name(preset) if preset else None
    if pretrained_path is None or str(pretrained_path).lower() in RANDOM_BASE:
        if preset_cfg is None:
            raise ValueError("random base weights need a preset (--preset)")
        model = LLaMA(preset_cfg, param_dtype=param_dtype)
        params = init_variables(model, jax.random.key(seed))["params"]
        return preset_cfg, params, f"random {preset} weights (seed {seed})"
    path = Path(pretrained_path)
    from jaxlora import checkpoint_io
    if path.is_dir():
        if not checkpoint_io.is_jaxlora_checkpoint(path):
            raise FileNotFoundError(f"--pretrained_path {path}: a directory but not a jaxlora checkpoint "
                                    f"(no {checkpoint_io.CONFIG_FILE} and {checkpoint_io.PARAMS_DIR}/)")
        config, _, variables = checkpoint_io.load_checkpoint(path, param_dtype=param_dtype)
        if preset_cfg is not None and config != preset_cfg:
            diffs = [f"{k}: checkpoint has {v}, preset {preset} has {getattr(preset_cfg, k)}"
                     for k, v in config.to_dict().items() if getattr(preset_cfg, k) != v]
            raise checkpoint_io.CheckpointError(f"{path / checkpoint_io.CONFIG_FILE}: does not match preset {preset!r} ("
                                                + "; ".join(diffs) + ")")
        return config, variables["params"], f"jaxlora checkpoint {path}"
    if not path.is_file():
        raise FileNotFoundError(f"--pretrained_path {path}: no such file or directory")
    from jaxlora.formats.lit_files import load_lit_llama
    from jaxlora.formats.lit_llama import StateDictError
    try:
        config, _, variables = load_lit_llama(path, param_dtype=param_dtype, config=preset_cfg, place=jax.device_put)
    except StateDictError as e:
        if preset_cfg is None:
            raise
        c = preset_cfg
        raise StateDictError(f"{e} -- the weights do not fit preset {preset!r} (n_layer={c.n_layer}, "
                             f"n_embd={c.n_embd}, padded_vocab_size={c.padded_vocab_size}); check --preset") from e
    return config, variables["params"], f"lit-llama checkpoint {path}"


def load_data(a: TrainArgs, tokenizer: Tokenizer, log: Callable[[str], None]) -> tuple[list[dict], list[dict]]:
    """(train samples, validation samples), tokenized. JSON/JSONL records are split here
    (deterministically, seed 42 as lit-llama's prepare_alpaca); a directory holding lit-llama's
    prepared ``train.pt`` and ``test.pt`` is used as it is."""
    path = Path(a.data_path)
    if path.is_dir():
        train_pt, test_pt = path / "train.pt", path / "test.pt"
        if not train_pt.is_file():
            raise FileNotFoundError(f"--data_path {path}: a directory without train.pt (lit-llama's "
                                    "prepare_alpaca.py output); pass a JSON file of records instead")
        train = load_prepared(train_pt)
        val = load_prepared(test_pt) if test_pt.is_file() else []
        log(f"data: {train_pt} ({len(train)} samples), {test_pt} ({len(val)} samples); prepared files keep "
            "their own max length and input masking")
        return train, val
    if not path.exists():
        raise FileNotFoundError(f"--data_path {path}: no such file")
    records = load_records(path)
    val_size = a.val_size
    if isinstance(val_size, float) and val_size >= 1:
        val_size = int(val_size)
    n = len(records)
    if isinstance(val_size, int) and val_size >= n:
        capped = max(1, n // 10) if n > 1 else 0
        log(f"data: val_size {val_size} >= {n} records; using {capped}")
        val_size = capped
    train_recs, val_recs = split_records(records, val_size, seed=42) if val_size else (list(records), [])
    if not train_recs:
        raise DataError(f"{path}: no training records left after taking {len(val_recs)} for validation")
    train = prepare_records(train_recs, tokenizer, a.max_seq_length, a.mask_inputs)
    val = prepare_records(val_recs, tokenizer, a.max_seq_length, a.mask_inputs)
    log(f"data: {path}: {n} records -> {len(train)} train / {len(val)} validation (split seed 42)")
    return train, val


def init_lora(model: LLaMA, seed: int) -> Any:
    """Fresh adapters for a run's seed (stacked layout)."""
    return init_adapters(model, jax.random.fold_in(jax.random.key(seed), 0x10A))


# ----------------------------------------------------------------------------- the run

class _Metrics:
    """metrics.jsonl: one JSON object per line, flushed as written."""

    def __init__(self, path: Path, keep_until: int | None) -> None:
        self.path = path
        if keep_until is None or not path.exists():
            path.write_text("")
        else:  # resuming: drop what the interrupted run logged after the checkpoint
            kept = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if row.get("step", 0) <= keep_until and row.get("type") != "error":
                    kept.append(line)
            path.write_text("".join(k + "\n" for k in kept))
        self._f = open(path, "a", encoding="utf-8")

    def write(self, **row: Any) -> None:
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def _finite_tree(tree: Any) -> bool:
    return all(bool(np.isfinite(np.asarray(x)).all()) for x in jax.tree.leaves(jax.device_get(tree)))


def run(args: TrainArgs) -> TrainResult:
    """Train adapters as `args` says; see the module docstring. Returns the before/after numbers."""
    t_start = time.time()
    a = resolve_args(args)
    log = (lambda msg: print(msg, flush=True)) if a.verbose else (lambda msg: None)
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    compute_dtype, storage_dtype = PRECISIONS[a.precision]

    tokenizer = Tokenizer(a.tokenizer_path)
    train_samples, val_samples = load_data(a, tokenizer, log)
    config, params, base_desc = load_base_model(a.pretrained_path, a.preset, storage_dtype, a.seed)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer {a.tokenizer_path} has {tokenizer.vocab_size} pieces but the model "
                         f"({base_desc}) has vocab_size {config.vocab_size}")
    if a.max_seq_length > config.block_size:
        raise ValueError(f"max_seq_length {a.max_seq_length} exceeds the model's block_size {config.block_size}")
    params = jax.device_put(jax.tree.map(lambda x: jnp.asarray(x, storage_dtype), params))
    lora_config = LoRAConfig(r=a.lora_r, alpha=a.lora_alpha, dropout=a.lora_dropout, targets=a.lora_targets)
    model = LLaMA(config, lora_config, dtype=compute_dtype, param_dtype=storage_dtype, lora_dtype=jnp.float32,
                  attention=a.attention, remat=a.remat, scan_layers=a.scan_layers,
                  scan_unroll=min(a.scan_unroll, config.n_layer))
    params = split_layers_on_device(model, params)  # once, not per step (a no-op for scanned layers)
    log(f"model: {base_desc}: {config.num_params():,} frozen parameters ({a.precision}), "
        f"{lora_config.num_params(config):,} trainable (LoRA r={a.lora_r}, alpha={a.lora_alpha:g}, "
        f"targets {','.join(lora_config.targets)})")

    max_steps = a.max_steps
    if max_steps is None:
        max_steps = math.ceil(a.epochs * len(train_samples) / a.batch_size)
    schedule = learning_rate_schedule(a.learning_rate, a.warmup_steps, a.schedule,
                                      total_steps=max_steps if a.schedule != "constant" else None)
    optimizer = make_optimizer(schedule, weight_decay=a.weight_decay, grad_clip=a.grad_clip or None)
    state = init_train_state(init_lora(model, a.seed), optimizer, a.seed)
    batcher = Batcher(train_samples, a.batch_size, a.micro_batch_size, a.max_seq_length, seed=a.seed)
    buckets = batcher.buckets

    checkpointer = Checkpointer(out / "checkpoints", max_to_keep=a.keep_checkpoints)
    start_step, baseline = 0, None
    latest = checkpointer.latest_step()
    if latest is not None and not a.resume:
        raise TrainingError(f"{checkpointer.directory} already holds checkpoints (latest: step {latest}); "
                            "pass --resume to continue that run, or choose another --out_dir")
    if a.resume and latest is not None:
        meta = checkpointer.restore_meta(latest)
        saved = meta.get("args", {})
        keys = _RESUME_KEYS + (("max_steps", "epochs") if a.schedule != "constant" else ())
        for key in keys:
            mine = _json_args(a)[key]
            if key in saved and saved[key] != mine:
                raise CheckpointError(f"{checkpointer.step_dir(latest)}: saved with {key}={saved[key]!r}, this run "
                                      f"has {key}={mine!r}; resume with the same settings")
        if meta.get("model") != config.to_dict():
            raise CheckpointError(f"{checkpointer.step_dir(latest)}: saved for model {meta.get('model')}, "
                                  f"this run's base model is {config.to_dict()}")
        state, meta = checkpointer.restore(state, latest)
        try:
            batcher.restore(meta["data"])
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{checkpointer.step_dir(latest)}: data position does not fit this data: {e}") from e
        start_step, baseline = latest, meta.get("baseline")
        log(f"resumed from {checkpointer.step_dir(latest)} (step {latest}, data epoch {batcher.epoch} "
            f"position {batcher.position})")
    elif a.resume:
        log(f"--resume: no checkpoint in {checkpointer.directory}; starting a new run")

    train_step = make_train_step(model, optimizer)
    eval_step = make_eval_step(model)
    val_eval = val_samples[:a.eval_iters * a.micro_batch_size]
    em_samples = val_samples[:a.exact_match_samples] if a.exact_match_samples else []
    shown = _diverse(em_samples if em_samples else val_samples, a.num_samples)
    sample_prompt = generate_prompt({"instruction": a.sample_instruction, "input": ""})
    sample_ids = tokenizer.encode(sample_prompt, bos=True, eos=False)[-(config.block_size - a.max_new_tokens):]

    def val_loss(lora: Any) -> float | None:
        if not val_eval:
            return None
        total, count = jnp.zeros(()), jnp.zeros((), jnp.int32)
        for b in eval_batches(val_eval, a.micro_batch_size, a.max_seq_length, buckets):
            s, c = eval_step(lora, params, {"input_ids": b["input_ids"][0], "labels": b["labels"][0]})
            total, count = total + s, count + c
        return float(total) / max(int(count), 1)

    def responses(lora: Any, samples: Sequence[dict]) -> list[str]:
        if not samples:
            return []
        outs = greedy_generate(model, {"params": params, "lora": lora},
                               [s["input_ids_no_response"] for s in samples], a.max_new_tokens, tokenizer.eos_id,
                               vocab_size=tokenizer.vocab_size)
        return [tokenizer.decode(o).strip() for o in outs]

    def task_eval(lora: Any) -> tuple[float | None, list[dict[str, str]]]:
        """Exact match on held-out prompts, and the shown samples (from the same generations)."""
        pool = em_samples + [s for s in shown if not any(s is e for e in em_samples)]
        got = responses(lora, pool)
        em = (float(np.mean([g == s["output"].strip() for g, s in zip(got, em_samples)])) if em_samples else None)
        by_id = {id(s): g for s, g in zip(pool, got)}
        samples = [{"instruction": s["instruction"], "input": s.get("input", ""), "expected": s.get("output", ""),
                    "response": by_id[id(s)]} for s in shown]
        return em, samples

    def fixed_sample(lora: Any) -> str | None:
        if not a.sample_instruction:
            return None
        out_ids = greedy_generate(model, {"params": params, "lora": lora}, sample_ids, a.max_new_tokens,
                                  tokenizer.eos_id, vocab_size=tokenizer.vocab_size)
        return tokenizer.decode(out_ids).strip()

    metrics = _Metrics(out / "metrics.jsonl", keep_until=start_step if start_step else None)
    if baseline is None:
        t0 = time.time()
        vl = val_loss(state.lora)
        em, samples = task_eval(state.lora)
        baseline = {"val_loss": vl, "exact_match": em, "samples": samples}
        metrics.write(type="eval", step=0, val_loss=vl, exact_match=em, sample=fixed_sample(state.lora))
        log(f"before training: val loss {_fmt(vl)}" + (f", exact match {em:.1%} on {len(em_samples)} held-out "
                                                        f"prompts" if em is not None else "")
            + f" ({time.time() - t0:.1f}s)")

    meta_base = {"args": _json_args(a), "model": config.to_dict(), "lora": lora_config.to_dict(),
                 "baseline": baseline}

    def save(state: TrainState, step: int) -> None:
        if not _finite_tree(state.lora):
            raise NonFiniteLossError(f"adapters became non-finite at step {step}; not saved. Last good checkpoint: "
                                     f"{_last(checkpointer)}")
        checkpointer.save(state, {**meta_base, "data": batcher.state(), "step": step})

    bar = None
    step = start_step
    tokens_seen, train_time, rate = 0, 0.0, None
    try:
        if a.progress and max_steps > start_step:
            from tqdm.auto import tqdm
            bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                       mininterval=0.5)
        log(f"training steps {start_step + 1}..{max_steps}: batch {a.batch_size} = {batcher.n_micro} x "
            f"{a.micro_batch_size}, buckets {list(buckets)}, lr {a.learning_rate:g} ({a.schedule}, "
            f"{a.warmup_steps} warmup)")
        last_saved = start_step if start_step else None
        # A step's metrics are read only after the next step is queued, so the device never
        # waits for the host (dispatching a step costs milliseconds of host time); they are
        # read at once before anything that must see a finished step (eval, save, the end).
        pending = None  # (step, metrics still on the device, tokens in the batch, epoch)
        done_at = time.perf_counter()

        def finish(step: int, m: dict, n_tokens: int, epoch: int) -> None:
            nonlocal tokens_seen, train_time, rate, done_at
            m = jax.device_get(m)
            now = time.perf_counter()
            dt, done_at = now - done_at, now
            loss, gnorm = float(m["loss"]), float(m["grad_norm"])
            lr = float(schedule(step - 1))
            if not (math.isfinite(loss) and math.isfinite(gnorm)):
                metrics.write(type="error", step=step, loss=loss, grad_norm=gnorm)
                raise NonFiniteLossError(
                    f"non-finite loss at step {step} (loss {loss}, grad norm {gnorm}, lr {lr:.3g}); the run stopped "
                    f"and nothing from this step was saved. Last good checkpoint: {_last(checkpointer)}. Try a lower "
                    "--learning_rate or --grad_clip 1.0, then --resume.")
            if step > start_step + 1:  # the first step of a process includes compilation
                tokens_seen, train_time = tokens_seen + n_tokens, train_time + dt
                rate = n_tokens / dt if rate is None else 0.8 * rate + 0.2 * n_tokens / dt
            metrics.write(type="train", step=step, loss=loss, lr=lr, grad_norm=gnorm,
                          loss_tokens=int(m["tokens"]), tokens=n_tokens, seconds=round(dt, 4),
                          epoch=epoch)
            if bar is not None:
                bar.set_postfix_str(f"loss {loss:.4f}  lr {lr:.2e}  {rate or 0:,.0f} tok/s", refresh=False)
                bar.update(1)

        for step in range(start_step + 1, max_steps + 1):
            batch = next(batcher)
            n_tokens = int(sum(min(len(train_samples[i]["input_ids"]), a.max_seq_length)
                               for i in batch["index"].reshape(-1)))
            state, m = train_step(state, params, {"input_ids": batch["input_ids"], "labels": batch["labels"]})
            if pending is not None:
                finish(*pending)
            pending = (step, m, n_tokens, batcher.epoch)
            evaluate, checkpoint = step % a.eval_interval == 0 and step != max_steps, step % a.save_interval == 0
            if evaluate or checkpoint or step == max_steps:
                finish(*pending)
                pending = None
            if evaluate:
                vl = val_loss(state.lora)
                sample = fixed_sample(state.lora)
                metrics.write(type="eval", step=step, val_loss=vl, sample=sample)
                msg = f"step {step}: val loss {_fmt(vl)}" + (f" | {a.sample_instruction!r} -> {sample!r}"
                                                              if sample is not None else "")
                bar.write(msg) if bar is not None else log(msg)
                done_at = time.perf_counter()  # evaluation time is not training time
            if checkpoint:
                save(state, step)
                last_saved = step
                done_at = time.perf_counter()
        if bar is not None:
            bar.close()
            bar = None
        if last_saved != step or (max_steps == 0 and checkpointer.latest_step() is None):
            save(state, step)
    except BaseException:
        if bar is not None:
            bar.close()
        metrics.close()
        checkpointer.close()
        raise
    train_seconds = train_time

    # ---- after training
    vl = val_loss(state.lora)
    em, samples = task_eval(state.lora)
    sample = fixed_sample(state.lora)
    metrics.write(type="eval", step=step, val_loss=vl, exact_match=em, sample=sample)
    metrics.close()
    checkpointer.close()

    lora_host = jax.device_get(state.lora)
    from jaxlora.checkpoint_io import save_checkpoint
    adapters_dir = save_checkpoint(out / ADAPTERS_DIR, config, lora_config, None, lora_host, overwrite=True,
                                   base=str(a.pretrained_path))
    lit_path = None
    if a.export_lit:
        lit_path = _export_lit(lora_host, config, lora_config, out / LORA_FILE, log)
    png = None
    if a.plot:
        from jaxlora.plot import plot_loss
        png = plot_loss(out / "metrics.jsonl", out / "loss.png", title=f"LoRA fine-tuning of {Path(str(a.pretrained_path)).name}, "
                        f"r={a.lora_r} on {','.join(lora_config.targets)}")
        if png is None:
            log("loss.png not written (matplotlib not installed: pip install 'jaxlora[plot]')")

    result = TrainResult(
        out_dir=str(out), step=step, val_loss_before=baseline.get("val_loss"), val_loss_after=vl,
        exact_match_before=baseline.get("exact_match"), exact_match_after=em,
        samples_before=baseline.get("samples", []), samples_after=samples,
        train_seconds=round(train_seconds, 2), total_seconds=round(time.time() - t_start, 2),
        tokens_per_second=round(tokens_seen / train_time, 1) if train_time > 0 else None,
        lit_lora_path=str(lit_path) if lit_path else None, adapters_dir=str(adapters_dir), loss_png=str(png) if png else None, lora=lora_host)
    (out / "summary.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
    if a.verbose:
        print(report(result))
    return result


def _export_lit(lora: Any, config: LLaMAConfig, lora_config: LoRAConfig, path: Path,
                log: Callable[[str], None]) -> Path | None:
    try:
        from jaxlora.formats.lit_files import save_lit_lora
        save_lit_lora(lora, config, lora_config, path)
    except ImportError:
        log(f"{path.name} not written: writing PyTorch files needs torch (pip install 'jaxlora[torch]')")
        return None
    except ValueError as e:  # e.g. adapters on o/gate/up/down, which lit-llama's format cannot hold
        log(f"{path.name} not written: {e}")
        return None
    return path


def _diverse(samples: Sequence[dict], n: int) -> list[dict]:
    """Up to n samples, preferring different instructions (by first word), in data order."""
    picked, seen = [], set()
    for s in samples:
        key = s.get("instruction", "").split(" ")[0]
        if key not in seen:
            picked.append(s)
            seen.add(key)
        if len(picked) == n:
            return picked
    rest = [s for s in samples if not any(s is p for p in picked)]
    return picked + rest[:n - len(picked)]


def _last(checkpointer: Checkpointer) -> str:
    step = checkpointer.latest_step()
    return "none yet" if step is None else f"step {step} in {checkpointer.step_dir(step)}"


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def report(r: TrainResult) -> str:
    """The human-readable summary printed at the end of a run."""
    lines = ["", f"=== LoRA fine-tuning: {r.step} steps, {r.total_seconds:.0f}s in all"
             + (f", {r.tokens_per_second:,.0f} tokens/s while training" if r.tokens_per_second else "") + " ==="]
    lines.append(f"validation loss   before {_fmt(r.val_loss_before)}   after {_fmt(r.val_loss_after)}")
    if r.exact_match_before is not None:
        lines.append(f"exact match       before {r.exact_match_before:.1%}   after {r.exact_match_after:.1%}")
    for title, samples in (("before", r.samples_before), ("after", r.samples_after)):
        if samples:
            lines.append(f"samples {title} fine-tuning:")
            for s in samples:
                prompt = s["instruction"] + (f" [{s['input']}]" if s.get("input") else "")
                lines.append(f"  {prompt!r} -> {s['response']!r}   (expected {s['expected']!r})")
    lines.append(f"outputs in {r.out_dir}: {ADAPTERS_DIR}/, checkpoints/, metrics.jsonl, summary.json"
                 + (", loss.png" if r.loss_png else "") + (f", {LORA_FILE}" if r.lit_lora_path else ""))
    if r.adapters_dir and not r.lit_lora_path:
        lines.append(f"merged lit-llama checkpoint: python convert/to_lit_llama.py --checkpoint_dir BASE "
                     f"--adapters {r.adapters_dir} --merged --out merged.pth  (BASE: the base's lit-llama .pth "
                     "or jaxlora checkpoint directory)")
    return "\n".join(lines)
