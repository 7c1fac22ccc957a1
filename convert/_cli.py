"""What the converters' command lines share: importing jaxlora from this checkout, jax on the
host, and reporting through `jaxlora.errors.run_command` (the one error -> exit-code map:
bad input 2 with one line naming the problem, Ctrl-C 130, a bug keeps its traceback)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# Conversion runs on the host: keep jax off the accelerators (and their memory preallocation).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from jaxlora.errors import run_command  # noqa: E402  (after the path and platform set-up above)
from jaxlora.weights.quantized import MERGE_INTO  # noqa: E402


def run(prog: str, action: Callable[[], str | None], quiet: bool = False) -> int:
    """Run action() through `run_command`; a returned string is printed as the success message."""
    def report() -> None:
        done = action()
        if done and not quiet:
            print(f"{prog}: {done}", file=sys.stderr)
    return run_command(prog, report, on_interrupt="interrupted; nothing was written")


def rate(stats: dict) -> str:
    """', 1.23 GB/s' when the move took long enough to measure, else ''."""
    return f", {stats['gb_per_s']:.2f} GB/s" if stats.get("gb_per_s") else ""


def note(quiet: bool) -> Callable[[str], None]:
    """A converter's log: one line to stderr (nothing with --quiet)."""
    return (lambda line: None) if quiet else (lambda line: print(line, file=sys.stderr))


def add_merge_into(p: argparse.ArgumentParser) -> None:
    """--merge_into, for the converters that write merged weights."""
    p.add_argument("--merge_into", choices=MERGE_INTO, default="trained",
                   help="adapters trained on a quantized base (train.py --quantize; their config.json says so): "
                   "merge them into the base's kernels quantized and dequantized as in training (trained, the "
                   "default: the model they were trained with) or into its original float weights")
