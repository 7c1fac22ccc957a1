"""Where does an FP8 frozen-weight product win or lose against bf16 on this GPU, through XLA as JAX emits it?

Times one LoRA layer's frozen products at 7B shapes (tokens x 4096 @ 4096 x {4096, 11008} and the
MLP's down product), for the forward (x @ W) and the input gradient (g @ W^T), five ways:

  bf16          jnp.dot of bf16 operands (what training runs today)
  fp8           lax.dot_general of float8_e4m3fn operands, both already in FP8, the kernel stored
                (in, out) as jaxlora stores it; bf16 output, the scales applied to the product after
  fp8-kmajor    the same with the kernel stored (out, in): the contracted axis innermost in both
                operands, the layout cuBLASLt's FP8 GEMMs take; if this is much faster than `fp8`,
                the (in, out) kernel costs a relayout per product
  jaxlora       `--quantize fp8`'s product (jaxlora.model.fp8 through dense_dot: per-row scales of
                the activation or gradient found on the fly, per-channel kernel scales), forward
                or input gradient (jax.vjp), as a training step runs it
  qdq           quantize-dequantize of both operands, then a bf16 dot: the pattern XLA's GEMM
                rewriter is documented to turn into a scaled FP8 cuBLASLt call

and prints TFLOP/s, the error against a float32 product and which GEMM XLA compiled it to (a
cuBLASLt custom call, its FP8 variant, or a Triton fusion: `gemm` in each row). `--torch` times
the same products with PyTorch instead (`torch.mm` in bf16, `torch._scaled_mm` in FP8: cuBLASLt's
FP8 GEMM with fast accumulation), the ceiling this card's FP8 tensor cores give. Run on a GPU:

    PYTHONPATH=. python bench/fp8_gemm_check.py --tokens 1024,4096
    PYTHONPATH=. python bench/fp8_gemm_check.py --tokens 1024,4096 --torch
"""
from __future__ import annotations

import argparse
import json
import re
import time

import jax
import jax.numpy as jnp

from jaxlora.model.fp8 import E4M3, E4M3_MAX
from jaxlora.model.quantize import dense_dot, quantize_kernel_as

# (name, contracted size, output size, direction): "dgrad" products are g (tokens, out) @ W^T
# for a kernel W (in, out) = (output size, contracted size)
PRODUCTS = [("q/v", 4096, 4096, "fwd"), ("up", 4096, 11008, "fwd"), ("down", 11008, 4096, "fwd"),
            ("up", 11008, 4096, "dgrad"), ("down", 4096, 11008, "dgrad")]


def per_tensor_scale(x: jax.Array) -> jax.Array:
    return jnp.maximum(jnp.max(jnp.abs(x)).astype(jnp.float32), 1e-12) / E4M3_MAX


def to_e4m3(x: jax.Array, scale: jax.Array) -> jax.Array:
    return (x.astype(jnp.float32) / scale).astype(E4M3)


def scaled(out: jax.Array, scale: jax.Array) -> jax.Array:
    return (out.astype(jnp.float32) * scale).astype(jnp.bfloat16)


def ways(direction: str) -> dict:
    """kind -> jitted (a, kernel operand, scale) -> bf16 (tokens, n) product."""
    contract_w = 0 if direction == "fwd" else 1  # W (k, n) for the forward; W (n, k) = (in, out) for dgrad

    def bf16(a, w, s):
        return jax.lax.dot_general(a, w, (((1,), (contract_w,)), ((), ())), preferred_element_type=jnp.bfloat16)

    def fp8(a, wq, s):
        return scaled(jax.lax.dot_general(a, wq, (((1,), (contract_w,)), ((), ())),
                                          preferred_element_type=jnp.bfloat16), s)

    def fp8_kmajor(a, wq_t, s):  # wq_t stored with the contracted axis last
        return scaled(jax.lax.dot_general(a, wq_t, (((1,), (1,)), ((), ())), preferred_element_type=jnp.bfloat16), s)

    def qdq(a, wq, s):
        sa = per_tensor_scale(a)
        a_dq = to_e4m3(a, sa).astype(jnp.bfloat16) * sa.astype(jnp.bfloat16)
        return bf16(a_dq, wq.astype(jnp.bfloat16) * s.astype(jnp.bfloat16), None)

    def jaxlora(a, kernel, s):
        if direction == "fwd":
            return dense_dot(a, kernel, jnp.bfloat16)
        x0 = jnp.zeros((a.shape[0], kernel.q.shape[0]), jnp.bfloat16)
        return jax.vjp(lambda x: dense_dot(x, kernel, jnp.bfloat16), x0)[1](a)[0]

    return {k: jax.jit(f) for k, f in (("bf16", bf16), ("fp8", fp8), ("fp8-kmajor", fp8_kmajor), ("qdq", qdq),
                                        ("jaxlora", jaxlora))}


GEMM_MARKS = re.compile(r'custom_call_target="([^"]+)"|"kind":"(__triton[a-z_]*)"')


def gemms_of(fn, *args) -> str:
    """The GEMM custom calls and Triton fusions in fn's optimized HLO, with their operand types
    (e.g. '__cublas$lt$matmul$f8(f8e4m3fn,f8e4m3fn)'), '+'-joined: which kernel family XLA chose."""
    found = []
    for line in fn.lower(*args).compile().as_text().splitlines():
        m = GEMM_MARKS.search(line)
        if not m or not re.search(r"gemm|matmul|triton", m.group(0)):
            continue
        operand_types = re.findall(r"\b(f8e4m3fn|f8e5m2|bf16|f32|f16)\[", line.split("=", 1)[-1])
        found.append(f"{m.group(1) or m.group(2)}({','.join(operand_types[:2])})")
    return "+".join(dict.fromkeys(found)) or "none"


def torch_rows(tokens: int, iters: int) -> list[dict]:
    """bf16 torch.mm and FP8 torch._scaled_mm (cuBLASLt, per-tensor scales, fast accumulation) on
    the same shapes: the GEMM speed this card gives outside XLA."""
    import torch

    rows = []
    for name, k, n, direction in PRODUCTS:
        a = torch.randn(tokens, k, device="cuda")
        w_t = 0.02 * torch.randn(n, k, device="cuda")  # (out, contracted), row-major: _scaled_mm's layout
        one = torch.ones((), device="cuda")
        a8, w8 = a.to(torch.float8_e4m3fn), (w_t / w_t.abs().max() * E4M3_MAX).to(torch.float8_e4m3fn)
        a16, w16 = a.bfloat16(), w_t.bfloat16()
        kinds = {"torch-bf16": lambda: a16 @ w16.t(),
                 "torch-fp8": lambda: torch._scaled_mm(a8, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16,
                                                       use_fast_accum=True)}
        for kind, fn in kinds.items():
            fn()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(iters):
                fn()
            torch.cuda.synchronize()
            secs = (time.perf_counter() - t) / iters
            rows.append({"tokens": tokens, "product": f"{name} {direction}", "k": k, "n": n, "kind": kind,
                         "ms": round(1e3 * secs, 3), "tflops": round(2 * tokens * k * n / secs / 1e12, 1),
                         "rel_err": None, "gemm": "torch", "device": torch.cuda.get_device_name()})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def timed(fn, *args, iters: int) -> float:
    fn(*args).block_until_ready()
    t = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    out.block_until_ready()
    return (time.perf_counter() - t) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1024,4096")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--kinds", default="bf16,fp8,fp8-kmajor,qdq,jaxlora", help="which of the ways above to time")
    ap.add_argument("--torch", action="store_true", help="time PyTorch's bf16 and FP8 GEMMs instead")
    args = ap.parse_args()
    rows = []
    for tokens in map(int, args.tokens.split(",")):
        if args.torch:
            rows += torch_rows(tokens, args.iters)
            continue
        for name, k, n, direction in PRODUCTS:
            ka, kw = jax.random.split(jax.random.key(tokens + k + n))
            a = jax.random.normal(ka, (tokens, k), jnp.float32)
            w = 0.02 * jax.random.normal(kw, (k, n) if direction == "fwd" else (n, k), jnp.float32)
            ref = jnp.dot(a, w if direction == "fwd" else w.T, precision="highest")
            sw, sa = per_tensor_scale(w), per_tensor_scale(a)
            wq, aq = to_e4m3(w, sw), to_e4m3(a, sa)
            wq_kmajor = wq.T if direction == "fwd" else wq  # the contracted axis last
            a16 = a.astype(jnp.bfloat16)
            inputs = {"bf16": (a16, w.astype(jnp.bfloat16), None), "fp8": (aq, wq, sa * sw),
                      "fp8-kmajor": (aq, jnp.asarray(wq_kmajor), sa * sw), "qdq": (a16, wq, sw),
                      "jaxlora": (a16, quantize_kernel_as(w, "fp8"), None)}
            for kind, fn in ways(direction).items():
                if kind not in args.kinds.split(","):
                    continue
                operands = inputs[kind]
                secs = timed(fn, *operands, iters=args.iters)
                out = fn(*operands).astype(jnp.float32)
                err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
                row = {"tokens": tokens, "product": f"{name} {direction}", "k": k, "n": n, "kind": kind,
                       "ms": round(1e3 * secs, 3), "tflops": round(2 * tokens * k * n / secs / 1e12, 1),
                       "rel_err": round(err, 5), "gemm": gemms_of(fn, *operands),
                       "device": jax.devices()[0].device_kind}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\n{'tokens':>6} {'product':<11} {'kind':<10} {'ms':>8} {'TFLOP/s':>8} {'rel err':>8}  gemm")
    for r in rows:
        print(f"{r['tokens']:>6} {r['product']:<11} {r['kind']:<10} {r['ms']:>8} {r['tflops']:>8} "
              f"{str(r['rel_err']):>8}  {r['gemm']}")


if __name__ == "__main__":
    main()
