"""Decoding throughput: jaxlora.infer.decode's prefill and KV-cache decode loop on random weights.

Builds the preset with random frozen weights on the device (bf16 by default), per-layer (the
fast GPU layout) unless --scan_layers 1, random prompts of --prompt_len tokens, and times the
same two programs `jaxlora.infer.decode.generate` runs: the prefill (prompt -> KV cache + first
token) and the decode loop (all remaining tokens in one device call, greedy, no EOS). Prints
one JSON line per (variant, batch), then a short table.

  python bench/generate_throughput.py --preset 7B --batches 1,8 --prompt_len 256 --new_tokens 128
  python bench/generate_throughput.py --preset tiny --batches 1,2 --prompt_len 16 --new_tokens 8  # CPU smoke test

Variants (--variants bf16,int8): the frozen weights as they are, or weight-only int8 kernels
(jaxlora.model.quantize). --min_gemm_rows 1,8 measures decode products with and without the GPU's
padding to 8 rows (variants <name>-rows1, <name>-rows8).

Fields:
  compile_s       lowering + compiling the prefill and the decode program
  ttft_s          time to first token: prefill + sampling the first token, synced (median of --repeats)
  decode_tok_s    per sequence: (new_tokens - 1) / time of the decode call; total_tok_s = x batch
  e2e_tok_s       per sequence, new_tokens / (ttft + decode)
  peak_gib        the device's peak bytes in use so far in this process (None on CPU)
  compiled_gib    XLA's memory analysis of the decode program (arguments + outputs + temporaries - aliased)
  step_bytes      bytes one decode step must read: every frozen weight once (the embedding table
                  only one row per sequence) + the whole KV cache bucket (each step attends over
                  all S slots; the new entries are written in place)
  bound_tok_s     memory-bandwidth bound per sequence = bandwidth / step_bytes, with the bandwidth
                  measured here: `bandwidth_gbs` = the larger of `read_gbs` (a sum over a device array,
                  bytes read / time) and `copy_gbs` (an elementwise op, bytes read + written / time;
                  the read-only sum is the slower on an H200, and decoding beat it);
                  bound_frac = decode_tok_s / bound_tok_s
  --profile DIR   also traces one decode call per run: device time per step by kernel
  logit_rel       first-token logits of --logit_prompts prompts against the same weights in float32
                  (float32 compute, full-precision matmuls): ||diff|| / ||f32 logits||; logit_err:
                  max |diff| / std(f32 logits); top1_agree: the fraction of prompts whose argmax
                  agrees. Read int8's against bf16's: random-init weights at 7B's shape amplify any
                  perturbation through the layers (bf16 itself: logit_rel ~0.06 on CPU; int8 ~0.18,
                  from ~0.9% per int8 matmul), and their near-uniform logits make top-1 a coin toss
                  for either; trained weights do not behave so.
  matmul_rel_1 / matmul_rel_256   int8 only: the worst of the int8 products (every kernel shape of a
                  layer and lm_head, bf16 activations of 1 and 256 rows) against x @ (q * scale)
                  in float32 with the same activations: float32 rounding only (<1e-5; a bf16
                  output would be ~2e-3). Much more: the compiled int8 product is wrong on this
                  device.
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
import numpy as np  # noqa: E402

from jaxlora.config import LLaMAConfig  # noqa: E402
from jaxlora.infer.decode import GREEDY, NO_EOS, bucket, decode_program, prefill_program, prepare  # noqa: E402
from jaxlora.model import quantize  # noqa: E402
from jaxlora.model.layouts import init_variables  # noqa: E402
from jaxlora.model.llama import LLaMA, head_logits  # noqa: E402
from jaxlora.model.quantize import Int8Kernel, dense_dot, dequantize, quantize_params, weight_bytes  # noqa: E402
from jaxlora.parallel.sharding import peak_memory_bytes  # noqa: E402

DTYPES = {"bf16": jnp.bfloat16, "f32": jnp.float32}


def _median_seconds(fn: Any, x: jax.Array, repeats: int) -> float:
    jax.block_until_ready(fn(x))  # compile
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(x))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure_bandwidth(nbytes: int, repeats: int = 5) -> dict[str, float]:
    """Device memory bandwidth in GB/s, two ways: `read_gbs`, a sum over an array of nbytes
    (reads it once, writes nothing, as a decode step's weight reads do; XLA's reduction
    reaches ~2.6 TB/s on an H200, which bf16 decoding beats), and `copy_gbs`, an elementwise
    op over it (nbytes read + nbytes written; ~4.3 TB/s there). The bound takes the larger, so
    that decoding cannot exceed it (bound_frac <= 1)."""
    x = jax.random.normal(jax.random.key(7), (nbytes // 2,), jnp.bfloat16)
    read = _median_seconds(jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32)), x, repeats)
    copy = _median_seconds(jax.jit(lambda a: a + jnp.bfloat16(1)), x, repeats)
    read_gbs, copy_gbs = nbytes / read / 1e9, 2 * nbytes / copy / 1e9
    return {"read_gbs": round(read_gbs, 1), "copy_gbs": round(copy_gbs, 1), "bandwidth_gbs": max(read_gbs, copy_gbs)}


def step_bytes(config: LLaMAConfig, params: Any, batch: int, cache_len: int, cache_itemsize: int) -> int:
    """Bytes one decode step reads: the frozen weights (one embedding row per sequence) + the KV cache."""
    wte = params["wte"]["embedding"]
    weights = weight_bytes(params) - wte.size * wte.dtype.itemsize + batch * config.n_embd * wte.dtype.itemsize
    cache = 2 * config.n_layer * batch * cache_len * config.n_embd * cache_itemsize
    return weights + cache


def compiled_gib(compiled: Any) -> float | None:
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    return round(total / 2**30, 2)


def device_peak_gib() -> float | None:
    peak = peak_memory_bytes()
    return round(peak / 2**30, 2) if peak else None


def bench_one(args: argparse.Namespace, model: LLaMA, variables: dict, variant: str, batch: int,
              bandwidth: dict[str, float]) -> dict:
    config = model.config
    P = bucket(args.prompt_len, config.block_size)
    S = bucket(P + args.new_tokens)
    tokens = jax.random.randint(jax.random.key(batch), (batch, P), 3, config.vocab_size, jnp.int32)
    lengths = jnp.full((batch,), args.prompt_len, jnp.int32)
    key = jax.random.key(0)
    limit = jnp.asarray(args.new_tokens - 1, jnp.int32)
    prefill = prefill_program(model, GREEDY, config.vocab_size, NO_EOS, S)
    decode = decode_program(model, GREEDY, config.vocab_size, NO_EOS, args.new_tokens - 1)

    t0 = time.perf_counter()
    prefill_c = prefill.lower(variables, tokens, lengths, key).compile()
    compile_s = time.perf_counter() - t0
    state, first = prefill_c(variables, tokens, lengths, key)
    t0 = time.perf_counter()
    decode_c = decode.lower(variables, state, limit).compile()
    compile_s += time.perf_counter() - t0

    ttft = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        state, first = prefill_c(variables, tokens, lengths, key)
        first.block_until_ready()
        ttft.append(time.perf_counter() - t)
    decode_s, n = [], None
    for _ in range(args.repeats):
        state, _ = prefill_c(variables, tokens, lengths, key)
        jax.block_until_ready(state)
        t = time.perf_counter()
        state, out, n = decode_c(variables, state, limit)
        out.block_until_ready()
        decode_s.append(time.perf_counter() - t)
    steps = int(n)
    if args.profile:
        profile_decode(args, f"{variant}_b{batch}", decode_c, prefill_c(variables, tokens, lengths, key)[0],
                       variables, limit, steps)
    ttft_s, dec_s = statistics.median(ttft), statistics.median(decode_s)
    per_seq = steps / dec_s
    nbytes = step_bytes(config, variables["params"], batch, S, jnp.dtype(model.dtype).itemsize)
    bound = bandwidth["bandwidth_gbs"] * 1e9 / nbytes
    return {
        "bench": "jaxlora-generate", "preset": args.preset, "variant": variant, "batch": batch,
        "fused_mlp": model.fused_mlp,
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "cache_len": S, "scan_layers": args.scan_layers,
        "ttft_s": round(ttft_s, 4), "decode_tok_s": round(per_seq, 1), "total_tok_s": round(per_seq * batch, 1),
        "e2e_tok_s": round((steps + 1) / (ttft_s + dec_s), 1), "ms_per_step": round(1e3 * dec_s / steps, 3),
        "compile_s": round(compile_s, 2), "peak_gib": device_peak_gib(), "compiled_gib": compiled_gib(decode_c),
        "step_bytes": nbytes, **bandwidth, "bandwidth_gbs": round(bandwidth["bandwidth_gbs"], 1), "bound_tok_s": round(bound, 1),
        "bound_frac": round(per_seq / bound, 3), "device": jax.devices()[0].device_kind, "jax": jax.__version__,
    }


def profile_decode(args: argparse.Namespace, tag: str, compiled: Any, state: dict, variables: dict, limit: jax.Array,
                   steps: int) -> None:
    """Trace one more decode call into args.profile/tag, save its optimized HLO, and print the
    device time per decode step by kernel (bench/profile_summary.py)."""
    import gzip

    from profile_summary import summarise

    out = os.path.join(args.profile, tag)
    os.makedirs(out, exist_ok=True)
    with gzip.open(os.path.join(out, "hlo.txt.gz"), "wt") as f:
        f.write(compiled.as_text())
    with jax.profiler.trace(out):
        jax.block_until_ready(compiled(variables, state, limit))
    print(f"# profile {tag}: per decode step", flush=True)
    summarise(out, steps=steps)


def first_logits(model: LLaMA) -> Any:
    """jit: (variables, tokens (B, T)) -> float32 logits at the last position (B, V)."""
    def run(variables: dict, tokens: jax.Array) -> jax.Array:
        hidden = model.apply(variables, tokens, return_hidden=True)
        return head_logits(hidden[:, -1], variables["params"]["lm_head"]["kernel"])[:, :model.config.vocab_size]
    return jax.jit(run)


def float32_logits(model: LLaMA, params: dict, prompts: jax.Array) -> np.ndarray:
    """The reference: first-token logits of the same weights in float32, float32 compute and
    full-precision matmuls (GPUs otherwise run float32 matmuls in tf32)."""
    model32 = model.clone(dtype=jnp.float32, param_dtype=jnp.float32)
    params32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    with jax.default_matmul_precision("highest"):
        out = np.asarray(first_logits(model32)({"params": params32}, prompts))
    del params32
    return out


def logit_errors(got: np.ndarray, ref: np.ndarray) -> dict:
    diff = got - ref
    return {"logit_rel": round(float(np.linalg.norm(diff) / np.linalg.norm(ref)), 4),
            "logit_err": round(float(np.abs(diff).max() / ref.std()), 4),
            "top1_agree": float(np.mean(got.argmax(-1) == ref.argmax(-1)))}


def matmul_errors(params: Any) -> dict:
    """Each int8 kernel shape's product (the first layer's kernels and lm_head; bf16 activations of 1
    and 256 rows) against x @ dequantized kernel in float32: the worst relative error per row count."""
    kernels = {}
    for leaf in jax.tree.leaves(params.get("h_0", params.get("h")), is_leaf=lambda x: isinstance(x, Int8Kernel)):
        if isinstance(leaf, Int8Kernel) and leaf.q.ndim == 1 + leaf.out_ndim:  # per-layer: (C, H) or gate|up (C, 2, H)
            kernels.setdefault(leaf.q.shape, leaf)
    kernels.setdefault(params["lm_head"]["kernel"].q.shape, params["lm_head"]["kernel"])
    product = jax.jit(lambda x, k: dense_dot(x, k, jnp.bfloat16, jnp.float32))
    out = {}
    for rows in (1, 256):
        worst = 0.0
        for kernel in kernels.values():
            x = jax.random.normal(jax.random.key(rows), (rows, kernel.shape[0]), jnp.float32).astype(jnp.bfloat16)
            with jax.default_matmul_precision("highest"):
                want = jax.jit(lambda x, k: x.astype(jnp.float32) @ dequantize(k).reshape(k.shape[0], -1))(x, kernel)
            got = product(x, kernel).reshape(want.shape)
            worst = max(worst, float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)))
        out[f"matmul_rel_{rows}"] = float(f"{worst:.3g}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="7B")
    ap.add_argument("--n_layer", type=int, default=0, help="override the preset's depth (0: keep)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt_len", type=int, default=256)
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--variants", default="bf16,int8", help="comma-separated: bf16 (weights as built), int8")
    ap.add_argument("--min_gemm_rows", default=str(quantize.GPU_MIN_GEMM_ROWS),
                    help="comma-separated: on GPU pad products of fewer rows to this many (1: no padding; several: "
                    "variants <name>-rows<m>; see jaxlora.model.quantize.GPU_MIN_GEMM_ROWS)")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="frozen weights, compute and KV cache")
    ap.add_argument("--scan_layers", type=int, default=0, choices=[0, 1],
                    help="1: layers as one scan over stacked weights; 0: per-layer weights (fastest)")
    ap.add_argument("--fused_mlp", type=int, default=1, choices=[0, 1],
                    help="1: gate and up kernels fused into one (generate.py's layout); 0: two products")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bandwidth_mb", type=int, default=0, help="array size for the bandwidth measurement "
                    "(0: 2048 on GPU/TPU, 64 on CPU)")
    ap.add_argument("--logit_prompts", type=int, default=8, help="prompts for the logit error against float32 "
                    "(0: skip; needs the float32 weights on the device for a moment: 27 GB at 7B)")
    ap.add_argument("--profile", default="", help="directory: trace one more decode call per run there, save its "
                    "optimized HLO and print the device time per step by kernel (bench/profile_summary.py)")
    args = ap.parse_args()
    if args.new_tokens < 2:
        ap.error("--new_tokens must be >= 2 (the first comes from the prefill)")

    config = LLaMAConfig.from_name(args.preset, **({"n_layer": args.n_layer} if args.n_layer else {}))
    dtype = DTYPES[args.dtype]
    model = LLaMA(config, dtype=dtype, param_dtype=dtype, scan_layers=bool(args.scan_layers))
    model, base = prepare(model, {"params": init_variables(model, jax.random.key(0))["params"]},
                          fuse_mlp=bool(args.fused_mlp))
    jax.block_until_ready(base)
    mb = args.bandwidth_mb or (64 if jax.default_backend() == "cpu" else 2048)
    bandwidth = measure_bandwidth(mb << 20)
    print(f"# {jax.devices()[0].device_kind}: frozen weights {weight_bytes(base['params']) / 1e9:.2f} GB "
          f"({args.dtype}), measured bandwidth {bandwidth['bandwidth_gbs']:.0f} GB/s (read-only sum "
          f"{bandwidth['read_gbs']:.0f}, copy {bandwidth['copy_gbs']:.0f})", flush=True)

    min_rows = [int(m) for m in args.min_gemm_rows.split(",")]
    variants = [(f"{name}-rows{m}" if len(min_rows) > 1 else name, name, m)  # (label, bf16|int8, GPU_MIN_GEMM_ROWS)
                for name in args.variants.split(",") for m in min_rows]
    logits_of = first_logits(model) if args.logit_prompts else None
    prompts = jax.random.randint(jax.random.key(99), (args.logit_prompts or 1, args.prompt_len), 3, config.vocab_size,
                                 jnp.int32)
    reference = float32_logits(model, base["params"], prompts) if logits_of is not None else None
    rows = []
    for variant, kind, min_gemm_rows in variants:
        quantize.GPU_MIN_GEMM_ROWS = min_gemm_rows  # read while tracing: the programs are traced afresh below
        prefill_program.cache_clear()
        decode_program.cache_clear()
        try:
            variables = base if kind != "int8" else {"params": quantize_params(base["params"], "int8")}
            extra = {}
            if logits_of is not None:
                extra = logit_errors(np.asarray(logits_of(variables, prompts)), reference)
            if kind == "int8":
                extra.update(matmul_errors(variables["params"]))
            for batch in map(int, args.batches.split(",")):
                try:
                    row = {**bench_one(args, model, variables, variant, batch, bandwidth), **extra}
                except Exception as e:  # an OOM at one batch should not hide the others
                    row = {"bench": "jaxlora-generate", "variant": variant, "batch": batch, "error": repr(e)[:300]}
                print(json.dumps(row), flush=True)
                rows.append(row)
            del variables
        except Exception as e:
            row = {"bench": "jaxlora-generate", "variant": variant, "error": repr(e)[:300]}
            print(json.dumps(row), flush=True)
            rows.append(row)

    print(f"\n{'variant':<12} {'batch':>5} {'tok/s/seq':>9} {'tok/s all':>9} {'bound':>7} {'of bound':>8} "
          f"{'TTFT ms':>8} {'compile s':>9} {'peak GiB':>8} {'logit rel':>9} {'top1':>5}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<12} {r.get('batch', ''):>5} error: {r['error'][:80]}")
            continue
        print(f"{r['variant']:<12} {r['batch']:>5} {r['decode_tok_s']:>9} {r['total_tok_s']:>9} {r['bound_tok_s']:>7} "
              f"{r['bound_frac']:>8.1%} {1e3 * r['ttft_s']:>8.1f} {r['compile_s']:>9} {str(r['peak_gib']):>8} "
              f"{str(r.get('logit_rel', '')):>9} {str(r.get('top1_agree', '')):>5}")


if __name__ == "__main__":
    main()
