"""Can a decode step's attention run in fewer kernels? Times the cache write and the attention of every
layer of a decode step (no weight products), several ways, at a model's decoding shapes.

The 2026-12-02 (sixth session) profile of Llama 3.1 8B at batch 1 spent 14.5% of a step in ~11 small
kernels a layer of ~1.4 µs each; 230 tok/s needs about one of them fewer. Six of the eleven are the
cache writes and the softmax. A way is `current` or a '+'-joined set of changes to it:

  current      what jaxlora runs (`jaxlora.model.attention.cached_attention`): k and v caches apart,
               one in-place write each; softmax's max and sum in one variadic reduction
               (`softmax_one_pass`), probabilities to bf16
  twopass      jax.nn.softmax instead (max, then sum of exponentials: what ran until 2026-12-02;
               at 8B, batch 1, one H200: 391 / 381 µs a step against one-pass's 359 / 360 in two
               calls, 64 kernels more)
  f32pv        the probabilities stay float32 into the product with v (v converted in the product):
               no separate kernel that rounds them to bf16, if XLA fuses them into the GEMM's operand
               (it did not: +19 µs)
  kv_one       one (B, 2, K, S, hs) buffer for k and v: one in-place write a layer; the products
               read its two halves (+55 µs: XLA copies the halves)
  @while       (suffix) the loop's trip count known only at run time: XLA then reads the loop
               predicate back to the host after every step before it launches the next (+16 and
               +9 µs a step in two calls, 2026-12-02: decode's loop pays it, ~0.3% of a step)
  +oproj       adds each layer's output product (C x C weights, bf16), its rows padded to 8 as
               the model pads every frozen product on a GPU (`rows_padded_dot`): on 2026-12-02
               (sixth session's HLO) the attention output's pad was a kernel of its own, the only
               pad not fused into a neighbour (the norms and SwiGLU fuse theirs)
  +oproj_unpadded  the same product with its one row as it is (cuBLAS picks a GEMV): no pad
               kernel; is the GEMV as fast on the weights? `current+oproj` against this says
  (A decode loop in blocks of 8 steps of known count, the predicate read once a block, measured
  2026-12-02 (seventh session) 13 µs a step slower than `current`, 4 µs slower than @while: not
  adopted.)

Each way runs `--layers` layers in a loop of `--steps` steps (each step's q, k and v come from the
previous step's output, as in decoding), the caches donated. Prints µs per step, the
kernels XLA compiled in the loop body, and each way's largest difference from the first way of
its kind (with or without the output product).

    PYTHONPATH=. python bench/decode_attention_check.py --preset llama3.1-8b --batches 1,8
    PYTHONPATH=. python bench/decode_attention_check.py --preset tiny --layers 2 --steps 4   # CPU smoke test
"""
from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.config import LLaMAConfig
from jaxlora.model.attention import cached_attention, softmax_one_pass, write_kv
from jaxlora.model.quantize import rows_padded_dot

Array = jax.Array
WAYS = ("current", "twopass", "f32pv", "kv_one", "current@while", "current+oproj", "current+oproj_unpadded")


def attention_variant(two_pass: bool, f32pv: bool) -> Callable:
    """`cached_attention` with jax.nn.softmax (two_pass) and/or float32 probabilities into the
    product with v (f32pv)."""
    def attend(q: Array, k: Array, v: Array, kv_mask: Array) -> Array:
        B, T, H, hs = q.shape
        K = k.shape[1]
        q = q.reshape(B, T, K, H // K, hs)
        scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(hs)
        scores = jnp.where(kv_mask[:, None, None, None, :], scores, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1) if two_pass else softmax_one_pass(scores)
        probs = probs if f32pv else probs.astype(v.dtype)
        y = jnp.einsum("bkgts,bksd->btkgd", probs, v.astype(probs.dtype), preferred_element_type=jnp.float32)
        return y.reshape(B, T, H, hs).astype(q.dtype)
    return attend


def layer_fn(way: str) -> Callable:
    """(cache, q (B,1,H,hs), k and v (B,1,K,hs), slot, kv_mask) -> (cache, y (B,1,H,hs))."""
    changes = set(way.split("@")[0].split("+")) - {"current"}
    unknown = changes - {"twopass", "f32pv", "kv_one", "oproj", "oproj_unpadded"}
    if unknown:
        raise ValueError(f"unknown change(s) {sorted(unknown)} in way {way!r}")
    plain = not changes & {"twopass", "f32pv"}
    attend = cached_attention if plain else attention_variant("twopass" in changes, "f32pv" in changes)

    def attention(cache: Array | dict, q: Array, k: Array, v: Array, slot: Array, kv_mask: Array) -> tuple:
        if "kv_one" in changes:  # (B, 2, K, S, hs)
            new = jnp.stack([k, v], axis=1).swapaxes(2, 3).astype(cache.dtype)  # (B, 2, K, 1, hs)
            cache = jax.lax.dynamic_update_slice(cache, new, (0, 0, 0, slot, 0))
            return cache, attend(q, cache[:, 0], cache[:, 1], kv_mask)
        cache = write_kv(cache, k, v, slot)
        return cache, attend(q, cache["k"], cache["v"], kv_mask)

    def layer(cache: Array | dict, weight: Array | None, q: Array, k: Array, v: Array, slot: Array,
              kv_mask: Array) -> tuple:
        cache, y = attention(cache, q, k, v, slot, kv_mask)
        if weight is None:
            return cache, y
        B, T, H, hs = y.shape
        out = rows_padded_dot(y.reshape(B, T, H * hs), weight, None, 1 if "oproj_unpadded" in changes else None)
        return cache, out.reshape(B, T, H, hs)
    return layer


def o_weights(way: str, layers: int, C: int, dtype: jnp.dtype) -> tuple:
    """Each layer's (C, C) output kernel for the +oproj ways (scaled so activations stay O(1)); else Nones."""
    if "oproj" not in way:
        return (None,) * layers
    keys = jax.random.split(jax.random.key(7), layers)
    return tuple((jax.random.normal(k, (C, C), jnp.float32) / np.sqrt(C)).astype(dtype) for k in keys)


def empty_caches(way: str, layers: int, B: int, K: int, S: int, hs: int, dtype: jnp.dtype) -> tuple:
    if "kv_one" in way:
        return tuple(jnp.zeros((B, 2, K, S, hs), dtype) for _ in range(layers))
    return tuple({"k": jnp.zeros((B, K, S, hs), dtype), "v": jnp.zeros((B, K, S, hs), dtype)} for _ in range(layers))


def program(way: str, steps: int, K: int) -> Callable:
    layer = layer_fn(way)

    def run(caches: tuple, weights: tuple, x: Array, start: Array, valid: Array, limit: Array) -> tuple:
        def step(i: Array, carry: tuple) -> tuple:
            caches, x, valid = carry
            slot = start + i
            valid = jax.lax.dynamic_update_slice(valid, jnp.ones((valid.shape[0], 1), bool), (0, slot))
            new = []
            for cache, weight in zip(caches, weights):  # per-layer buffers, as decoding's scan_layers=False program
                B, _, H, hs = x.shape
                k = x[:, :, :K] * 0.5
                v = x[:, :, H - K:] * 0.25
                cache, y = layer(cache, weight, x, k, v, slot, valid)
                x = (y.astype(jnp.float32) * 0.9 + x.astype(jnp.float32) * 0.1).astype(x.dtype)
                new.append(cache)
            return tuple(new), x, valid
        if way.endswith("@while"):  # trip count from a run-time argument
            _, *carry = jax.lax.while_loop(lambda c: c[0] < limit, lambda c: (c[0] + 1, *step(c[0], c[1:])),
                                           (jnp.int32(0), caches, x, valid))
            return tuple(carry)
        return jax.lax.fori_loop(0, steps, step, (caches, x, valid))
    return jax.jit(run, donate_argnums=0)


def kernels_in_loop(compiled_text: str) -> int:
    """Fusions and custom calls (cuBLAS GEMMs) in the while body: one GPU kernel each."""
    bodies = re.findall(r"\n%[^\n]*body[^\n]*\{\n(.*?)\n\}", compiled_text, re.S)
    text = max(bodies, key=len) if bodies else compiled_text
    return len(re.findall(r"= \S+ (?:fusion|custom-call)\(", text))


def check(way: str, cfg: LLaMAConfig, B: int, prompt: int, steps: int, layers: int, repeats: int,
          dtype: jnp.dtype) -> tuple[dict, np.ndarray]:
    H, K, hs = cfg.n_head, cfg.n_kv_head, cfg.head_size
    S = prompt + steps
    key = jax.random.key(0)
    x = jax.random.normal(key, (B, 1, H, hs), jnp.float32).astype(dtype)
    valid = jnp.arange(S)[None, :].repeat(B, 0) < prompt
    fn = program(way, steps, K)
    fresh = lambda: empty_caches(way, layers, B, K, S, hs, dtype)  # noqa: E731
    weights = o_weights(way, layers, H * hs, dtype)
    t0 = time.perf_counter()
    compiled = fn.lower(fresh(), weights, x, jnp.int32(prompt), valid, jnp.int32(steps)).compile()
    compile_s = time.perf_counter() - t0
    out = jax.block_until_ready(compiled(fresh(), weights, x, jnp.int32(prompt), valid, jnp.int32(steps)))  # warm-up
    times = []
    for _ in range(repeats):
        caches = jax.block_until_ready(fresh())
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(caches, weights, x, jnp.int32(prompt), valid, jnp.int32(steps)))
        times.append(time.perf_counter() - t0)
    row = {"way": way, "batch": B, "layers": layers, "cache_len": S, "us_per_step": 1e6 * min(times) / steps,
           "kernels_per_step": kernels_in_loop(compiled.as_text()), "compile_s": round(compile_s, 2),
           "device": jax.devices()[0].device_kind}
    return row, np.asarray(out[1].astype(jnp.float32))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama3.1-8b")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--layers", type=int, default=0, help="0: the preset's depth")
    ap.add_argument("--prompt_len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ways", default=",".join(WAYS))
    args = ap.parse_args()
    cfg = LLaMAConfig.from_name(args.preset)
    layers = args.layers or cfg.n_layer
    rows = []
    for B in (int(b) for b in args.batches.split(",")):
        references: dict[bool, np.ndarray] = {}  # the first way without / with the output product
        for way in args.ways.split(","):
            row, out = check(way, cfg, B, args.prompt_len, args.steps, layers, args.repeats, jnp.bfloat16)
            reference = references.setdefault("oproj" in way, out)
            row["max_diff_vs_first"] = float(np.max(np.abs(out - reference)))
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(f"\n{'way':<22}{'batch':>6}{'µs/step':>10}{'kernels':>9}{'max diff':>10}")
    for r in rows:
        print(f"{r['way']:<22}{r['batch']:>6}{r['us_per_step']:>10.1f}{r['kernels_per_step']:>9}"
              f"{r['max_diff_vs_first']:>10.2g}")


if __name__ == "__main__":
    main()
