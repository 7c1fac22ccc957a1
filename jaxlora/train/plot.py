"""Loss curve of a training run (reads metrics.jsonl, writes a PNG). matplotlib is optional."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The JSON lines of a metrics file (unparseable lines, e.g. a half-written last line, skipped)."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_loss(metrics_path: str | os.PathLike, png_path: str | os.PathLike, title: str | None = None) -> Path | None:
    """Plot training loss per step (raw and smoothed) and validation loss; returns the PNG path.

    Returns None without writing anything when matplotlib is not installed
    (``pip install 'jaxlora[plot]'``) or when there is nothing to plot.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if r.get("type") == "train"]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("type") == "eval" and r.get("val_loss") is not None]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="train loss")
        smooth, ema = [], None
        for x in losses:
            ema = x if ema is None else 0.9 * ema + 0.1 * x
            smooth.append(ema)
        ax.plot(steps, smooth, color="tab:blue", linewidth=1.6, label="train loss (EMA 0.9)")
    if val:
        steps, losses = zip(*val)
        ax.plot(steps, losses, "o-", color="tab:orange", linewidth=1.6, label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title or "LoRA fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    tmp = png_path.with_name(png_path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path
