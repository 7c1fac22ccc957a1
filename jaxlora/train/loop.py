"""The LoRA instruction fine-tuning loop behind ``train.py`` (a library: ``run(TrainArgs(...))``).

One run: check every input, load the tokenizer and the instruction data (split
train/validation deterministically), build the run on a device mesh (`jaxlora.train.build.build_run`:
frozen weights straight into their shards, sharded adapters and optimizer state, jitted
steps); evaluate; train with one jitted step per optimizer update (gradient accumulation over
micro-batches inside it); evaluate every ``eval_interval`` steps; save an orbax checkpoint
every ``save_interval`` steps, at the end and on Ctrl-C; write the adapters (an adapters
directory and lit-llama's ``lit-llama-lora-finetuned.pth``), ``metrics.jsonl``, ``loss.png``
and ``summary.json`` into ``out_dir``. Settings and their defaults: `jaxlora.train.settings`.

Resuming (``resume=True``) restores adapters, optimizer state, step, RNG key and the data
position from the latest checkpoint in ``{out_dir}/checkpoints``, onto this run's mesh
(which may differ from the one that saved it); the per-step dropout key is
``fold_in(rng, step)``, so a resumed run reproduces the uninterrupted one bit for bit on CPU.

A non-finite loss or gradient norm stops the run with `NonFiniteLossError` before anything
from that step is saved; the last checkpoint on disk is the last good state.

Speed is wall-clock: a step's time runs from the end of the previous step to its own end, and
compiling (timed and reported on its own) never falls inside it; the first step of each newly
compiled program is a warm-up, left out of the speed and MFU as the benchmark leaves out its own.

The parts, each a module with tests of its own (tests/test_train_parts.py): inputs (checks,
data, counts), spec + build (what a run is made of, built on a mesh), evaluate (val loss,
exact match, samples), checkpoints (refuse/resume/save), metrics (metrics.jsonl, step clock,
progress bar, the one-step-late reads), exports (adapters, lit-llama file, PEFT, plot) and
report (TrainResult, summary.json). This module only puts them in order (`run`) and runs the
steps (`StepLoop`); Ctrl-C and errors leave through the same with-blocks.
"""
from __future__ import annotations

import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from jaxlora.errors import InputsError, NonFiniteLossError, TrainingError
from jaxlora.parallel import distributed
from jaxlora.parallel import sharding as shd
from jaxlora.text.prompts import get_style
from jaxlora.text.tokenizer import TextTokenizer, open_tokenizer
from jaxlora.train.accounting import check_memory, flops_per_token, fp8_speed_note, mfu
from jaxlora.train.build import Run, build_run
from jaxlora.train.checkpoints import (
    CHECKPOINTS_DIR,
    RunCheckpoints,
    Start,
    open_checkpoints,
    remove_checkpoints,
)
from jaxlora.train.data import Batcher, LocalRows
from jaxlora.train.evaluate import Evaluator
from jaxlora.train.exports import Exports, clear_outputs, write_exports
from jaxlora.train.inputs import check_inputs, count_steps, load_data
from jaxlora.train.metrics import (
    METRICS_FILE,
    MetricsLog,
    QueuedStep,
    StepTracker,
    progress_bar,
)
from jaxlora.train.report import TrainResult, report, write_summary
from jaxlora.train.settings import (
    DEMO_PROFILE,
    LIT_LLAMA_RECIPE,
    LIT_PRESETS,
    PRECISIONS,
    TrainArgs,
    json_args,
    profile_for,
    resolve_args,
)
from jaxlora.train.spec import run_spec
from jaxlora.train.steps import TrainState
from jaxlora.weights.quantized import save_quantized

__all__ = ["TrainArgs", "TrainResult", "NonFiniteLossError", "TrainingError", "InputsError", "DEMO_PROFILE",
           "LIT_LLAMA_RECIPE", "LIT_PRESETS", "PRECISIONS", "profile_for", "resolve_args", "run", "check_inputs",
           "report"]


def run(args: TrainArgs) -> TrainResult:
    """Train adapters as `args` says; see the module docstring. Returns the before/after numbers."""
    t_start = time.time()
    a = resolve_args(args)
    primary = distributed.is_primary()
    log = _printer(a.verbose and primary)
    check_inputs(a)
    tokenizer = open_tokenizer(a.tokenizer_path)
    style = get_style(a.prompt_style, tokenizer)
    train_samples, val_samples = load_data(a, tokenizer, style, log)
    max_steps = count_steps(a, len(train_samples))
    r = build_run(run_spec(a), max_steps=max_steps, log=log)
    check_model(r, a, tokenizer, log)
    if a.save_quantized:
        save_quantized_base(r, a, log)
    batcher = make_batcher(r, a, train_samples)
    out = prepare_out_dir(a, log)  # only now that every input has been read
    # One way out, whatever stops the run: each of these closes as the with-block is left.
    with closing(RunCheckpoints(open_checkpoints(out, a, log))) as ckpts:
        start = ckpts.resume(a, r.config, r.state, batcher, log)
        evaluator = Evaluator(r, tokenizer, style, val_samples, a, batcher.buckets)
        with closing(MetricsLog(out / METRICS_FILE, keep_until=start.step or None, enabled=primary)) as rows:
            baseline = start.baseline or measure_baseline(evaluator, start.state.lora, rows, log)
            ckpts.meta = {"args": json_args(a), "model": r.config.to_dict(), "lora": r.lora_config.to_dict(),
                          "baseline": baseline}
            bar = progress_bar(max_steps, start.step, a.progress and primary)
            with closing(StepTracker(rows, r.schedule, log, ckpts.last_good, bar)) as tracker:
                steps = StepLoop(r, a, batcher, tracker, ckpts, evaluator, start)
                steps.run(max_steps)
            final = evaluator(steps.hand.state.lora, full=True)
            rows.write(**final.row(steps.hand.step))
    lora = distributed.to_host(steps.hand.state.lora)
    exports = write_exports(lora, r.config, r.lora_config, a, log, r.quantized) if primary else Exports()
    result = summarize(r, a, start, steps, baseline, final, exports, lora, time.time() - t_start)
    if primary:
        write_summary(result)
        log(report(result))
    return result


def _printer(enabled: bool) -> Callable[[str], None]:
    return (lambda msg: print(msg, flush=True)) if enabled else (lambda msg: None)


def check_model(r: Run, a: TrainArgs, tokenizer: TextTokenizer, log: Callable[[str], None]) -> None:
    """The tokenizer fits the model, the run fits the devices; say what is trained."""
    config, lora_config = r.config, r.lora_config
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer {a.tokenizer_path} has {tokenizer.vocab_size} pieces but the model "
                         f"({r.base_desc}) has vocab_size {config.vocab_size}")
    rows_per_device = r.micro_rows // shd.batch_shards(r.mesh)
    check_memory(config, lora_config, run_spec(a).speed, r.mesh, rows_per_device, a.max_seq_length, log)
    note = fp8_speed_note(rows_per_device * a.max_seq_length, jax.default_backend(),
                          getattr(jax.devices()[0], "compute_capability", None)) if a.quantize == "fp8" else None
    if note:
        log(note)
    log(f"model: {r.base_desc}: {config.num_params():,} frozen parameters ({a.precision}), "
        f"{lora_config.num_params(config):,} trainable (LoRA r={a.lora_r}, alpha={a.lora_alpha:g}, "
        f"targets {','.join(lora_config.targets)})")


def save_quantized_base(r: Run, a: TrainArgs, log: Callable[[str], None]) -> None:
    """--save_quantized: the frozen weights as the run holds them, as a quantized checkpoint."""
    t0 = time.time()
    where = save_quantized(a.save_quantized, r.model, r.params, r.quantized, overwrite=a.overwrite)
    log(f"quantized frozen weights ({r.quantized['mode']}) saved to {where} in {time.time() - t0:.1f} s; train "
        f"from them with --pretrained_path {where} --quantize {r.quantized['mode']}")


def make_batcher(r: Run, a: TrainArgs, train_samples: Any) -> Batcher:
    """The training batches; with several processes each fills (and tokenizes) only its own rows."""
    local = None
    if jax.process_count() > 1:
        fill, count = shd.local_rows(r.shardings.batch, a.batch_size // r.micro_rows, r.micro_rows)
        local = LocalRows(fill, count, distributed.agree_on_batch)
    return Batcher(train_samples, a.batch_size, r.micro_rows, a.max_seq_length, seed=a.seed, local=local,
                   packing=a.packing, shards=shd.batch_shards(r.mesh))


def prepare_out_dir(a: TrainArgs, log: Callable[[str], None]) -> Path:
    """Create out_dir; with --overwrite, first remove an earlier run's checkpoints and outputs."""
    out = Path(a.out_dir)
    if a.overwrite and out.is_dir():
        removed = clear_outputs(out) + ([CHECKPOINTS_DIR] if (out / CHECKPOINTS_DIR).exists() else [])
        remove_checkpoints(out)
        distributed.sum_over_processes(0)  # everyone waits for the primary's deletions
        if removed:
            log(f"--overwrite: removed {', '.join(removed)} of the earlier run in {out}")
    out.mkdir(parents=True, exist_ok=True)
    return out


def measure_baseline(evaluator: Evaluator, lora: Any, rows: MetricsLog, log: Callable[[str], None]) -> dict:
    """The before-training evaluation (saved with every checkpoint, so a resumed run reports it)."""
    t0 = time.time()
    ev = evaluator(lora, full=True)
    rows.write(**ev.row(0))
    log(f"before training: val loss {_fmt(ev.val_loss)}" + (
        f", exact match {ev.exact_match:.1%} on {len(evaluator.em_samples)} held-out prompts"
        if ev.exact_match is not None else "") + f" ({time.time() - t0:.1f}s)")
    return {"val_loss": ev.val_loss, "exact_match": ev.exact_match, "samples": ev.samples}


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


@dataclass
class InHand:
    """The newest state the host holds, its step, and the data position after it."""

    step: int
    state: TrainState
    data: dict


class StepLoop:
    """The optimizer steps from `start` to the run's end: one jitted step per update, compiled
    once per batch shape; evaluation and checkpoints at their intervals."""

    def __init__(self, r: Run, a: TrainArgs, batcher: Batcher, tracker: StepTracker, ckpts: RunCheckpoints,
                 evaluator: Evaluator, start: Start) -> None:
        self.r, self.a, self.batcher, self.evaluator = r, a, batcher, evaluator
        self.tracker, self.ckpts = tracker, ckpts
        self.hand = InHand(start.step, start.state, batcher.state())
        self.compiled: dict[tuple, Any] = {}
        self.compile_seconds = 0.0

    def run(self, max_steps: int) -> None:
        """Train to `max_steps`; on Ctrl-C, save what was trained (`save_on_interrupt`) and re-raise."""
        try:
            self.train(max_steps)
        except KeyboardInterrupt:
            self.save_on_interrupt()
            raise

    def train(self, max_steps: int) -> None:
        a, b = self.a, self.batcher
        self.tracker.log(f"training steps {self.hand.step + 1}..{max_steps}: batch {a.batch_size} = {b.n_micro} x "
                         f"{self.r.micro_rows}, buckets {list(b.buckets)}, lr {a.learning_rate:g} ({a.schedule}, "
                         f"{a.warmup_steps} warmup)")
        self.tracker.clock.pause()
        for step in range(self.hand.step + 1, max_steps + 1):
            self.step(step)
            evaluate, save = step % a.eval_interval == 0 and step != max_steps, step % a.save_interval == 0
            if evaluate or save or step == max_steps:
                self.tracker.flush()
            if evaluate:
                self.evaluate()
            if save:
                self.save()
        if self.ckpts.last_saved != self.hand.step:  # the end, or a run of 0 steps: a checkpoint to resume
            self.save()

    def step(self, step: int) -> None:
        """Queue step `step` on the devices, then record the one before it."""
        host = next(self.batcher)
        batch = self.r.batch(host)
        shape = host["input_ids"].shape
        fresh = shape not in self.compiled  # its first run is a warm-up step, not counted in the speed
        compiled = self.compiled.get(shape) or self.compile(shape, batch)
        state, m = compiled(self.hand.state, self.r.params, batch)
        self.hand = InHand(step, state, self.batcher.state())
        n_padded = int(host.get("padded", np.prod(shape)))  # packed: the micro-batches computed
        self.tracker.queue(QueuedStep(step, m, int(host["tokens"]), n_padded,
                                      n_padded * flops_per_token(self.r.config, shape[2]), self.batcher.epoch,
                                      warmup=fresh))
        self.tracker.flush(keep_last=True)

    def compile(self, shape: tuple, batch: dict) -> Any:
        self.tracker.flush()
        t0 = time.perf_counter()
        self.compiled[shape] = self.r.train_step.lower(self.hand.state, self.r.params, batch).compile()
        seconds = time.perf_counter() - t0
        self.compile_seconds += seconds
        self.tracker.log(f"compiled the train step for batches of {shape[0]} x {shape[1]} x {shape[2]} in "
                         f"{seconds:.1f}s")
        self.tracker.clock.pause()  # compiling is not training time
        return self.compiled[shape]

    def evaluate(self) -> None:
        ev = self.evaluator(self.hand.state.lora, full=False)
        self.tracker.rows.write(**ev.row(self.hand.step))
        self.tracker.log(f"step {self.hand.step}: val loss {_fmt(ev.val_loss)}"
                         + (f" | {self.a.sample_instruction!r} -> {ev.sample!r}" if ev.sample is not None else ""))
        self.tracker.clock.pause()  # evaluation time is not training time

    def save(self) -> None:
        self.ckpts.save(self.hand.state, self.hand.step, self.hand.data)
        self.tracker.clock.pause()

    def save_on_interrupt(self) -> None:
        """Ctrl-C: record every trained step, then checkpoint the one in hand, so --resume repeats none."""
        h, log = self.hand, self.tracker.log
        try:
            self.tracker.flush()  # every trained step's row; a step's loss is checked before anything of it is saved
            if h.step in (0, self.ckpts.last_saved):
                return
            self.ckpts.save(h.state, h.step, h.data)
            log(f"Ctrl-C: saved step {h.step} in {self.ckpts.checkpointer.step_dir(h.step)}")
        except KeyboardInterrupt:
            log("Ctrl-C again while saving; the last finished checkpoint stays the latest")
        except Exception as e:  # e.g. the state was being donated to a step when the interrupt came
            log(f"Ctrl-C: could not save step {h.step} ({type(e).__name__}: {e}); --resume starts from the last "
                "finished checkpoint")


def summarize(r: Run, a: TrainArgs, start: Start, steps: StepLoop, baseline: dict, final: Any, exports: Exports,
              lora: Any, total_seconds: float) -> TrainResult:
    """The run's TrainResult: this run's steps and times, the before/after numbers, the files."""
    clock = steps.tracker.clock
    seconds = clock.seconds
    per_s = (lambda n: round(n / seconds, 1) if seconds > 0 else None)
    util = mfu(clock.flops / seconds, next(iter(r.mesh.devices.flat)).device_kind, r.mesh.devices.size) \
        if seconds > 0 else None
    peak_mem = shd.peak_memory_bytes()
    text = (lambda p: str(p) if p else None)
    return TrainResult(
        out_dir=str(a.out_dir), step=steps.hand.step, start_step=start.step, steps_run=steps.hand.step - start.step,
        val_loss_before=baseline.get("val_loss"), val_loss_after=final.val_loss,
        exact_match_before=baseline.get("exact_match"), exact_match_after=final.exact_match,
        samples_before=baseline.get("samples", []), samples_after=final.samples,
        train_seconds=round(seconds, 2), compile_seconds=round(steps.compile_seconds, 2),
        total_seconds=round(total_seconds, 2),
        tokens_per_second=per_s(clock.real_tokens), padded_tokens_per_second=per_s(clock.padded_tokens),
        timed_steps=clock.steps, warmup_steps=clock.warmup_steps, mfu=round(util, 4) if util is not None else None,
        peak_memory_gib=round(peak_mem / 2**30, 2) if peak_mem else None, mesh=repr(dict(r.mesh.shape)),
        lit_lora_path=text(exports.lit_lora_path), adapters_dir=text(exports.adapters_dir),
        peft_dir=text(exports.peft_dir), loss_png=text(exports.loss_png), lora=lora)
