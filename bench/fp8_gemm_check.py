"""Does an FP8 frozen-weight GEMM beat bf16 on this GPU, through XLA as JAX emits it?

Times one LoRA layer's frozen products at 7B shapes (tokens x 4096 @ 4096 x {4096, 11008} and
the MLP's down product), forward (x @ W) and input gradient (dy @ W^T), four ways:

  bf16        jnp.dot of bf16 operands (what training runs today)
  fp8         lax.dot_general of float8_e4m3fn operands, bf16 output,
              the scales applied to the product afterwards; the weight quantized beforehand
  fp8+scale   the same, with the activation's per-tensor scale found on the fly (amax over the
              tensor, the cast included in the timing): what a training step would pay
  jaxlora     `--quantize fp8`'s forward product (jaxlora.model.fp8 through dense_dot): per-row activation scales, per-channel weight
              scales, applied to the product (forward rows only)
  qdq         quantize-dequantize of both operands then a bf16 dot: the pattern XLA's GEMM
              rewriter is documented to turn into a scaled FP8 cuBLASLt call

and prints TFLOP/s and the error against an f32 product. Run on a GPU:

    PYTHONPATH=. python bench/fp8_gemm_check.py --tokens 4096,8192
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from jaxlora.model.quantize import dense_dot, quantize_kernel_as

E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2
F8_MAX = {E4M3: 448.0, E5M2: 57344.0}


def scale_of(x: jax.Array, dtype) -> jax.Array:
    """Per-tensor scale that maps the largest magnitude onto the format's largest value."""
    return jnp.maximum(jnp.max(jnp.abs(x)).astype(jnp.float32), 1e-12) / F8_MAX[dtype]


def to_f8(x: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    return (x.astype(jnp.float32) / scale).astype(dtype)


def products(kind: str, grad_dtype=E5M2):
    """A jitted (a, w_or_wq, w_scale) -> bf16 product for one way of computing it."""
    def bf16(a, w, sw):
        return jnp.dot(a, w, preferred_element_type=jnp.bfloat16)

    def fp8(a, wq, sw):  # a already float8 (its scale folded in sw for the timing)
        out = jax.lax.dot_general(a, wq, (((1,), (0,)), ((), ())), preferred_element_type=jnp.bfloat16)
        return (out.astype(jnp.float32) * sw).astype(jnp.bfloat16)

    def fp8_scaled(a, wq, sw):
        sa = scale_of(a, grad_dtype)
        out = jax.lax.dot_general(to_f8(a, sa, grad_dtype), wq, (((1,), (0,)), ((), ())),
                                  preferred_element_type=jnp.bfloat16)
        return (out.astype(jnp.float32) * (sa * sw)).astype(jnp.bfloat16)

    def qdq(a, wq, sw):
        sa = scale_of(a, grad_dtype)
        a_dq = to_f8(a, sa, grad_dtype).astype(jnp.bfloat16) * sa.astype(jnp.bfloat16)
        w_dq = wq.astype(jnp.bfloat16) * sw.astype(jnp.bfloat16)
        return jnp.dot(a_dq, w_dq, preferred_element_type=jnp.bfloat16)

    return jax.jit({"bf16": bf16, "fp8": fp8, "fp8+scale": fp8_scaled, "qdq": qdq}[kind])


def timed(fn, *args, iters: int) -> float:
    fn(*args).block_until_ready()
    t = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    out.block_until_ready()
    return (time.perf_counter() - t) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="4096,8192")
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    shapes = [("q/v fwd", 4096, 4096, E4M3), ("up fwd", 4096, 11008, E4M3), ("down fwd", 11008, 4096, E4M3),
              ("up dgrad", 11008, 4096, E4M3), ("down dgrad", 4096, 11008, E4M3)]
    rows = []
    for tokens in map(int, args.tokens.split(",")):
        for name, k, n, adt in shapes:
            ka, kw = jax.random.split(jax.random.key(tokens + k + n))
            a = jax.random.normal(ka, (tokens, k), jnp.float32)
            w = 0.02 * jax.random.normal(kw, (k, n), jnp.float32)
            ref = jnp.dot(a, w, precision="highest")
            sw = scale_of(w, E4M3)
            wq = to_f8(w, sw, E4M3)
            sa = scale_of(a, adt)
            inputs = {"bf16": (a.astype(jnp.bfloat16), w.astype(jnp.bfloat16), sw),
                      "fp8": (to_f8(a, sa, adt), wq, sw * sa),
                      "fp8+scale": (a.astype(jnp.bfloat16), wq, sw),
                      "qdq": (a.astype(jnp.bfloat16), wq, sw)}
            if name.endswith("fwd"):
                inputs["jaxlora"] = (a.astype(jnp.bfloat16), quantize_kernel_as(w, "fp8"), None)
            for kind, operands in inputs.items():
                fn = jax.jit(lambda x, k, _: dense_dot(x, k, jnp.bfloat16)) if kind == "jaxlora" else products(kind, adt)
                secs = timed(fn, *operands, iters=args.iters)
                out = fn(*operands).astype(jnp.float32)
                err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
                row = {"tokens": tokens, "product": name, "k": k, "n": n, "kind": kind, "ms": round(1e3 * secs, 3),
                       "tflops": round(2 * tokens * k * n / secs / 1e12, 1), "rel_err": round(err, 5),
                       "device": jax.devices()[0].device_kind}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\n{'tokens':>6} {'product':<11} {'kind':<10} {'ms':>8} {'TFLOP/s':>8} {'rel err':>8}")
    for r in rows:
        print(f"{r['tokens']:>6} {r['product']:<11} {r['kind']:<10} {r['ms']:>8} {r['tflops']:>8} {r['rel_err']:>8}")


if __name__ == "__main__":
    main()
