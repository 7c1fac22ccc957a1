"""LoRA training throughput: train.py's own step (`jaxlora.train.build.build_run`) on random weights at
a preset's shapes, on one device or a mesh of several.

The run is built exactly as train.py builds it (same settings object, same profile defaults:
lit-llama's recipe for 7B-65B), with random frozen weights initialised straight into their
shards, then warm-up and measured steps of one micro-batch each are timed. `--batch` is the
micro-batch per batch shard (data x fsdp devices), so on N data-parallel devices the global
batch is N times larger at the same per-device work. Prints one JSON line per (shape,
variant), then a short table.

Three timings: `tokens_per_s` queues step i, then reads step i-1's loss, as train.py runs
(wall time over the measured steps); `tokens_per_s_synced` is the median of steps timed one by
one, blocking on each (the peers' method: the host's dispatch time adds to every step);
`tokens_per_s_queued` queues every step and blocks once (the device's own pace).
`dispatch_ms` is the median host time spent inside one call of the compiled step.

  python bench/train_throughput.py --preset 7B --shapes 4x256,8x512,2x2048
  python bench/train_throughput.py --preset 65B --shapes 4x256 --mesh fsdp=4
  python bench/train_throughput.py --preset tiny --shapes 2x64 --steps 2   # CPU smoke test
  python bench/train_throughput.py --preset 7B --alpaca 2048     # real tokens/s: bucketed vs packed

`--alpaca N` times real tokens/s (padding excluded) on instruction-like data instead:
bench/alpaca_profile.py draws sample lengths with Alpaca's profile from a seed (most 50-300 tokens,
a tail to 1,000; bench/peft_alpaca_peer.py trains PyTorch on the same samples), and
train.py's Batcher makes the batches, as train.py would: lit-llama's recipe (128 samples a step,
micro-batch 4, max_seq_length 256, one sample a row padded to a bucket length, samples cut at 256)
against the same samples packed into rows of 2048 (`--alpaca_packed_rows` rows a micro-batch;
samples cut at 2048, so that run also trains the tails the first one cuts).

FLOPs per token and MFU: `jaxlora.train.accounting.flops_per_token` and `mfu` (train.py reports
with the same two): MFU = tokens/s * FLOPs/token / (peak x devices), the peak the device kind's
dense bf16 figure (`accounting.PEAK_TFLOPS`: 989 TFLOP/s for an H100 or H200) or --peak_tflops.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/: alpaca_profile

import jax  # noqa: E402
import numpy as np  # noqa: E402
from alpaca_profile import alpaca_samples  # noqa: E402

from jaxlora.config import LLaMAConfig  # noqa: E402
from jaxlora.model import fp8  # noqa: E402
from jaxlora.model.llama import ATTENTION_IMPLS, REMAT_POLICIES  # noqa: E402
from jaxlora.parallel import sharding as shd  # noqa: E402
from jaxlora.train.accounting import flops_per_token, mfu  # noqa: E402
from jaxlora.train.build import build_run  # noqa: E402
from jaxlora.train.data import Batcher  # noqa: E402
from jaxlora.train.settings import RNG_IMPLS, TrainArgs, resolve_args  # noqa: E402
from jaxlora.train.spec import run_spec  # noqa: E402
from jaxlora.model.quantize import QUANTIZE_MODES  # noqa: E402

PRECISION = {"bf16": "bf16-true", "f32": "32-true"}
# knob name in --variants -> TrainArgs field
KNOBS = {"attention": "attention", "remat": "remat", "scan_unroll": "scan_unroll", "loss_chunk": "loss_chunk",
         "rng_impl": "rng_impl", "dropout": "lora_dropout", "scan_layers": "scan_layers", "quantize": "quantize",
         "fp8_both_layouts": "fp8_both_layouts", "fuse_mlp": "fuse_mlp"}
ON_OFF_KNOBS = ("scan_layers", "fp8_both_layouts", "fuse_mlp")  # given as 0/1, TrainArgs takes bools


def parse_variant(spec: str) -> dict:
    """'attention=cudnn,remat=none,loss_chunk=4096' -> dict (empty string = defaults)."""
    out = {}
    for item in filter(None, spec.split(",")):
        key, value = item.split("=")
        try:
            out[key] = int(value)
        except ValueError:
            out[key] = float(value) if value.replace(".", "", 1).isdigit() else value
    return out


def profile_steps(args: argparse.Namespace, compiled: Any, state: Any, params: Any, batches: list,
                  tag: str) -> None:
    """Trace a few more steps into args.profile/tag, save the optimized HLO, print the summary."""
    import gzip

    from profile_summary import summarise

    out = os.path.join(args.profile, tag)
    os.makedirs(out, exist_ok=True)
    with gzip.open(os.path.join(out, "hlo.txt.gz"), "wt") as f:
        f.write(compiled.as_text())
    with jax.profiler.trace(out):
        for i in range(args.profile_steps):
            ids = batches[i % len(batches)]
            state, metrics = compiled(state, params, {"input_ids": ids, "labels": ids})
        jax.block_until_ready(metrics["loss"])
    summarise(out, steps=args.profile_steps)


def run_settings(args: argparse.Namespace, batch: int, seq: int, variant: dict, shards: int) -> TrainArgs:
    """train.py's settings for one micro-batch of `batch` rows per batch shard per step."""
    values = dict(preset=args.preset, pretrained_path="none", lora_r=args.lora_r, lora_alpha=2.0 * args.lora_r,
                  lora_targets=args.targets, precision=PRECISION[args.dtype], micro_batch_size=batch,
                  batch_size=batch * shards * args.accum, max_seq_length=seq, mesh=args.mesh or None)
    for flag in ("attention", "remat", "scan_unroll", "loss_chunk", "rng_impl", "quantize"):
        if getattr(args, flag) is not None:
            values[flag] = getattr(args, flag)
    if args.scan_layers is not None:
        values["scan_layers"] = bool(args.scan_layers)
    if args.lora_dropout is not None:
        values["lora_dropout"] = args.lora_dropout
    values.update({KNOBS[k]: (bool(v) if k in ON_OFF_KNOBS else v) for k, v in variant.items()})
    if values.get("quantize") == "fp8":
        values.setdefault("fp8_both_layouts", True)  # train.py's choice wherever the card holds it
    return resolve_args(TrainArgs(**values))


def bench_one(args: argparse.Namespace, batch: int, seq: int, variant: dict) -> dict:
    for key in variant:
        if key not in KNOBS:
            raise ValueError(f"unknown variant knob {key!r}; known: {sorted(KNOBS)}")
    base = LLaMAConfig.from_name(args.preset)
    config = LLaMAConfig.from_name(args.preset, n_layer=args.n_layer) if args.n_layer else None
    mesh = shd.mesh_from_spec(args.mesh or None, config or base)
    a = run_settings(args, batch, seq, variant, shd.batch_shards(mesh))
    t0 = time.perf_counter()
    run = build_run(run_spec(a), mesh, config=config)
    build_s = time.perf_counter() - t0
    config = run.config
    state, params = run.state, run.params
    keys = jax.random.split(jax.random.key(2), 4)
    rows = a.micro_batch_size * shd.batch_shards(mesh)
    batches = []
    for k in keys:
        ids = jax.random.randint(k, (args.accum, rows, seq), 0, config.vocab_size)
        batches.append(jax.device_put(ids, run.shardings.batch))
    knobs = {f: getattr(a, f) for f in KNOBS.values()}  # the settings every row records

    t0 = time.perf_counter()
    compiled = run.train_step.lower(state, params, {"input_ids": batches[0], "labels": batches[0]}).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    compiled_bytes = None
    if mem is not None:
        compiled_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                          - mem.alias_size_in_bytes)
    # Synced: one step at a time, blocking on each (host dispatch time is exposed).
    times = []
    for i in range(args.warmup + args.steps):
        ids = batches[i % len(batches)]
        t = time.perf_counter()
        state, metrics = compiled(state, params, {"input_ids": ids, "labels": ids})
        jax.block_until_ready(metrics["loss"])
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    synced_s = statistics.median(times)
    # Pipelined as train.py runs: queue step i, then read step i-1's metrics. dispatch_ms is
    # the host time inside each call (if it approaches the step time, the host is the limit).
    dispatch = []
    t = time.perf_counter()
    previous = None
    for i in range(args.steps):
        ids = batches[i % len(batches)]
        d = time.perf_counter()
        state, metrics = compiled(state, params, {"input_ids": ids, "labels": ids})
        dispatch.append(time.perf_counter() - d)
        if previous is not None:
            jax.device_get(previous["loss"])
        previous = metrics
    jax.block_until_ready(metrics["loss"])
    step_s = (time.perf_counter() - t) / args.steps
    # Queued without any read-back: the device's own pace.
    t = time.perf_counter()
    for i in range(args.steps):
        ids = batches[i % len(batches)]
        state, metrics = compiled(state, params, {"input_ids": ids, "labels": ids})
    jax.block_until_ready(metrics["loss"])
    queued_s = (time.perf_counter() - t) / args.steps
    if args.profile:
        tag = "_".join([f"{batch}x{seq}"] + [f"{k}-{v}" for k, v in variant.items()])
        profile_steps(args, compiled, state, params, batches, tag)
    tokens = args.accum * rows * seq
    tok_s = tokens / step_s
    peak = shd.peak_memory_bytes()
    n_dev = mesh.devices.size
    return {
        "bench": "jaxlora", "preset": args.preset, "batch": batch, "seq": seq, "accum": args.accum, "r": args.lora_r,
        "targets": args.targets, "n_layer": config.n_layer, "mesh": dict(mesh.shape), "devices": n_dev, **knobs, **variant,
        "step_s": round(step_s, 4), "tokens_per_s": round(tok_s, 1),
        "tokens_per_s_per_device": round(tok_s / n_dev, 1),
        "tokens_per_s_synced": round(tokens / synced_s, 1),
        "tokens_per_s_queued": round(tokens / queued_s, 1),
        "dispatch_ms": round(1e3 * statistics.median(dispatch), 2),
        "mfu": _round(mfu(tok_s * flops_per_token(config, seq), jax.devices()[0].device_kind, n_dev,
                          args.peak_tflops), 4),
        "peak_gib": round(peak / 2**30, 2) if peak else None,
        "compiled_gib": round(compiled_bytes / 2**30, 2) if compiled_bytes else None,
        "compile_s": round(compile_s, 2), "build_s": round(build_s, 2), "loss": round(float(metrics["loss"]), 4),
        "device": jax.devices()[0].device_kind, "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def _round(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


def bench_alpaca(args: argparse.Namespace, name: str, micro: int, seq: int, packing: bool) -> dict:
    """Real tokens/s of train.py's step on `alpaca_samples` batched by train.py's Batcher."""
    mesh = shd.mesh_from_spec(args.mesh or None, LLaMAConfig.from_name(args.preset))
    shards = shd.batch_shards(mesh)
    a = run_settings(args, micro, seq, {}, shards)
    a.batch_size, a.packing = args.alpaca_batch, packing
    run = build_run(run_spec(a), mesh)
    samples = alpaca_samples(args.alpaca, run.config.vocab_size)
    batcher = Batcher(samples, a.batch_size, micro * shards, seq, seed=0, packing=packing, shards=shards)
    hosts = [next(batcher) for _ in range(args.warmup + args.steps)]
    compiled, state = {}, run.state
    t0 = time.perf_counter()
    for host in hosts:  # every shape compiled before the clock starts (train.py: once per bucket)
        shape = host["input_ids"].shape
        if shape not in compiled:
            compiled[shape] = run.train_step.lower(state, run.params, run.batch(host)).compile()
    compile_s = time.perf_counter() - t0
    for host in hosts[:args.warmup]:
        state, metrics = compiled[host["input_ids"].shape](state, run.params, run.batch(host))
    jax.block_until_ready(metrics["loss"])
    real = padded = flops = 0
    t = time.perf_counter()
    for host in hosts[args.warmup:]:  # as train.py: queue step i, then read step i-1's loss
        previous = metrics
        state, metrics = compiled[host["input_ids"].shape](state, run.params, run.batch(host))
        jax.device_get(previous["loss"])
        real += int(host["tokens"])
        step_padded = int(host.get("padded", np.prod(host["input_ids"].shape)))
        padded += step_padded
        flops += step_padded * flops_per_token(run.config, host["input_ids"].shape[2])
    jax.block_until_ready(metrics["loss"])
    seconds = time.perf_counter() - t
    util = mfu(flops / seconds, jax.devices()[0].device_kind, mesh.devices.size, args.peak_tflops)
    return {"bench": "jaxlora-alpaca", "run": name, "preset": args.preset, "samples_per_step": a.batch_size,
            "micro_batch": micro, "max_seq_length": seq, "packing": packing, "attention": a.attention,
            "quantize": a.quantize, "real_tokens_per_s": round(real / seconds, 1),
            "padded_tokens_per_s": round(padded / seconds, 1),
            "padding_fraction": round(1 - real / padded, 4), "mfu": _round(util, 4),
            "step_s": round(seconds / args.steps, 4),
            "shapes_compiled": len(compiled), "compile_s": round(compile_s, 2),
            "device": jax.devices()[0].device_kind, "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", "")}


def alpaca_main(args: argparse.Namespace) -> None:
    """lit-llama's bucketed recipe, then packing to 2048 (those of --alpaca_runs); one JSON line each
    and, with both, the ratio."""
    runs = {"bucketed": (4, 256, False), "packed": (args.alpaca_packed_rows, args.alpaca_packed_length, True)}
    rows = {}
    for name in args.alpaca_runs.split(","):
        if name not in runs:
            raise ValueError(f"--alpaca_runs: unknown run {name!r}; known: {sorted(runs)}")
        rows[name] = bench_alpaca(args, name, *runs[name])
        print(json.dumps(rows[name]), flush=True)
    if len(rows) == 2:
        ratio = rows["packed"]["real_tokens_per_s"] / rows["bucketed"]["real_tokens_per_s"]
        print(f"packed / bucketed real tokens/s: {ratio:.2f}x")


def force_prevent_cse(value: bool) -> None:
    """Make every nn.remat in jaxlora.model.llama use prevent_cse=value (jaxlora.model.llama looks nn.remat up
    per call), to measure what the choice does to memory and speed."""
    import flax.linen as nn
    remat = nn.remat

    def forced(target, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        return remat(target, *args, **{**kwargs, "prevent_cse": value})
    nn.remat = forced


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="7B")
    ap.add_argument("--shapes", default="4x256,8x512,2x2048", help="BATCHxSEQ,...: micro-batch rows per batch "
                    "shard x sequence length (--accum micro-batches per optimizer step)")
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step (lit-llama's recipe: 32; "
                    "work outside the micro-batch loop, such as the optimizer, is paid once per step)")
    ap.add_argument("--mesh", default="", help="'data=D,fsdp=F,tensor=T' as train.py --mesh (default: its default)")
    ap.add_argument("--n_layer", type=int, default=0, help="override the preset's depth (0: keep); for quick "
                    "experiments at real widths")
    ap.add_argument("--lora_r", type=int, default=8)
    ap.add_argument("--targets", default="q,v")
    ap.add_argument("--dtype", default="bf16", choices=sorted(PRECISION), help="frozen weights and compute")
    ap.add_argument("--lora_dropout", type=float, help="default: the profile's (lit-llama: 0.05)")
    ap.add_argument("--attention", choices=ATTENTION_IMPLS, help="default: the profile's")
    ap.add_argument("--remat", choices=list(REMAT_POLICIES), help="default: the profile's")
    ap.add_argument("--scan_layers", type=int, choices=[0, 1], help="1: one scan over stacked weights; 0: "
                    "per-layer weights, unrolled loop; default: the profile's")
    ap.add_argument("--scan_unroll", type=int, help="with --scan_layers 1: layers per scan step; 0 = unrolled")
    ap.add_argument("--loss_chunk", type=int, help="tokens per cross-entropy chunk (0: whole batch)")
    ap.add_argument("--rng_impl", choices=RNG_IMPLS, help="PRNG for dropout; default: the profile's")
    ap.add_argument("--variants", default="", help="';'-separated knob overrides, e.g. 'remat=dots;loss_chunk=2048' "
                    f"(knobs: {', '.join(sorted(KNOBS))})")
    ap.add_argument("--quantize", choices=["none", *QUANTIZE_MODES], help="frozen kernels as train.py --quantize "
                    "(default none)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile", default="", help="directory: trace extra steps of each run there and "
                    "print where the device time goes (bench/profile_summary.py)")
    ap.add_argument("--profile_steps", type=int, default=3)
    ap.add_argument("--peak_tflops", type=float, help="dense bf16 TFLOP/s of one device, for MFU (default: the "
                    "device kind's, jaxlora.train.accounting.PEAK_TFLOPS; none known for CPUs: MFU null)")
    ap.add_argument("--prevent_cse", type=int, choices=[0, 1], help="force nn.remat's prevent_cse (an experiment; "
                    "default: the model's choice)")
    ap.add_argument("--alpaca", type=int, default=0, help="N > 0: real tokens/s on N samples of Alpaca's length "
                    "profile, bucketed (lit-llama's recipe) vs packed to 2048, instead of --shapes")
    ap.add_argument("--alpaca_batch", type=int, default=128, help="samples per optimizer step (lit-llama: 128)")
    ap.add_argument("--alpaca_packed_rows", type=int, default=1, help="rows per micro-batch when packed")
    ap.add_argument("--alpaca_packed_length", type=int, default=2048, help="tokens per packed row")
    ap.add_argument("--alpaca_runs", default="bucketed,packed", help="which of bucketed,packed to time")
    args = ap.parse_args()
    if args.prevent_cse is not None:
        force_prevent_cse(bool(args.prevent_cse))
    variants = [parse_variant(v) for v in args.variants.split(";")] if args.variants else [{}]
    # As train.py, before JAX starts: with FP8 kernels in one layout anywhere in this process, every
    # GEMM of it goes to cuBLAS(Lt) (jaxlora.model.fp8.xla_flags_for; bf16's GEMMs were measured as fast there).
    fp8_runs = [v for v in variants if v.get("quantize", args.quantize) == "fp8"]
    fp8.set_xla_flags("fp8" if fp8_runs else None, os.environ,
                      both_layouts=all(v.get("fp8_both_layouts", "1") != "0" for v in fp8_runs))
    if args.alpaca:
        alpaca_main(args)
        return

    rows = []
    for shape in args.shapes.split(","):
        batch, seq = map(int, shape.split("x"))
        for variant in variants:
            try:
                row = bench_one(args, batch, seq, variant)
                if args.prevent_cse is not None:
                    row["prevent_cse"] = bool(args.prevent_cse)
            except Exception as e:  # an OOM in one variant should not hide the others
                row = {"bench": "jaxlora", "batch": batch, "seq": seq, **variant, "error": repr(e)[:300]}
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(f"\n{'shape':>8} {'mesh':<26} {'variant':<28} {'tok/s':>9} {'/device':>8} {'synced':>9} {'MFU':>6} "
          f"{'peak GiB':>8} {'compile s':>9}")
    for r, v in zip(rows, variants * len(args.shapes.split(","))):
        name = ",".join(f"{k}={x}" for k, x in v.items()) or "default"
        mesh = ",".join(f"{k}={x}" for k, x in r.get("mesh", {}).items())
        print(f"{r['batch']}x{r['seq']:<6} {mesh:<26} {name:<28} {r.get('tokens_per_s', 'ERR'):>9} "
              f"{r.get('tokens_per_s_per_device', ''):>8} {r.get('tokens_per_s_synced', ''):>9} {str(r.get('mfu')):>6} "
              f"{str(r.get('peak_gib')):>8} {r.get('compile_s', ''):>9}")


if __name__ == "__main__":
    main()
