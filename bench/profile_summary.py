"""Where a jitted step's device time goes: per-kernel totals from a `jax.profiler` trace.

Reads the newest `*.xplane.pb` under a trace directory (what `jax.profiler.trace(dir)` wrote),
sums the duration of every device event (GPU kernels; on CPU, XLA thunks) by HLO op and by
kind (matmul, attention, other fusions, copies/collectives), and divides by the number of
profiled steps.

  python bench/profile_summary.py TRACE_DIR [--steps 3] [--top 30]

The categories come from kernel names (cuBLAS/CUTLASS/Triton GEMMs, cuDNN attention), so
they are a reading aid, not an exact taxonomy; the per-op table is exact.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
from dataclasses import dataclass, field
from typing import Iterator

# Kernel-name patterns, checked in order (first match wins).
KINDS = (
    ("attention", re.compile(r"cudnn|fmha|flash|sdpa|attention", re.I)),
    ("matmul", re.compile(r"gemm|xmma|cutlass|nvjet|gemv|cublas|matmul|dot|wgmma|ynn_fusion", re.I)),
    ("copy/transfer", re.compile(r"memcpy|memset|copy|transpose|nccl|all-?reduce", re.I)),
)


@dataclass
class OpTotal:
    ns: float = 0.0
    count: int = 0
    kernels: set = field(default_factory=set)


def kind_of(kernel_name: str, hlo_op: str) -> str:
    for kind, pattern in KINDS:
        if pattern.search(kernel_name) or pattern.search(hlo_op):
            return kind
    return "other fusions"


def newest_trace(trace_dir: str) -> str:
    files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not files:
        raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}")
    return max(files, key=os.path.getmtime)


def device_events(path: str) -> Iterator[tuple[str, str, float, float]]:
    """(kernel name, hlo op, start ns, duration ns) of every event on a device plane (GPU), else XLA CPU thunks."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(path)
    planes = [p for p in data.planes if p.name.startswith("/device:")]
    found = False
    for plane in planes:
        for line in plane.lines:
            # GPU planes also carry per-op summary lines ("XLA Ops", "XLA Modules"); kernels are on streams.
            if not line.name.lower().startswith("stream"):
                continue
            for ev in line.events:
                stats = dict(ev.stats or {})
                found = True
                op = str(stats.get("hlo_op", ev.name))
                if op.startswith("command_buffer"):  # inside a CUDA graph: the kernel is all we know
                    op = re.sub(r"[_.]\d+$", "", ev.name)
                yield ev.name, op, ev.start_ns, ev.duration_ns
    if not found:  # CPU backend: XLA thunks carry an hlo_op stat on the client threads
        for plane in data.planes:
            for line in plane.lines:
                for ev in line.events:
                    stats = dict(ev.stats or {})
                    if "hlo_op" in stats and not ev.name.startswith("end:"):
                        yield ev.name, str(stats["hlo_op"]), ev.start_ns, ev.duration_ns


def summarise(trace_dir: str, steps: int = 1, top: int = 30) -> dict:
    """Print kind and op tables (ms per step); return {"kinds": {...}, "total_ms": ...}."""
    ops: dict[str, OpTotal] = collections.defaultdict(OpTotal)
    kinds: dict[str, float] = collections.defaultdict(float)
    first, last = float("inf"), 0.0
    for kernel, hlo_op, start, ns in device_events(newest_trace(trace_dir)):
        first, last = min(first, start), max(last, start + ns)
        op = ops[hlo_op]
        op.ns += ns
        op.count += 1
        op.kernels.add(kernel)
        kinds[kind_of(kernel, hlo_op)] += ns
    total = sum(kinds.values())
    per_step = lambda ns: ns / steps / 1e6  # noqa: E731
    span = last - first
    print(f"\ndevice busy per step: {per_step(total):.2f} ms of a {per_step(span):.2f} ms span "
          f"({total / span:.1%} busy; kernels on several streams can overlap) over {steps} step(s)")
    print(f"{'kind':<16} {'ms/step':>9} {'share':>6}")
    for kind, ns in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"{kind:<16} {per_step(ns):>9.2f} {ns / total:>6.1%}")
    print(f"\n{'hlo op':<48} {'ms/step':>9} {'share':>6} {'calls/step':>10}  kernel")
    for name, op in sorted(ops.items(), key=lambda kv: -kv[1].ns)[:top]:
        kernel = sorted(op.kernels)[0][:60] + (f" (+{len(op.kernels) - 1})" if len(op.kernels) > 1 else "")
        print(f"{name[:48]:<48} {per_step(op.ns):>9.3f} {op.ns / total:>6.1%} {op.count / steps:>10.1f}  {kernel}")
    return {"total_ms": per_step(total), "span_ms": per_step(span), "kinds": {k: per_step(v) for k, v in kinds.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace_dir")
    ap.add_argument("--steps", type=int, default=1, help="steps inside the trace (times are divided by it)")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    summarise(args.trace_dir, args.steps, args.top)


if __name__ == "__main__":
    main()
