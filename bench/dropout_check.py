"""What does a LoRA site's dropout cost on this device, and would cheaper random bits win it back?

With LoRA on all seven targets a block draws five dropout masks (q|k|v, o, gate, up: tokens x n_embd;
down: tokens x n_hidden) where q,v draws one; 8B with all seven ran 19% slower than q,v in bf16
(2026-12-02) for < 0.3% more FLOPs. This times one adapter's forward and backward as a training step
runs it (scaling * dropout(x) @ A @ B, gradients for x, A and B) at real widths, three ways:

  none     no dropout: the product alone
  flax     flax's nn.Dropout, what `jaxlora.model.lora.adapter_update` runs: a float32 uniform, so
           32 random bits, per element
  bits16   two elements from every 32 random bits (16 each, the drop rate rounded to 1/65536): half
           the random bits

with the rbg PRNG (train.py's default on GPUs), and prints ms per call and each way's cost over `none`.

    PYTHONPATH=. python bench/dropout_check.py --tokens 4096 --widths 4096,14336
    PYTHONPATH=. python bench/dropout_check.py --tokens 64 --widths 32 --repeats 2   # CPU smoke test
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
WAYS = ("none", "flax", "bits16")


def dropout_bits16(key: Array, x: Array, rate: float) -> Array:
    """Inverted dropout drawing 16 random bits an element (two from each 32-bit word)."""
    n = x.size
    words = jax.random.bits(key, ((n + 1) // 2,), jnp.uint32)
    halves = jnp.stack([words & 0xFFFF, words >> 16], axis=-1).reshape(-1)[:n].reshape(x.shape)
    keep = halves >= jnp.uint32(round(rate * 65536))
    return jnp.where(keep, x / (1 - rate), 0).astype(x.dtype)


def adapter_loss(way: str, rate: float) -> Callable:
    def drop(key: Array, x: Array) -> Array:
        if way == "none":
            return x
        if way == "flax":
            return nn.Dropout(rate).apply({}, x, deterministic=False, rngs={"dropout": key})
        return dropout_bits16(key, x, rate)

    def loss(x: Array, a: Array, b: Array, key: Array, g: Array) -> Array:
        y = (drop(key, x) @ a.astype(x.dtype)) @ b.astype(x.dtype) * 2.0
        return jnp.sum((y * g).astype(jnp.float32))  # g: the incoming gradient of y
    return loss


def time_way(way: str, tokens: int, width: int, out: int, r: int, rate: float, repeats: int) -> dict:
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (tokens, width), jnp.float32).astype(jnp.bfloat16)
    g = jax.random.normal(keys[1], (tokens, out), jnp.float32).astype(jnp.bfloat16)
    a = jax.random.normal(keys[2], (width, r), jnp.float32) * 0.01
    b = jax.random.normal(keys[3], (r, out), jnp.float32) * 0.01
    step = jax.jit(jax.grad(adapter_loss(way, rate), argnums=(0, 1, 2)))
    dkey = jax.random.key(1, impl="rbg")
    jax.block_until_ready(step(x, a, b, dkey, g))
    times = []
    for i in range(repeats):
        k = jax.random.fold_in(dkey, i)
        t0 = time.perf_counter()
        jax.block_until_ready(step(x, a, b, k, g))
        times.append(time.perf_counter() - t0)
    return {"way": way, "tokens": tokens, "width": width, "out": out, "ms": 1e3 * min(times),
            "device": jax.devices()[0].device_kind}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--widths", default="4096,14336", help="adapter input widths (n_embd; n_hidden for down)")
    ap.add_argument("--out", type=int, default=4096, help="adapter output width")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--rate", type=float, default=0.05)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    rows = []
    for width in (int(w) for w in args.widths.split(",")):
        base = None
        for way in WAYS:
            row = time_way(way, args.tokens, width, args.out, args.r, args.rate, args.repeats)
            base = row["ms"] if base is None else base
            row["cost_ms"] = row["ms"] - base
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(f"\n{'way':<8}{'tokens':>8}{'width':>8}{'ms':>9}{'over none':>11}")
    for r in rows:
        print(f"{r['way']:<8}{r['tokens']:>8}{r['width']:>8}{r['ms']:>9.3f}{r['cost_ms']:>11.3f}")


if __name__ == "__main__":
    main()
