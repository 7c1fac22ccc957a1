"""What the HF/PEFT converters' command lines share: importing jaxlora from this checkout,
jax on the host, and one way to report bad input (exit code 2, as train.py)."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# Conversion runs on the host: keep jax off the accelerators (and their memory preallocation).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
USER_ERROR = 2


def run(prog: str, action: Callable[[], str | None], quiet: bool = False) -> int:
    """Run action(); bad input (ValueError, OSError: files, keys, shapes, settings) -> message, exit 2.
    A returned string is printed as the success message."""
    try:
        done = action()
    except (ValueError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return USER_ERROR
    if done and not quiet:
        print(f"{prog}: {done}", file=sys.stderr)
    return 0
