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
compiling (timed and reported on its own) never falls inside it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.config import ADAPTERS_DIR, LIT_LORA_FILE, PEFT_DIR, LLaMAConfig, LoRAConfig
from jaxlora.errors import CheckpointError, DataError, InputsError, NonFiniteLossError, TrainingError
from jaxlora.infer.decode import greedy_generate
from jaxlora.parallel import distributed
from jaxlora.parallel import sharding as shd
from jaxlora.text.prompts import generate_prompt
from jaxlora.text.tokenizer import Tokenizer
from jaxlora.train.accounting import estimate_device_bytes, flops_per_token, peak_flops
from jaxlora.train.build import Run, build_run
from jaxlora.train.checkpoints import Checkpointer
from jaxlora.train.data import (
    Batcher,
    LazySamples,
    LocalRows,
    count_truncated,
    eval_batches,
    load_prepared,
    load_records,
    prepare_records,
    prepare_sample,
    split_records,
)
from jaxlora.train.settings import (
    DEMO_PROFILE,
    LIT_LLAMA_RECIPE,
    LIT_PRESETS,
    PRECISIONS,
    RESUME_KEYS,
    TrainArgs,
    json_args,
    profile_for,
    resolve_args,
)
from jaxlora.train.steps import TrainState
from jaxlora.weights.load import RANDOM_BASE

__all__ = ["TrainArgs", "TrainResult", "NonFiniteLossError", "TrainingError", "InputsError", "DEMO_PROFILE",
           "LIT_LLAMA_RECIPE", "LIT_PRESETS", "PRECISIONS", "profile_for", "resolve_args", "run", "check_inputs"]



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
    compile_seconds: float = 0.0
    total_seconds: float = 0.0
    tokens_per_second: float | None = None  # real (non-padding) tokens over the steps' wall time
    padded_tokens_per_second: float | None = None  # what the devices computed, padding included
    mfu: float | None = None
    peak_memory_gib: float | None = None  # the largest of any local device
    mesh: str | None = None
    lit_lora_path: str | None = None
    adapters_dir: str | None = None
    peft_dir: str | None = None
    loss_png: str | None = None
    lora: Any = None

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("lora")
        return d


# ----------------------------------------------------------------------------- inputs

_HOW_TO_GET = {
    "tokenizer_path": "lit-llama's tokenizer: python scripts/download.py --repo_id openlm-research/open_llama_7b "
                      "(in lit-llama) puts it at checkpoints/lit-llama/tokenizer.model",
    "data_path": "the Alpaca JSON (alpaca_data_cleaned.json from the alpaca-lora repository), or lit-llama's "
                 "prepared data: the directory holding train.pt and test.pt (scripts/prepare_alpaca.py)",
    "pretrained_path": "lit-llama's checkpoint (scripts/convert_checkpoint.py in lit-llama writes "
                       "checkpoints/lit-llama/7B/lit-llama.pth), a jaxlora directory from "
                       "convert/from_lit_llama.py, a Hugging Face LLaMA directory (config.json + safetensors), "
                       "or 'none' for random weights",
}


def check_inputs(a: TrainArgs) -> None:
    """Every missing input at once, each with how to get it (before anything is loaded or written)."""
    missing = []
    for name in ("tokenizer_path", "data_path", "pretrained_path"):
        value = getattr(a, name)
        if name == "pretrained_path" and (value is None or str(value).lower() in RANDOM_BASE):
            continue
        if not Path(value).exists():
            missing.append(f"  --{name} {value}: not found. Get it: {_HOW_TO_GET[name]}")
    if missing:
        raise InputsError(f"{len(missing)} input(s) missing:\n" + "\n".join(missing))


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
        _report_truncation(train + val, a.max_seq_length, log)
        return train, val
    records = load_records(path)
    val_size = a.val_size
    n = len(records)
    if isinstance(val_size, int) and val_size >= n:
        capped = max(1, n // 10) if n > 1 else 0
        log(f"data: val_size {val_size} >= {n} records; using {capped}")
        val_size = capped
    train_recs, val_recs = split_records(records, val_size, seed=42) if val_size else (list(records), [])
    if not train_recs:
        raise DataError(f"{path}: no training records left after taking {len(val_recs)} for validation")
    val = prepare_records(val_recs, tokenizer, a.max_seq_length, a.mask_inputs)
    log(f"data: {path}: {n} records -> {len(train_recs)} train / {len(val)} validation (split seed 42)")
    if jax.process_count() == 1:
        train = prepare_records(train_recs, tokenizer, a.max_seq_length, a.mask_inputs)
        _report_truncation(train + val, a.max_seq_length, log)
        return train, val
    # Several processes: each tokenizes only the samples its batch rows hold (as they come), and
    # a 1/P share of the records now, for the counts at start.
    train = LazySamples(train_recs, lambda r: prepare_sample(r, tokenizer, a.max_seq_length, a.mask_inputs))
    log(f"data: {jax.process_count()} processes: each tokenizes the training samples its own batch rows hold")
    share = [train[i] for i in range(jax.process_index(), len(train), jax.process_count())]
    cut = distributed.sum_over_processes(count_truncated(share, a.max_seq_length))
    empty = distributed.sum_over_processes(_no_loss_tokens(share, a.max_seq_length))
    _report_counts(cut + count_truncated(val, a.max_seq_length), empty + _no_loss_tokens(val, a.max_seq_length),
                   len(train) + len(val), a.max_seq_length, log)
    return train, val


def _report_truncation(samples: Sequence[dict], max_seq_length: int, log: Callable[[str], None]) -> None:
    """Say how many samples are cut at max_seq_length and how many keep no loss token at all."""
    _report_counts(count_truncated(samples, max_seq_length), _no_loss_tokens(samples, max_seq_length),
                   len(samples), max_seq_length, log)


def _no_loss_tokens(samples: Sequence[dict], max_seq_length: int) -> int:
    return sum(not np.any(np.asarray(s["labels"][:max_seq_length]) != -1) for s in samples)


def _report_counts(long: int, empty: int, total: int, max_seq_length: int, log: Callable[[str], None]) -> None:
    if long:
        log(f"data: {long} of {total} samples are longer than --max_seq_length {max_seq_length} and are "
            "cut (lit-llama does the same; raise --max_seq_length to keep them whole)")
    if empty:
        log(f"warning: {empty} samples have no response token left to learn from (the prompt fills "
            f"--max_seq_length {max_seq_length}); they add nothing to the loss")


# ----------------------------------------------------------------------------- the run

class _Metrics:
    """metrics.jsonl: one JSON object per line, flushed as written; the file is created by the
    first row (a run that fails before training leaves none). Only the primary process writes."""

    def __init__(self, path: Path, keep_until: int | None, enabled: bool = True) -> None:
        self.path, self.enabled, self._f = path, enabled, None
        self._mode = "w"
        if enabled and keep_until is not None and path.exists():
            # resuming: drop what the interrupted run logged after the checkpoint
            kept = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if row.get("step", 0) <= keep_until and row.get("type") != "error":
                    kept.append(line)
            path.write_text("".join(k + "\n" for k in kept))
            self._mode = "a"

    def write(self, **row: Any) -> None:
        if not self.enabled:
            return
        if self._f is None:
            self._f = open(self.path, self._mode, encoding="utf-8")
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class _StepClock:
    """Wall time of the training steps alone: a step runs from the end of the previous step, or
    of the last thing the host did that is not training (compiling, evaluating, saving), to
    its own end as seen by the host waiting for its metrics."""

    def __init__(self) -> None:
        self.mark = time.perf_counter()
        self.seconds = self.real_tokens = self.padded_tokens = self.flops = 0.0

    def pause(self) -> None:
        self.mark = time.perf_counter()

    def step_done(self, real_tokens: int, padded_tokens: int, flops: float) -> float:
        now = time.perf_counter()
        dt, self.mark = now - self.mark, now
        self.seconds += dt
        self.real_tokens += real_tokens
        self.padded_tokens += padded_tokens
        self.flops += flops
        return dt


def _finite_tree(tree: Any) -> bool:
    return all(bool(np.isfinite(np.asarray(x)).all()) for x in jax.tree.leaves(distributed.to_host(tree)))


def _peak_memory_gib() -> float | None:
    peak = shd.peak_memory_bytes()
    return round(peak / 2**30, 2) if peak else None


def _check_memory(r: Run, a: TrainArgs, log: Callable[[str], None]) -> None:
    """Say where the run goes and what it needs; refuse when the weights alone cannot fit."""
    from jaxlora.parallel.sharding import device_memory_bytes, host_memory_bytes
    from jaxlora.train.accounting import weight_bytes
    devices = r.mesh.devices.flat
    kind = next(iter(devices)).device_kind
    need = estimate_device_bytes(r.config, r.lora_config, a.precision, r.mesh, r.micro_rows, a.max_seq_length,
                                 a.remat)
    weights = weight_bytes(r.config, a.precision) / (r.mesh.shape["fsdp"] * r.mesh.shape["tensor"])
    have = device_memory_bytes(jax.local_devices()[0])
    if have is None:  # CPU devices share the host's memory
        n = len(jax.local_devices())
        need, weights, have = need * n, weights * n, host_memory_bytes()
        where = f"host memory ({n} CPU device(s))"
    else:
        where = f"memory of one {kind}"
    log(f"memory: ~{need / 2**30:.1f} GiB needed of {have / 2**30:.1f} GiB {where} (frozen weights "
        f"{weights / 2**30:.1f} GiB)" if have else f"memory: ~{need / 2**30:.1f} GiB needed")
    if have and weights > have:
        raise TrainingError(f"the frozen weights alone need {weights / 2**30:.1f} GiB of {where}, which has "
                            f"{have / 2**30:.1f} GiB: use more devices (--mesh with fsdp/tensor), a lower "
                            "--precision storage (bf16-true), or a smaller --preset")
    if have and need > have:
        log(f"warning: the estimate ({need / 2**30:.1f} GiB) exceeds {where} ({have / 2**30:.1f} GiB); the run "
            "may run out of memory: lower --micro_batch_size, use --remat full, or shard over more devices")


def run(args: TrainArgs) -> TrainResult:
    """Train adapters as `args` says; see the module docstring. Returns the before/after numbers."""
    t_start = time.time()
    a = resolve_args(args)
    primary = distributed.is_primary()
    log = (lambda msg: print(msg, flush=True)) if a.verbose and primary else (lambda msg: None)
    out = Path(a.out_dir)
    check_inputs(a)

    tokenizer = Tokenizer(a.tokenizer_path)
    train_samples, val_samples = load_data(a, tokenizer, log)
    max_steps = a.max_steps if a.max_steps is not None else math.ceil(a.epochs * len(train_samples) / a.batch_size)
    r = build_run(a, None, max_steps=max_steps, log=log)
    config, lora_config, model, params = r.config, r.lora_config, r.model, r.params
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer {a.tokenizer_path} has {tokenizer.vocab_size} pieces but the model "
                         f"({r.base_desc}) has vocab_size {config.vocab_size}")
    _check_memory(r, a, log)
    log(f"model: {r.base_desc}: {config.num_params():,} frozen parameters ({a.precision}), "
        f"{lora_config.num_params(config):,} trainable (LoRA r={a.lora_r}, alpha={a.lora_alpha:g}, "
        f"targets {','.join(lora_config.targets)})")

    state = r.state
    local = None
    if jax.process_count() > 1:  # each process fills (and tokenizes) only the rows its devices hold
        fill, count = shd.local_rows(r.shardings.batch, a.batch_size // r.micro_rows, r.micro_rows)
        local = LocalRows(fill, count, distributed.agree_on_batch)
    batcher = Batcher(train_samples, a.batch_size, r.micro_rows, a.max_seq_length, seed=a.seed, local=local)
    buckets = batcher.buckets
    out.mkdir(parents=True, exist_ok=True)  # only now that every input has been read
    checkpointer = Checkpointer(out / "checkpoints", max_to_keep=a.keep_checkpoints)
    start_step, baseline = 0, None
    latest = checkpointer.latest_step()
    if latest is not None and not a.resume:
        raise TrainingError(f"{checkpointer.directory} already holds checkpoints (latest: step {latest}); "
                            "pass --resume to continue that run, or choose another --out_dir")
    if a.resume and latest is not None:
        meta = checkpointer.restore_meta(latest)
        saved = meta.get("args", {})
        keys = RESUME_KEYS + (("max_steps", "epochs") if a.schedule != "constant" else ())
        for key in keys:
            mine = json_args(a)[key]
            if key in saved and saved[key] != mine:
                raise CheckpointError(f"{checkpointer.step_dir(latest)}: saved with {key}={saved[key]!r}, this run "
                                      f"has {key}={mine!r}; resume with the same settings")
        if LLaMAConfig.from_dict(meta.get("model") or {}) != config:  # (older checkpoints lack newer fields)
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

    val_eval = val_samples[:a.eval_iters * r.micro_rows]
    em_samples = val_samples[:a.exact_match_samples] if a.exact_match_samples else []
    shown = _diverse(em_samples if em_samples else val_samples, a.num_samples)
    sample_prompt = generate_prompt({"instruction": a.sample_instruction, "input": ""})
    sample_ids = tokenizer.encode(sample_prompt, bos=True, eos=False)[-(config.block_size - a.max_new_tokens):]

    def val_loss(lora: Any) -> float | None:
        if not val_eval:
            return None
        total, count = jnp.zeros(()), jnp.zeros((), jnp.int32)
        for b in eval_batches(val_eval, r.micro_rows, a.max_seq_length, buckets):
            s, c = r.eval_step(lora, params, r.eval_batch({k: v[0] for k, v in b.items()}))
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

    metrics = _Metrics(out / "metrics.jsonl", keep_until=start_step if start_step else None, enabled=primary)
    if baseline is None:
        t0 = time.time()
        vl = val_loss(state.lora)
        em, samples = task_eval(state.lora)
        baseline = {"val_loss": vl, "exact_match": em, "samples": samples}
        metrics.write(type="eval", step=0, val_loss=vl, exact_match=em, sample=fixed_sample(state.lora))
        log(f"before training: val loss {_fmt(vl)}" + (f", exact match {em:.1%} on {len(em_samples)} held-out "
                                                        f"prompts" if em is not None else "")
            + f" ({time.time() - t0:.1f}s)")

    meta_base = {"args": json_args(a), "model": config.to_dict(), "lora": lora_config.to_dict(),
                 "baseline": baseline}

    def save(state: TrainState, step: int, data: dict) -> None:
        if not _finite_tree(state.lora):
            raise NonFiniteLossError(f"adapters became non-finite at step {step}; not saved. Last good checkpoint: "
                                     f"{_last(checkpointer)}")
        checkpointer.save(state, {**meta_base, "data": data, "step": step})

    peak = peak_flops(next(iter(r.mesh.devices.flat)).device_kind)
    clock = _StepClock()
    compiled: dict[tuple, Any] = {}
    compile_seconds = 0.0
    bar = None
    step = start_step
    last_saved = start_step if start_step else None
    rate = None
    # A step's metrics are read only after the next step is queued, so the device never waits
    # for the host (dispatching a step costs milliseconds of host time); they are read at once
    # before anything that must see a finished step (compiling, eval, save, the end).
    pending = None  # (step, metrics on the device, real tokens, padded tokens, flops, epoch)

    def finish(step: int, m: dict, n_tokens: int, n_padded: int, flops: float, epoch: int) -> None:
        nonlocal rate
        m = jax.device_get(m)
        dt = clock.step_done(n_tokens, n_padded, flops)
        loss, gnorm = float(m["loss"]), float(m["grad_norm"])
        lr = float(r.schedule(step - 1))
        if not (math.isfinite(loss) and math.isfinite(gnorm)):
            metrics.write(type="error", step=step, loss=loss, grad_norm=gnorm)
            raise NonFiniteLossError(
                f"non-finite loss at step {step} (loss {loss}, grad norm {gnorm}, lr {lr:.3g}); the run stopped "
                f"and nothing from this step was saved. Last good checkpoint: {_last(checkpointer)}. Try a lower "
                "--learning_rate or --grad_clip 1.0, then --resume.")
        if int(m["tokens"]) == 0:
            log(f"warning: step {step} had no loss tokens (every target masked or cut); it changed nothing")
        rate = n_tokens / dt if rate is None else 0.8 * rate + 0.2 * n_tokens / dt
        metrics.write(type="train", step=step, loss=loss, lr=lr, grad_norm=gnorm, loss_tokens=int(m["tokens"]),
                      tokens=n_tokens, padded_tokens=n_padded, seconds=round(dt, 4),
                      tokens_per_s=round(n_tokens / dt, 1), epoch=epoch)
        if bar is not None:
            bar.set_postfix_str(f"loss {loss:.4f}  lr {lr:.2e}  {rate:,.0f} tok/s", refresh=False)
            bar.update(1)

    def flush() -> None:
        nonlocal pending
        if pending is not None:
            p, pending = pending, None
            finish(*p)

    in_hand = (start_step, batcher.state())  # the step of `state`, and the data position after it
    try:
        if a.progress and primary and max_steps > start_step:
            from tqdm.auto import tqdm
            bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                       mininterval=0.5)
        log(f"training steps {start_step + 1}..{max_steps}: batch {a.batch_size} = {batcher.n_micro} x "
            f"{r.micro_rows}, buckets {list(buckets)}, lr {a.learning_rate:g} ({a.schedule}, "
            f"{a.warmup_steps} warmup)")
        clock.pause()
        for step in range(start_step + 1, max_steps + 1):
            host = next(batcher)
            batch = r.batch(host)
            shape = host["input_ids"].shape
            if shape not in compiled:
                flush()
                t0 = time.perf_counter()
                compiled[shape] = r.train_step.lower(state, params, batch).compile()
                compile_seconds += time.perf_counter() - t0
                log_fn = bar.write if bar is not None else log
                log_fn(f"compiled the train step for batches of {shape[0]} x {shape[1]} x {shape[2]} in "
                       f"{time.perf_counter() - t0:.1f}s")
                clock.pause()
            state, m = compiled[shape](state, params, batch)
            in_hand = (step, batcher.state())
            n_tokens = int(host["tokens"])
            n_padded = int(np.prod(shape))
            flush()
            pending = (step, m, n_tokens, n_padded, n_padded * flops_per_token(config, shape[2]), batcher.epoch)
            evaluate, checkpoint = step % a.eval_interval == 0 and step != max_steps, step % a.save_interval == 0
            if evaluate or checkpoint or step == max_steps:
                flush()
            if evaluate:
                vl = val_loss(state.lora)
                sample = fixed_sample(state.lora)
                metrics.write(type="eval", step=step, val_loss=vl, sample=sample)
                msg = f"step {step}: val loss {_fmt(vl)}" + (f" | {a.sample_instruction!r} -> {sample!r}"
                                                              if sample is not None else "")
                bar.write(msg) if bar is not None else log(msg)
                clock.pause()  # evaluation time is not training time
            if checkpoint:
                save(state, step, in_hand[1])
                last_saved = step
                clock.pause()
        if bar is not None:
            bar.close()
            bar = None
        if last_saved != step or (max_steps == 0 and checkpointer.latest_step() is None):
            save(state, step, in_hand[1])
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
            bar = None
        _save_on_interrupt(state, in_hand, last_saved, flush, save, log)
        metrics.close()
        checkpointer.close()
        raise
    except BaseException:
        if bar is not None:
            bar.close()
        metrics.close()
        checkpointer.close()
        raise
    train_seconds = clock.seconds

    # ---- after training
    vl = val_loss(state.lora)
    em, samples = task_eval(state.lora)
    sample = fixed_sample(state.lora)
    metrics.write(type="eval", step=step, val_loss=vl, exact_match=em, sample=sample)
    metrics.close()
    checkpointer.close()

    lora_host = distributed.to_host(state.lora)
    adapters_dir = lit_path = peft_dir = png = None
    if primary:
        from jaxlora.weights.jaxlora_dir import save_checkpoint
        adapters_dir = save_checkpoint(out / ADAPTERS_DIR, config, lora_config, None, lora_host, overwrite=True,
                                       base=str(a.pretrained_path))
        if a.export_lit:
            lit_path = _export_lit(lora_host, config, lora_config, out / LIT_LORA_FILE, log)
        peft_dir = _export_peft(lora_host, config, lora_config, out / PEFT_DIR, a.pretrained_path, log)
        if a.plot:
            from jaxlora.train.plot import plot_loss
            png = plot_loss(out / "metrics.jsonl", out / "loss.png", title=f"LoRA fine-tuning of "
                            f"{Path(str(a.pretrained_path)).name}, r={a.lora_r} on {','.join(lora_config.targets)}")
            if png is None:
                log("loss.png not written (matplotlib not installed: pip install 'jaxlora[plot]')")

    per_s = (lambda n: round(n / train_seconds, 1) if train_seconds > 0 else None)
    n_devices = r.mesh.devices.size
    result = TrainResult(
        out_dir=str(out), step=step, val_loss_before=baseline.get("val_loss"), val_loss_after=vl,
        exact_match_before=baseline.get("exact_match"), exact_match_after=em,
        samples_before=baseline.get("samples", []), samples_after=samples,
        train_seconds=round(train_seconds, 2), compile_seconds=round(compile_seconds, 2),
        total_seconds=round(time.time() - t_start, 2),
        tokens_per_second=per_s(clock.real_tokens), padded_tokens_per_second=per_s(clock.padded_tokens),
        mfu=(round(clock.flops / train_seconds / (peak * n_devices), 4) if peak and train_seconds > 0 else None),
        peak_memory_gib=_peak_memory_gib(), mesh=dict(r.mesh.shape).__repr__(),
        lit_lora_path=str(lit_path) if lit_path else None, adapters_dir=str(adapters_dir) if adapters_dir else None,
        peft_dir=str(peft_dir) if peft_dir else None,
        loss_png=str(png) if png else None, lora=lora_host)
    if primary:
        (out / "summary.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
    if a.verbose and primary:
        print(report(result))
    return result


def _save_on_interrupt(state: TrainState, in_hand: tuple[int, dict], last_saved: int | None,
                       flush: Callable[[], None], save: Callable[[TrainState, int, dict], None],
                       log: Callable[[str], None]) -> None:
    """Ctrl-C: finish the step in flight and checkpoint it, so --resume repeats no step."""
    step, data = in_hand
    if step == 0 or step == last_saved:
        return
    try:
        flush()  # its loss is checked before anything is saved
        save(state, step, data)
        log(f"interrupted: saved step {step}; continue with --resume")
    except KeyboardInterrupt:
        log("interrupted again while saving; the last finished checkpoint stays the latest")
    except Exception as e:  # e.g. the state was being donated to a step when the interrupt came
        log(f"interrupted: could not save step {step} ({type(e).__name__}: {e}); --resume starts from the last "
            "finished checkpoint")


def _export_lit(lora: Any, config: LLaMAConfig, lora_config: LoRAConfig, path: Path,
                log: Callable[[str], None]) -> Path | None:
    try:
        from jaxlora.weights.lit_files import save_lit_lora
        save_lit_lora(lora, config, lora_config, path)
    except ImportError:
        log(f"{path.name} not written: writing PyTorch files needs torch (pip install torch, or on a machine "
            "without a GPU: pip install torch --index-url https://download.pytorch.org/whl/cpu)")
        return None
    except ValueError as e:  # e.g. adapters on o/gate/up/down, which lit-llama's format cannot hold
        log(f"{path.name} not written: {e}")
        return None
    return path


def _export_peft(lora: Any, config: LLaMAConfig, lora_config: LoRAConfig, path: Path, base: str | None,
                 log: Callable[[str], None]) -> Path | None:
    """The adapters as a PEFT folder; base_model_name_or_path names the base when it is a local path."""
    try:
        from jaxlora.weights.hf_files import peft_base_name, save_peft_adapters
        name = peft_base_name(base)
        return save_peft_adapters(lora, config, lora_config, path, base_model_name_or_path=name)
    except ImportError:
        log(f"{path.name}/ not written: PEFT's format needs safetensors (pip install safetensors)")
    except ValueError as e:
        log(f"{path.name}/ not written: {e}")
    return None


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
    lines = ["", f"=== LoRA fine-tuning: {r.step} steps, {r.total_seconds:.0f}s in all ==="]
    if r.tokens_per_second:
        lines.append(f"speed             {r.tokens_per_second:,.0f} tokens/s ({r.padded_tokens_per_second:,.0f} with "
                     f"padding) over {r.train_seconds:.1f}s of steps" + (f", MFU {r.mfu:.1%}" if r.mfu else "")
                     + (f", peak {r.peak_memory_gib} GiB per device" if r.peak_memory_gib else "")
                     + f"; compiling {r.compile_seconds:.1f}s")
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
                 + (", loss.png" if r.loss_png else "") + (f", {LIT_LORA_FILE}" if r.lit_lora_path else "")
                 + (f", {PEFT_DIR}/" if r.peft_dir else ""))
    if r.adapters_dir and not r.lit_lora_path:
        lines.append(f"merged lit-llama checkpoint: python convert/to_lit_llama.py --checkpoint_dir BASE "
                     f"--adapters {r.adapters_dir} --merged --out merged.pth  (BASE: the base's lit-llama .pth "
                     "or jaxlora checkpoint directory)")
    return "\n".join(lines)
