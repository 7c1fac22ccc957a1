"""LoRA training throughput: the real `train_step` on random weights at a preset's shapes.

Builds the preset with random frozen weights directly on the device (initialised inside
jit, no host copy), random tokens, then times warm-up and measured steps of
`jaxlora.steps.make_train_step` (forward + backward + AdamW on the adapters). Prints one
JSON line per (shape, variant), then a short table.

Three timings: `tokens_per_s` queues step i, then reads step i-1's loss, as train.py runs
(wall time over the measured steps); `tokens_per_s_synced` is the median of steps timed one by
one, blocking on each (the peers' method: the host's dispatch time adds to every step);
`tokens_per_s_queued` queues every step and blocks once (the device's own pace).
`dispatch_ms` is the median host time spent inside one call of the compiled step.

  python bench/train_throughput.py --preset 7B --shapes 4x256,8x512,2x2048
  python bench/train_throughput.py --preset tiny --shapes 2x64 --steps 2   # CPU smoke test

FLOPs per token (stated so MFU can be checked):
  4 * N_dense                 frozen matmuls: forward 2N, input gradients 2N (no weight
                              gradients); N_dense = all parameters but the embedding table
  + 6 * n_layer * T * n_embd  attention scores and values: forward 4*T*C per layer,
                              halved for causality, x3 for forward + backward
Adapter matmuls are ignored (< 0.3% at r=8). MFU = tokens/s * FLOPs/token / peak, with the
peak given by --peak_tflops (default: 989 for an H100 SXM's dense bf16).
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

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxlora.config import LLaMAConfig, LoRAConfig, parse_targets  # noqa: E402
from jaxlora.model import LLaMA, init_adapters, init_variables, split_layers_on_device  # noqa: E402
from jaxlora.optim import make_optimizer  # noqa: E402
from jaxlora.steps import init_train_state, make_train_step  # noqa: E402

DTYPES = {"bf16": jnp.bfloat16, "f32": jnp.float32}


def flops_per_token(config: LLaMAConfig, seq_len: int) -> float:
    n_dense = config.num_params() - config.padded_vocab_size * config.n_embd
    return 4 * n_dense + 6 * config.n_layer * seq_len * config.n_embd


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


def device_peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


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


def bench_one(args: argparse.Namespace, batch: int, seq: int, variant: dict, params: Any) -> tuple[dict, Any]:
    knobs = {"attention": args.attention, "remat": args.remat, "scan_layers": args.scan_layers,
             "scan_unroll": args.scan_unroll,
             "loss_chunk": args.loss_chunk, "rng_impl": args.rng_impl, "donate": args.donate, "dropout": args.lora_dropout, **variant}
    config = LLaMAConfig.from_name(args.preset, **({"n_layer": args.n_layer} if args.n_layer else {}))
    lora = LoRAConfig(r=args.lora_r, alpha=2 * args.lora_r, dropout=float(knobs["dropout"]), targets=parse_targets(args.targets))
    model = LLaMA(config, lora, dtype=DTYPES[args.dtype], param_dtype=DTYPES[args.dtype],
                  attention=knobs["attention"], remat=knobs["remat"], scan_layers=bool(args.scan_layers),
                  scan_unroll=knobs["scan_unroll"])
    optimizer = make_optimizer(3e-4)
    if params is None:  # frozen weights are built once per process and shared by the variants
        params = split_layers_on_device(model, init_variables(model, jax.random.key(0))["params"])
    # Adapters only: XLA drops the unused frozen-weight initialisers from this program.
    lora_vars = init_adapters(model, jax.random.key(1))
    state = init_train_state(lora_vars, optimizer, rng_impl=knobs["rng_impl"])
    step = make_train_step(model, optimizer, chunk_tokens=knobs["loss_chunk"], donate=bool(knobs["donate"]))
    keys = jax.random.split(jax.random.key(2), 4)
    batches = [jax.random.randint(k, (1, batch, seq), 0, config.vocab_size) for k in keys]

    t0 = time.perf_counter()
    compiled = step.lower(state, params, {"input_ids": batches[0], "labels": batches[0]}).compile()
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
    tok_s = batch * seq / step_s
    peak = device_peak_bytes()
    return {
        "bench": "jaxlora", "preset": args.preset, "batch": batch, "seq": seq, "r": args.lora_r,
        "n_layer": config.n_layer, **knobs, "step_s": round(step_s, 4), "tokens_per_s": round(tok_s, 1),
        "tokens_per_s_synced": round(batch * seq / synced_s, 1),
        "tokens_per_s_queued": round(batch * seq / queued_s, 1),
        "dispatch_ms": round(1e3 * statistics.median(dispatch), 2),
        "mfu": round(tok_s * flops_per_token(config, seq) / (args.peak_tflops * 1e12), 4),
        "peak_gib": round(peak / 2**30, 2) if peak else None,
        "compiled_gib": round(compiled_bytes / 2**30, 2) if compiled_bytes else None,
        "compile_s": round(compile_s, 2), "loss": round(float(metrics["loss"]), 4),
        "device": jax.devices()[0].device_kind, "jax": jax.__version__,
    }, params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="7B")
    ap.add_argument("--shapes", default="4x256,8x512,2x2048", help="BATCHxSEQ,... (one optimizer step each)")
    ap.add_argument("--n_layer", type=int, default=0, help="override the preset's depth (0: keep); for quick "
                    "experiments at real widths")
    ap.add_argument("--lora_r", type=int, default=8)
    ap.add_argument("--targets", default="q,v")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="frozen weights and compute")
    ap.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn"])
    ap.add_argument("--remat", default="dots_no_batch", help="see jaxlora.model.REMAT_POLICIES")
    ap.add_argument("--scan_layers", type=int, default=0, choices=[0, 1],
                    help="1: layers as one scan over stacked weights; 0: per-layer weights, unrolled loop (fastest)")
    ap.add_argument("--scan_unroll", type=int, default=1, help="with --scan_layers 1: layers per scan step; 0 = "
                    "the scan fully unrolled")
    ap.add_argument("--loss_chunk", type=int, default=4096, help="tokens per cross-entropy chunk (0: whole batch)")
    ap.add_argument("--rng_impl", default="rbg", help="PRNG for dropout: threefry2x32 | rbg")
    ap.add_argument("--donate", type=int, default=1, choices=[0, 1], help="donate the train state to the step")
    ap.add_argument("--lora_dropout", type=float, default=0.05)
    ap.add_argument("--variants", default="", help="';'-separated knob overrides, e.g. 'remat=dots;loss_chunk=2048'")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile", default="", help="directory: trace extra steps of each run there and "
                    "print where the device time goes (bench/profile_summary.py)")
    ap.add_argument("--profile_steps", type=int, default=3)
    ap.add_argument("--peak_tflops", type=float, default=989.0)
    args = ap.parse_args()

    variants = [parse_variant(v) for v in args.variants.split(";")] if args.variants else [{}]
    if any("scan_layers" in v for v in variants):
        ap.error("scan_layers is per process (the frozen weights are built once in one layout); not a variant")
    rows, params = [], None
    for shape in args.shapes.split(","):
        batch, seq = map(int, shape.split("x"))
        for variant in variants:
            try:
                row, params = bench_one(args, batch, seq, variant, params)
            except Exception as e:  # an OOM in one variant should not hide the others
                row = {"bench": "jaxlora", "batch": batch, "seq": seq, **variant, "error": repr(e)[:300]}
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(f"\n{'shape':>8} {'variant':<40} {'tok/s':>9} {'synced':>9} {'MFU':>6} {'peak GiB':>8} {'compiled':>8} {'compile s':>9}")
    for r, v in zip(rows, variants * len(args.shapes.split(","))):
        name = ",".join(f"{k}={x}" for k, x in v.items()) or "default"
        print(f"{r['batch']}x{r['seq']:<6} {name:<40} {r.get('tokens_per_s', 'ERR'):>9} {r.get('tokens_per_s_synced', ''):>9} {r.get('mfu', ''):>6} "
              f"{str(r.get('peak_gib')):>8} {str(r.get('compiled_gib')):>8} {r.get('compile_s', ''):>9}")


if __name__ == "__main__":
    main()
