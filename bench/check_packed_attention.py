"""cuDNN attention over packed rows on a GPU: the packed ("ragged") layout against the XLA masked
reference (forward and gradients), then fwd+bwd timings of every implementation at 7B's heads.

Rows are packed from Alpaca-profile sample lengths (bench/alpaca_profile.py's `alpaca_lengths`)
by train.py's packer (`jaxlora.train.data.pack_rows`), padding tail included.

Accuracy: each implementation's output and q/k/v gradients (random cotangent) against XLA's
masked attention computed in float32 from the same bf16 inputs; `err` = max |x - ref| / max |ref|
per tensor (worst of out, dq, dk, dv). cuDNN's packed path passes if its error is within 2x the
cuDNN bias path's + 1e-3 (both bf16 flash kernels) and it has no NaN. Native grouped k/v in the
packed layout needs JAX after 0.11.0 (jax-ml/jax#39521): both the native and the repeated k/v
calls are checked, so the table says whether this JAX has the fix. Float32: cuDNN's flash
attention takes bf16/fp16 only; the script prints what the call says.

Timing: median ms of a jitted value_and_grad (fwd+bwd w.r.t. q, k, v) over --iters calls.
`cudnn-packed` is what the model runs (causal_attention: packed layout, lax.cond to the bias
path for rows past max_segments); `cudnn-ragged-M` is the bare packed call with M slots a row.

  python bench/check_packed_attention.py                     # B=2,4, T=2048, 32 heads x 128, kv 32 and 8
  python bench/check_packed_attention.py --batches 2,3,4 --iters 50
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import jax.numpy as jnp
import numpy as np
from alpaca_profile import alpaca_lengths

from jaxlora.model import attention
from jaxlora.train.data import pack_rows


def packed_segments(batch: int, length: int, seed: int = 0) -> np.ndarray:
    """(batch, length) segment ids (1, 2, ... per sample, 0 = padding tail) of `batch` rows packed
    from Alpaca-profile samples, taken evenly from all the rows of 16 rows' worth of samples."""
    lengths = np.minimum(alpaca_lengths(16 * batch * length // 150, seed), length)
    rows = pack_rows(lengths.tolist(), length)
    pick = np.linspace(0, len(rows) - 1, batch).round().astype(int)
    out = np.zeros((batch, length), np.int32)
    for r, row in enumerate(rows[i] for i in pick):
        ends = np.cumsum([lengths[i] for i in row])
        for s, (a, b) in enumerate(zip(np.concatenate([[0], ends[:-1]]), ends), start=1):
            out[r, a:b] = s
    return out


def qkv(batch: int, length: int, heads: int, kv_heads: int, hs: int, dtype, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 4)
    shapes = [(batch, length, n, hs) for n in (heads, kv_heads, kv_heads, heads)]
    q, k, v, w = (jax.random.normal(key, s, jnp.float32) for key, s in zip(keys, shapes))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), w.astype(dtype)


@functools.partial(jax.jit, static_argnums=0)
def fwd_bwd(fn: Callable, q: jax.Array, k: jax.Array, v: jax.Array, w: jax.Array, segments: jax.Array):
    """(out, (dq, dk, dv)) of fn for the cotangent w."""
    out, pull = jax.vjp(lambda q, k, v: fn(q, k, v, segments), q, k, v)
    return out, pull(w.astype(out.dtype))


def implementations(max_segments: list[int]) -> dict[str, Callable]:
    impls = {
        "xla-mask": lambda q, k, v, s: attention.masked_attention(q, k, v, s, "xla"),
        "cudnn-bias": lambda q, k, v, s: attention.masked_attention(q, k, v, s, "cudnn"),
        "cudnn-packed": lambda q, k, v, s: attention.causal_attention(q, k, v, "cudnn-ragged", s),
        "cudnn-causal(no segments)": lambda q, k, v, s: attention.causal_attention(q, k, v, "cudnn"),
        "pallas": lambda q, k, v, s: attention.causal_attention(q, k, v, "pallas", s),
    }
    for m in max_segments:
        impls[f"cudnn-ragged-{m}"] = lambda q, k, v, s, m=m: attention.cudnn_packed_attention(
            q, k, v, *attention.segment_runs(s, m)[:2])
    return impls


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    if not np.isfinite(got).all():
        return float("nan")
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def check_accuracy(args: argparse.Namespace, kv_heads: int) -> bool:
    """Errors of each path against XLA in float32 at B=2 (native and repeated grouped k/v)."""
    segments = jnp.asarray(packed_segments(2, args.length))
    q, k, v, w = qkv(2, args.length, args.heads, kv_heads, args.head_size, jnp.bfloat16)
    want = fwd_bwd(implementations([])["xla-mask"], *(t.astype(jnp.float32) for t in (q, k, v, w)), segments)
    runs = np.asarray(attention.segment_runs(segments, args.length)[2])
    print(f"\naccuracy, kv_heads={kv_heads}, B=2, T={args.length}, runs per row {runs.tolist()} (padding tail "
          f"included), default max_segments {attention.packed_max_segments(args.length)}; relative max error of "
          "out, dq, dk, dv against XLA in float32")
    cases = [("xla-mask bf16", "xla-mask", None), ("cudnn-bias", "cudnn-bias", None)]
    if kv_heads != args.heads:
        cases += [(f"cudnn-packed native-gqa={g}", "cudnn-packed", g) for g in (True, False)]
    else:
        cases += [("cudnn-packed", "cudnn-packed", None)]
    cases += [("cudnn-packed overflow->bias", "overflow", None), ("pallas", "pallas", None)]
    impls = implementations([])
    impls["overflow"] = lambda q, k, v, s: attention.causal_attention(q, k, v, "cudnn-ragged", s, max_segments=2)
    ok, bound = True, float("nan")
    for label, name, gqa in cases:
        errs = accuracy_case(impls[name], gqa, (q, k, v, w, segments), want)
        bound = 2 * max(errs) + 1e-3 if name == "cudnn-bias" else bound
        verdict = ""
        if name in ("cudnn-packed", "overflow"):
            passed = max(errs) <= bound  # False for NaN
            expected = gqa is True and not attention.CUDNN_PACKED_GQA  # JAX <= 0.11.0's stride bug
            ok &= passed or expected
            verdict = ("ok" if passed else "FAIL") + f" (bound {bound:.1e})"
            if expected:
                verdict += " this JAX has the fix: the version gate may go lower" if passed else \
                    " expected before the fix; the model repeats k/v"
        print(f"  {label:30s} " + " ".join(f"{e:.1e}" for e in errs) + f"  {verdict}")
    return ok


def accuracy_case(fn: Callable, gqa: bool | None, args: tuple, want: tuple) -> list[float]:
    """[out, dq, dk, dv] errors of fn (CUDNN_PACKED_GQA set to gqa while tracing), NaN if it fails."""
    default = attention.CUDNN_PACKED_GQA
    if gqa is not None:
        attention.CUDNN_PACKED_GQA = gqa
    try:
        got = fwd_bwd(fn, *args)
        return [rel_err(g, r) for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want))]
    except Exception as e:  # noqa: BLE001 - report and go on: a kernel this GPU or JAX lacks
        print(f"  {type(e).__name__}: {str(e).splitlines()[0][:120]}")
        return [float("nan")] * 4
    finally:
        attention.CUDNN_PACKED_GQA = default


def check_float32(args: argparse.Namespace) -> None:
    q, k, v, _ = qkv(1, 256, 2, 2, args.head_size, jnp.float32)
    segments = jnp.asarray(packed_segments(1, 256))
    try:
        jax.jit(lambda q, k, v: attention.cudnn_packed_attention(
            q, k, v, *attention.segment_runs(segments, 8)[:2]))(q, k, v).block_until_ready()
        print("float32: cuDNN's packed call ran")
    except Exception as e:  # noqa: BLE001
        print(f"float32: not supported by cuDNN's call ({type(e).__name__}: {str(e).splitlines()[0][:100]}); "
              "float32 runs take 'xla' (auto) or 'pallas'")


def time_one(fn: Callable, segments, q, k, v, w, iters: int) -> tuple[float, float]:
    """Median ms of one fwd+bwd call, and the compiled program's temporary memory in GiB."""
    compiled = fwd_bwd.lower(fn, q, k, v, w, segments).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes / 2 ** 30
    jax.block_until_ready(compiled(q, k, v, w, segments))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v, w, segments))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times), temp


def timings(args: argparse.Namespace, batch: int, kv_heads: int) -> None:
    seg_np = packed_segments(batch, args.length, seed=batch)
    segments = jnp.asarray(seg_np)
    runs = np.asarray(attention.segment_runs(segments, args.length)[2])
    real = int((seg_np > 0).sum())
    q, k, v, w = qkv(batch, args.length, args.heads, kv_heads, args.head_size, jnp.bfloat16)
    print(f"\nB={batch} T={args.length} heads={args.heads} kv_heads={kv_heads} hs={args.head_size} bf16: "
          f"runs per row {runs.tolist()}, real tokens {real} of {seg_np.size}")
    print(f"  {'implementation':28s} {'fwd+bwd ms':>10s} {'vs bias':>8s} {'temp GiB':>9s}")
    base = None
    for name, fn in implementations([m for m in args.max_segments if m >= runs.max()]).items():
        try:
            ms, temp = time_one(fn, segments, q, k, v, w, args.iters)
        except Exception as e:  # noqa: BLE001
            print(f"  {name:28s} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
            continue
        base = ms if name == "cudnn-bias" else base
        ratio = f"{base / ms:7.2f}x" if base else ""
        print(f"  {name:28s} {ms:10.3f} {ratio:>8s} {temp:9.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda s: [int(x) for x in s.split(",")]
    ap.add_argument("--batches", type=ints, default=[2, 4])
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv_heads", type=ints, default=[32, 8])
    ap.add_argument("--head_size", type=int, default=128)
    ap.add_argument("--max_segments", type=ints, default=[16, 32, 64], help="slot counts timed bare")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--cpu_smoke", action="store_true", help="run the plumbing on CPU (cuDNN rows fail)")
    args = ap.parse_args()
    if jax.default_backend() != "gpu" and not args.cpu_smoke:
        sys.exit("needs a GPU (cuDNN); on CPU the packed path is tested by tests/test_attention_impls.py")
    try:
        cudnn = attention.cudnn_fused.check_cudnn_version()
    except (AttributeError, RuntimeError) as e:
        cudnn = f"unknown ({e})"
    print(f"jax {jax.__version__}, cuDNN {cudnn}, {jax.devices()[0].device_kind}; packed layout available: "
          f"{attention.cudnn_packing_available()}, native GQA in it (by version): {attention.CUDNN_PACKED_GQA}")
    oks = [check_accuracy(args, kv) for kv in args.kv_heads]  # every check runs
    ok = all(oks)
    check_float32(args)
    for kv in args.kv_heads:
        for batch in args.batches:
            timings(args, batch, kv)
    print("\naccuracy:", "PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
