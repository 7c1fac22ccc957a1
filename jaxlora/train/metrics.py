"""What a run records as it trains: ``metrics.jsonl``, the step clock, and the progress bar.

A step's metrics are read one step late (`StepTracker`): the next step is queued on the device
before the host waits for this one's loss, so the device never waits for the host. A queued
step leaves the tracker only once its row is written, so whatever stops the run (Ctrl-C in
the middle of a read included), `StepTracker.flush` still writes every step that was trained.
"""
from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxlora.errors import NonFiniteLossError
from jaxlora.train.plot import read_metrics

__all__ = ["METRICS_FILE", "MetricsLog", "StepClock", "QueuedStep", "StepTracker", "progress_bar"]

METRICS_FILE = "metrics.jsonl"
LR_BLOCK = 1024  # learning rates evaluated at a time (`StepTracker.learning_rate`)


class MetricsLog:
    """metrics.jsonl: one JSON object per line, flushed as written; the file is created by the
    first row (a run that fails before training leaves none). Only the primary process writes.

    keep_until: a resumed run's checkpoint step; the rows an interrupted run logged after it
    (and error rows) are dropped, so every step appears once."""

    def __init__(self, path: Path, keep_until: int | None = None, enabled: bool = True) -> None:
        self.path, self.enabled, self._f = path, enabled, None
        self._mode = "w"
        if enabled and keep_until is not None and path.exists():
            kept = [json.dumps(row) for row in read_metrics(path)
                    if row.get("step", 0) <= keep_until and row.get("type") != "error"]
            path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
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


class StepClock:
    """Wall time of the training steps alone: a step runs from the end of the previous step, or
    of the last thing the host did that is not training (compiling, evaluating, saving), to
    its own end as seen by the host waiting for its metrics.

    The totals (speed, MFU) leave out warm-up steps, the first run of each newly compiled
    program, which pays one-time costs (autotuning, buffer allocation, CUDA graph capture), as
    bench/train_throughput.py leaves out its warm-up steps."""

    def __init__(self) -> None:
        self.mark = time.perf_counter()
        self.seconds = self.real_tokens = self.padded_tokens = self.flops = 0.0
        self.steps = self.warmup_steps = 0

    def pause(self) -> None:
        self.mark = time.perf_counter()

    def step_done(self, real_tokens: int, padded_tokens: int, flops: float, warmup: bool = False) -> float:
        """Record a step that just ended; its seconds (counted in the totals unless `warmup`)."""
        now = time.perf_counter()
        dt, self.mark = now - self.mark, now
        if warmup:
            self.warmup_steps += 1
            return dt
        self.seconds += dt
        self.real_tokens += real_tokens
        self.padded_tokens += padded_tokens
        self.flops += flops
        self.steps += 1
        return dt


def progress_bar(total: int, initial: int, enabled: bool) -> tqdm | None:
    """A progress bar over the run's steps (None when off or nothing is left to train)."""
    if not enabled or total <= initial:
        return None
    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, mininterval=0.5)


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ctrl-C (SIGINT) inside the block is raised as KeyboardInterrupt when the block ends: what
    the block does stays all done or not done. Outside the main thread (no signals there) a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


@dataclass
class QueuedStep:
    """A step queued on the device whose metrics the host has not read yet."""

    step: int
    metrics: dict[str, jax.Array]
    tokens: int  # real (non-padding) tokens
    padded_tokens: int
    flops: float
    epoch: int
    warmup: bool = False  # the first run of a newly compiled program: not counted in the speed


class StepTracker:
    """Reads queued steps' metrics, checks them, writes their rows and moves the progress bar."""

    def __init__(self, log_rows: MetricsLog, schedule: optax.Schedule, log: Callable[[str], None],
                 last_good: Callable[[], str], bar: tqdm | None = None) -> None:
        self.rows, self.schedule, self.last_good, self.bar = log_rows, schedule, last_good, bar
        self._log = log
        self.queued: list[QueuedStep] = []
        self.rate: float | None = None  # smoothed tokens/s for the bar
        self._lrs, self._lr_start = np.zeros(0), 0
        self.learning_rate(0)  # its first evaluation compiles: before any step is timed
        self.clock = StepClock()

    def log(self, msg: str) -> None:
        """A line that does not break the progress bar."""
        if self.bar is not None:
            self.bar.write(msg)
        else:
            self._log(msg)

    def learning_rate(self, index: int) -> float:
        """The schedule's value at optimizer update `index` (0-based), from a host table filled
        LR_BLOCK updates at a time: evaluating it on the device at every step would wait there
        behind the step queued after this one, and the device would then idle while the host
        prepares the next."""
        if not self._lr_start <= index < self._lr_start + len(self._lrs):
            self._lr_start = index - index % LR_BLOCK
            indices = np.arange(self._lr_start, self._lr_start + LR_BLOCK)
            self._lrs = np.broadcast_to(np.asarray(jax.device_get(self.schedule(indices))), indices.shape)
        return float(self._lrs[index - self._lr_start])

    def queue(self, step: QueuedStep) -> None:
        self.queued.append(step)

    def flush(self, keep_last: bool = False) -> None:
        """Read and record the queued steps (all but the newest with keep_last), oldest first."""
        while len(self.queued) > (1 if keep_last else 0):
            self._record(self.queued[0])

    def _record(self, q: QueuedStep) -> None:
        """Read q's metrics, check them, write its row and take it off the queue. Ctrl-C while
        reading leaves it queued (the interrupt's flush records it); the row and the dequeuing
        happen together, so no step is written twice or lost."""
        m = jax.device_get(q.metrics)
        dt = self.clock.step_done(q.tokens, q.padded_tokens, q.flops, q.warmup)
        loss, gnorm, lr = float(m["loss"]), float(m["grad_norm"]), self.learning_rate(q.step - 1)
        if not (math.isfinite(loss) and math.isfinite(gnorm)):
            self.queued.clear()  # nothing after a diverged step is worth recording
            self.rows.write(type="error", step=q.step, loss=loss, grad_norm=gnorm)
            raise NonFiniteLossError(
                f"non-finite loss at step {q.step} (loss {loss}, grad norm {gnorm}, lr {lr:.3g}); the run stopped "
                f"and nothing from this step was saved. Last good checkpoint: {self.last_good()}. Try a lower "
                "--learning_rate or --grad_clip 1.0, then --resume.")
        if int(m["tokens"]) == 0:
            self.log(f"warning: step {q.step} had no loss tokens (every target masked or cut); it changed nothing")
        if not q.warmup:
            self.rate = q.tokens / dt if self.rate is None else 0.8 * self.rate + 0.2 * q.tokens / dt
        with interrupts_deferred():
            self.rows.write(type="train", step=q.step, loss=loss, lr=lr, grad_norm=gnorm, loss_tokens=int(m["tokens"]),
                            tokens=q.tokens, padded_tokens=q.padded_tokens, seconds=round(dt, 4),
                            tokens_per_s=round(q.tokens / dt, 1), epoch=q.epoch, **({"warmup": True} if q.warmup else {}))
            self.queued.pop(0)  # q, the oldest (flush records in order)
        if self.bar is not None:
            rate = f"  {self.rate:,.0f} tok/s" if self.rate is not None else ""
            self.bar.set_postfix_str(f"loss {loss:.4f}  lr {lr:.2e}{rate}", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
