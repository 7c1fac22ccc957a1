"""PyTorch QLoRA peer: LoRA training steps of a LLaMA-shaped model whose frozen linears are bitsandbytes-quantized.

The PyTorch figure for issue 19 (quantized frozen base), run beside bench/train_throughput.py's
`--variants quantize=nf4-dq` on the same card in the same call. The stack is the one QLoRA users run:
HF transformers' LlamaForCausalLM, every decoder linear a bitsandbytes layer (`Linear4bit` NF4, with
or without double-quantized absmax, or `Linear8bitLt` LLM.int8 with frozen int8 weights), compute
dtype bf16, PEFT's `prepare_model_for_kbit_training` (freezes the base, upcasts embeddings, norms and
lm_head to fp32), PEFT LoRA (fp32 adapters, dropout 0.05, alpha = 2r), AdamW on the adapters, bf16
autocast as HF's Trainer runs with bf16=True. No gradient checkpointing unless --grad_ckpt.

Random weights at real shapes: the model skeleton is built on the meta device, then each decoder
linear gets random bf16 weights on the device and is quantized at once, layer by layer, so the
device never holds the bf16 model. Random token ids. Timing as the PEFT peer: warm-up steps, then
each measured step timed alone between two device syncs; the median is reported. One JSON line a
shape (field names as the PEFT peer's where they overlap), then a short table.

  PYTHONPATH=/tmp/site python3 bench/peft_qlora_peer.py --preset 7B --shapes 4x256,8x512 --quant nf4-dq
  PYTHONPATH=/tmp/site python3 bench/peft_qlora_peer.py --preset 7B --quant int8 --compile
  python bench/peft_qlora_peer.py --device cpu --preset tiny --shapes 2x32 --steps 2 --warmup 1  # CPU smoke

The int8 layers use `--int8_threshold` 6.0 by default (HF's `BitsAndBytesConfig` default: activation
columns past it run in fp16); 0 gives int8 products throughout.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from collections.abc import Sequence
from importlib.metadata import version

import torch
from torch import nn

# n_layer, n_head, n_kv_head, n_embd, n_hidden, vocab, rope_theta (the PEFT peer's presets, plus 65B and tiny)
PRESETS = {
    "tiny": (2, 4, 2, 128, 256, 256, 1e4),  # CPU tests: every dimension a multiple of NF4's block of 64
    "7B": (32, 32, 32, 4096, 11008, 32000, 1e4),  # LLaMA-1 shapes, as lit-llama
    "13B": (40, 40, 40, 5120, 13824, 32000, 1e4),
    "30B": (60, 52, 52, 6656, 17920, 32000, 1e4),
    "65B": (80, 64, 64, 8192, 22016, 32000, 1e4),
    "llama3.1-8b": (32, 32, 8, 4096, 14336, 128256, 5e5),
}
ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
QUANTS = ("nf4", "nf4-dq", "int8")
INIT_STD = 0.02  # LlamaConfig's initializer_range


def preset_key(name: str) -> str:
    """Case-insensitive preset lookup ('7b' -> '7B')."""
    for key in PRESETS:
        if key.lower() == name.lower():
            return key
    raise argparse.ArgumentTypeError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")


def parse_shapes(spec: str) -> list[tuple[int, int]]:
    """'4x256,8x512' -> [(4, 256), (8, 512)]."""
    try:
        shapes = [tuple(int(v) for v in item.split("x")) for item in spec.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"--shapes takes BATCHxSEQ,... (e.g. 4x256,8x512), got {spec!r}")
    return shapes


def llama_config(preset: str):  # -> transformers.LlamaConfig
    from transformers import LlamaConfig

    n_layer, n_head, n_kv, n_embd, n_hidden, vocab, theta = PRESETS[preset]
    cfg = LlamaConfig(hidden_size=n_embd, intermediate_size=n_hidden, num_hidden_layers=n_layer,
                      num_attention_heads=n_head, num_key_value_heads=n_kv, vocab_size=vocab,
                      max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=theta, use_cache=False)
    cfg._attn_implementation = "sdpa"
    return cfg


def quantized_linear(weight: torch.Tensor, quant: str, int8_threshold: float) -> nn.Module:
    """A bitsandbytes layer holding `weight` (out, in; bf16, on its device) quantized, built as HF's loader builds it."""
    import bitsandbytes as bnb

    n_out, n_in = weight.shape
    if quant == "int8":
        layer = bnb.nn.Linear8bitLt(n_in, n_out, bias=False, has_fp16_weights=False, threshold=int8_threshold,
                                    device="meta")
        # Int8Params.to() quantizes only on the way from the CPU; our weights are already on the device.
        codes, scales, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16))
        layer.weight = bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False, CB=codes, SCB=scales)
        return layer
    double = quant == "nf4-dq"
    layer = bnb.nn.Linear4bit(n_in, n_out, bias=False, compute_dtype=torch.bfloat16, compress_statistics=double,
                              quant_type="nf4", device="meta")
    param = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=double, quant_type="nf4",
                              module=layer)
    layer.weight = param.to(weight.device)  # .to() on an unquantized Params4bit quantizes (blocks of 64)
    return layer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quantize_decoder(model: nn.Module, quant: str, device: torch.device, int8_threshold: float) -> float:
    """Give every decoder nn.Linear random bf16 weights on `device`, quantize them and swap the layer in,
    one matrix at a time. Returns the seconds spent inside the quantizer (synced)."""
    seconds = 0.0
    for block in model.model.layers:
        for name, linear in list(block.named_modules()):
            if not isinstance(linear, nn.Linear):
                continue
            if linear.bias is not None:
                raise ValueError(f"decoder linear {name} has a bias; the peer's presets have none")
            weight = torch.empty(linear.out_features, linear.in_features, dtype=torch.bfloat16, device=device)
            weight.normal_(0.0, INIT_STD)
            sync(device)
            start = time.perf_counter()
            layer = quantized_linear(weight, quant, int8_threshold)
            sync(device)
            seconds += time.perf_counter() - start
            del weight
            parent, _, leaf = name.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, leaf, layer)
    return seconds


def materialize(model: nn.Module, device: torch.device) -> None:
    """Random bf16 values for the parameters still on the meta device (embeddings, lm_head: normal; norms: ones),
    and RoPE's tables rebuilt on `device`."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                value = torch.empty(param.shape, dtype=torch.bfloat16, device=device)
                value.fill_(1.0) if param.dim() == 1 else value.normal_(0.0, INIT_STD)
                setattr(module, name, nn.Parameter(value, requires_grad=False))
    rotary = model.model.rotary_emb
    with torch.device(device):
        model.model.rotary_emb = type(rotary)(config=model.config)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device after building the model: {left[:5]}")


def build(preset: str, quant: str, device: torch.device, r: int = 8, targets: Sequence[str] = ("q_proj", "v_proj"),
          grad_ckpt: bool = False, int8_threshold: float = 6.0) -> tuple[nn.Module, dict]:
    """The PEFT QLoRA model at `preset`'s shape on `device`, and build facts (quantize_s, build_s, weights_gib)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import LlamaForCausalLM

    if quant not in QUANTS:
        raise ValueError(f"--quant must be one of {QUANTS}, got {quant!r}")
    start = time.perf_counter()
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(preset))
    quantize_s = quantize_decoder(model, quant, device, int8_threshold)
    materialize(model, device)
    # PEFT picks its bnb LoRA layers by these flags, which HF's quantized loader sets.
    model.is_loaded_in_4bit, model.is_loaded_in_8bit = quant != "int8", quant == "int8"
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=grad_ckpt,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, bias="none",
                                             target_modules=list(targets), task_type="CAUSAL_LM"))
    sync(device)
    facts = {"quantize_s": round(quantize_s, 3), "build_s": round(time.perf_counter() - start, 3)}
    if device.type == "cuda":
        facts["weights_gib"] = round(torch.cuda.memory_allocated(device) / 2**30, 2)
    return model, facts


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> torch.Tensor:
    """Forward, backward and AdamW step on one batch of token ids (next-token loss); returns the loss."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        logits = model(input_ids=x).logits
    loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), x[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)


def time_steps(model: nn.Module, batch: int, seq: int, vocab: int, steps: int, warmup: int,
               device: torch.device) -> tuple[float, float, float]:
    """Median synced seconds per step over `steps` after `warmup`, the first step's seconds (with --compile:
    mostly compiling), and the last loss."""
    model.train()
    opt = optimizer(model)
    gen = torch.Generator(device=device).manual_seed(0)
    xs = [torch.randint(0, vocab, (batch, seq), device=device, generator=gen) for _ in range(4)]
    times = []
    for i in range(warmup + steps):
        sync(device)
        start = time.perf_counter()
        loss = train_step(model, opt, xs[i % len(xs)])
        sync(device)
        times.append(time.perf_counter() - start)
    measured = sorted(times[warmup:])
    return measured[len(measured) // 2], times[0], loss.item()


def bench(args: argparse.Namespace, batch: int, seq: int) -> dict:
    """Build, quantize, (compile,) train one shape; the JSON row (with `error` when it failed)."""
    import bitsandbytes

    device = torch.device(args.device)
    row = {"peer": f"peft+bnb-{args.quant}" + ("+compile" if args.compile else ""), "preset": args.preset,
           "quant": args.quant, "targets": ",".join(args.targets), "batch": batch, "seq": seq, "r": args.lora_r,
           "grad_ckpt": args.grad_ckpt, "compile": args.compile, "bitsandbytes": bitsandbytes.__version__,
           "peft": version("peft"), "transformers": version("transformers"), "torch": torch.__version__}
    if args.quant == "int8":
        row["int8_threshold"] = args.int8_threshold
    row["gpu"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    model = None
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        model, facts = build(args.preset, args.quant, device, args.lora_r, args.targets, args.grad_ckpt,
                             args.int8_threshold)
        row.update(facts, trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))
        if device.type == "cuda":  # the build's peak (the quantizer's) apart from training's
            row["build_peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            torch.cuda.empty_cache()  # so that peak_reserved_gib counts training's blocks, not the quantizer's
            torch.cuda.reset_peak_memory_stats(device)
        runner = torch.compile(model) if args.compile else model
        step_s, first_s, loss = time_steps(runner, batch, seq, PRESETS[args.preset][5], args.steps, args.warmup,
                                           device)
        row.update(step_s=round(step_s, 4), tokens_per_s=round(batch * seq / step_s, 1), loss=round(loss, 4),
                   first_step_s=round(first_s, 3))
        if not math.isfinite(loss):
            row["error"] = f"loss is not finite: {loss}"
        if device.type == "cuda":
            row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
    except Exception as e:  # noqa: BLE001 - a failed shape (OOM, compile) is reported and the next one runs
        row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    finally:
        del model
        gc.collect()
        if args.compile:
            torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def table(rows: list[dict]) -> str:
    head = (f"{'shape':>9} {'peer':<28} {'tok/s':>9} {'step s':>8} {'peak GiB':>8} {'reserved':>8} "
            f"{'weights':>7} {'quant s':>7}")
    lines = [head]
    for r in rows:
        shape = f"{r['batch']}x{r['seq']}"
        if "tokens_per_s" not in r:
            lines.append(f"{shape:>9} {r['peer']:<28} ERROR {r.get('error', '')[:60]}")
            continue
        lines.append(f"{shape:>9} {r['peer']:<28} {r['tokens_per_s']:>9} {r['step_s']:>8} "
                     f"{r.get('peak_gib')!s:>8} {r.get('peak_reserved_gib')!s:>8} "
                     f"{r.get('weights_gib')!s:>7} {r['quantize_s']:>7}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="7B", type=preset_key, help=", ".join(PRESETS) + " (any case)")
    ap.add_argument("--shapes", default="4x256,8x512", type=parse_shapes, help="BATCHxSEQ,...")
    ap.add_argument("--quant", default="nf4-dq", choices=QUANTS,
                    help="nf4: bnb Linear4bit NF4; nf4-dq: NF4 with double quantization (QLoRA); "
                         "int8: bnb Linear8bitLt, int8 weights")
    ap.add_argument("--int8_threshold", type=float, default=6.0, help="LLM.int8 outlier threshold (int8 only)")
    ap.add_argument("--lora_r", type=int, default=8)
    ap.add_argument("--targets", default="q_proj,v_proj", help=f"HF module names, or 'all' ({ALL_LINEAR})")
    ap.add_argument("--grad_ckpt", action="store_true", help="gradient checkpointing (QLoRA's recipe turns it on)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the PEFT model; a failure is reported")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke test on --preset tiny)")
    args = ap.parse_args(argv)
    args.targets = (ALL_LINEAR if args.targets == "all" else args.targets).split(",")
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no GPU (use --device cpu --preset tiny for a smoke test)")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    rows = []
    for batch, seq in args.shapes:
        rows.append(bench(args, batch, seq))
        print(json.dumps(rows[-1]), flush=True)
    print("\n" + table(rows), flush=True)
    return rows


if __name__ == "__main__":
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        sys.exit(f"bitsandbytes is not importable ({e}): install its wheel, e.g. into /tmp/site with "
                 "PYTHONPATH=/tmp/site")
    main()  # failed shapes are JSON rows with an `error`; the exit status stays 0, as the PEFT peer's
