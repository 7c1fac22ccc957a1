"""What a run reports: `TrainResult` (returned by `jaxlora.train.loop.run`, and written to
``summary.json``) and the summary printed at the end. Counts and times are those of this
run: a resumed run says how many steps it trained itself, and from which step it went on."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jaxlora.config import ADAPTERS_DIR, LIT_LORA_FILE, PEFT_DIR
from jaxlora.train.checkpoints import CHECKPOINTS_DIR
from jaxlora.train.exports import LOSS_PNG, SUMMARY_FILE
from jaxlora.train.metrics import METRICS_FILE

__all__ = ["TrainResult", "report", "write_summary"]


@dataclass
class TrainResult:
    """What a run reports (also written to ``{out_dir}/summary.json``, without `lora`)."""

    out_dir: str
    step: int  # the last step: the run's length, whether it started at 0 or resumed
    val_loss_before: float | None
    val_loss_after: float | None
    exact_match_before: float | None
    exact_match_after: float | None
    samples_before: list[dict[str, str]] = field(default_factory=list)
    samples_after: list[dict[str, str]] = field(default_factory=list)
    start_step: int = 0  # the checkpoint this run resumed from (0: a new run)
    steps_run: int = 0  # steps trained by this run: step - start_step
    train_seconds: float = 0.0
    compile_seconds: float = 0.0
    total_seconds: float = 0.0  # this run's wall time, loading included
    tokens_per_second: float | None = None  # real (non-padding) tokens over the timed steps' wall time
    padded_tokens_per_second: float | None = None  # what the devices computed, padding included
    timed_steps: int = 0  # the steps the speed counts
    warmup_steps: int = 0  # first runs of newly compiled programs, left out of the speed
    mfu: float | None = None  # FLOPs of the padded tokens (accounting.flops_per_token) over the devices' peak
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


def write_summary(result: TrainResult) -> Path:
    """summary.json in the run's out_dir, staged and renamed."""
    path = Path(result.out_dir) / SUMMARY_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _header(r: TrainResult) -> str:
    steps = f"{r.steps_run} step{'s' if r.steps_run != 1 else ''}"
    if r.start_step:
        steps += f" (steps {r.start_step + 1}..{r.step}, resumed from step {r.start_step})"
    return f"=== LoRA fine-tuning: {steps}, {r.total_seconds:.0f}s ==="


def _speed(r: TrainResult) -> str:
    warm = (f"the first step after each of {r.warmup_steps} compilation{'s' if r.warmup_steps != 1 else ''} not "
            "counted")
    if r.tokens_per_second is None:
        return f"not measured: every step was the first after a compilation ({warm})"
    return (f"{r.tokens_per_second:,.0f} real tokens/s, {r.padded_tokens_per_second:,.0f} with padding"
            + (f", MFU {r.mfu:.1%}" if r.mfu is not None else "") + f" over {r.timed_steps} step"
            + ("s" if r.timed_steps != 1 else "") + f" ({r.train_seconds:.1f}s; {warm})")


SHOWN_CHARS = 200  # of a sample's prompt, response or expected text in the printed summary (summary.json: all)


def _clipped(text: str) -> str:
    """`text` as repr, its middle left out past SHOWN_CHARS (a 2,000-character prompt would bury the report)."""
    if len(text) <= SHOWN_CHARS:
        return repr(text)
    half = SHOWN_CHARS // 2
    return f"{text[:half]!r} ... [{len(text) - 2 * half:,} characters] ... {text[-half:]!r}"


def report(r: TrainResult) -> str:
    """The human-readable summary printed at the end of a run."""
    lines = ["", _header(r)]
    if r.tokens_per_second is not None or r.warmup_steps:
        lines.append(f"speed             {_speed(r)}" + (f"; peak {r.peak_memory_gib} GiB per device"
                                                         if r.peak_memory_gib else "")
                     + f"; compiling {r.compile_seconds:.1f}s")
    lines.append(f"validation loss   before {_fmt(r.val_loss_before)}   after {_fmt(r.val_loss_after)}")
    if r.exact_match_before is not None and r.exact_match_after is not None:
        lines.append(f"exact match       before {r.exact_match_before:.1%}   after {r.exact_match_after:.1%}")
    for title, samples in (("before", r.samples_before), ("after", r.samples_after)):
        if samples:
            lines.append(f"samples {title} fine-tuning:")
            for s in samples:
                prompt = s["instruction"] + (f" [{s['input']}]" if s.get("input") else "")
                lines.append(f"  {_clipped(prompt)} -> {_clipped(s['response'])}   (expected {_clipped(s['expected'])})")
    lines.append(f"outputs in {r.out_dir}: {ADAPTERS_DIR}/, {CHECKPOINTS_DIR}/, {METRICS_FILE}, {SUMMARY_FILE}"
                 + (f", {LOSS_PNG}" if r.loss_png else "") + (f", {LIT_LORA_FILE}" if r.lit_lora_path else "")
                 + (f", {PEFT_DIR}/" if r.peft_dir else ""))
    if r.adapters_dir and not r.lit_lora_path:
        lines.append(f"merged lit-llama checkpoint: python convert/to_lit_llama.py --checkpoint_dir BASE "
                     f"--adapters {r.adapters_dir} --merged --out merged.pth  (BASE: the base's lit-llama .pth "
                     "or jaxlora checkpoint directory)")
    return "\n".join(lines)
