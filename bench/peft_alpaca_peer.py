"""PyTorch peer for issue 18: real tokens/s (padding excluded) of HF transformers + PEFT LoRA on
instruction data with Alpaca's length profile, batched as lit-llama and PEFT users batch it.

The other side is `bench/train_throughput.py --alpaca N` (train.py's step, bucketed and packed), run
on the same card in the same call. Both train on the same samples: bench/alpaca_profile.py draws the
N lengths and random token ids from the seed, and `batch_order` visits them in train.py's Batcher
order, so optimizer step i holds the same --batch samples on both sides and micro-batch k of it the
same --micro_batch samples (rows k*micro .. k*micro+micro-1 of the step, as the Batcher lays them).

How the batches differ: the Batcher pads every micro-batch of a step to one bucket length
(64/128/256) that holds the step's longest sample, so with 128 samples and Alpaca's tail nearly
every step is padded to 256. This peer pads each micro-batch to its own longest sample, rounded up
to a multiple of --pad_multiple (1: exactly the longest, as lit-llama's `get_batch`; the default 64
bounds the shapes torch.compile sees, at 256 four). Samples are cut at --max_seq_length (256, as
lit-llama; 2048 to train the tails as the packed run does). lit-llama itself draws each micro-batch
with replacement (torch.randint); we do not, so that both sides see the same samples. Inputs are
padded with 0, labels with -100 and the loss skips them (mean over a micro-batch's targets divided
by the micro-batches per step, lit-llama's gradient accumulation); no attention mask unless
--attention_mask (right padding under a causal mask: real tokens never attend to padding).

Model: LlamaForCausalLM with random bf16 weights at a preset's shapes (the PEFT peers' presets),
SDPA attention, PEFT LoRA r=8, alpha 16, dropout 0.05 on q_proj,v_proj (or --targets all), AdamW
(lr 3e-4) on the adapters, bf16 autocast. No gradient checkpointing.

Timing: first one forward+backward on each distinct micro-batch shape of the run (grads dropped, no
optimizer step; with --compile this is where compiling happens: `compile_s`), then --warmup
optimizer steps (`warmup_s`), then the clock runs over --steps optimizer steps, from a device sync
to the last step's loss read back (each step's loss is read, one sync a step). `graphs_compiled`
counts dynamo's graphs; `graphs_compiled_timed` > 0 would mean a recompile inside the clock. No MFU:
the issue's criteria are ratios of real tokens/s. One JSON line, then a short table.

  python bench/peft_alpaca_peer.py --preset 7B --alpaca 2048 --pad_multiple 1    # eager, lit-llama's padding
  python bench/peft_alpaca_peer.py --preset 7B --alpaca 2048 --compile           # torch.compile, pad to 64s
  python bench/peft_alpaca_peer.py --device cpu --preset tiny --alpaca 16 --batch 8 --steps 1 --warmup 1  # smoke
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import version

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/: the shared modules below

from alpaca_profile import alpaca_samples, batch_order
from peft_qlora_peer import ALL_LINEAR, PRESETS, llama_config, preset_key, sync

PAD_ID, IGNORE = 0, -100  # lit-llama's input padding; HF's ignored label
DYNAMIC = {"auto": None, "on": True, "off": False}  # torch.compile(dynamic=...); auto: dynamic after a shape change


@dataclass(frozen=True)
class MicroBatch:
    ids: torch.Tensor  # (rows, T) int64, padded with PAD_ID
    labels: torch.Tensor  # (rows, T) int64, padded with IGNORE
    real: int  # tokens of the samples (after the cut), padding excluded

    @property
    def padded(self) -> int:
        return self.ids.numel()


def padded_length(longest: int, multiple: int, max_seq_length: int) -> int:
    """The longest sample rounded up to `multiple`, never past max_seq_length."""
    return min(-(-longest // multiple) * multiple, max_seq_length)


def micro_batch(samples: Sequence[dict], max_seq_length: int, multiple: int) -> MicroBatch:
    """The samples cut at max_seq_length, one a row, right-padded to `padded_length` of the longest."""
    cut = [np.asarray(s["input_ids"][:max_seq_length]) for s in samples]
    length = padded_length(max(len(c) for c in cut), multiple, max_seq_length)
    ids = torch.full((len(cut), length), PAD_ID, dtype=torch.long)
    labels = torch.full((len(cut), length), IGNORE, dtype=torch.long)
    for row, (c, s) in enumerate(zip(cut, samples)):
        ids[row, :len(c)] = torch.from_numpy(c.astype(np.int64))
        labels[row, :len(c)] = torch.from_numpy(np.asarray(s["labels"][:len(c)], dtype=np.int64))
    return MicroBatch(ids, labels, sum(len(c) for c in cut))


def plan(samples: Sequence[dict], order: np.ndarray, micro: int, max_seq_length: int,
         multiple: int) -> list[list[MicroBatch]]:
    """Per optimizer step (a row of `order`), its micro-batches of `micro` consecutive samples."""
    if order.shape[1] % micro:
        raise ValueError(f"--batch {order.shape[1]} is not a multiple of --micro_batch {micro}")
    return [[micro_batch([samples[i] for i in step[k:k + micro]], max_seq_length, multiple)
             for k in range(0, len(step), micro)] for step in order]


def masked_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy (float32) averaged over the targets that are not padding."""
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                                       labels[:, 1:].reshape(-1), ignore_index=IGNORE)


def build(preset: str, device: torch.device, r: int = 8, targets: Sequence[str] = ("q_proj", "v_proj")) -> nn.Module:
    """PEFT LoRA over a LlamaForCausalLM with random bf16 weights at `preset`'s shapes, on `device`."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # weights made in bf16 where they live, as from_pretrained(dtype=bf16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(llama_config(preset))
    finally:
        torch.set_default_dtype(default)
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, bias="none",
                                            target_modules=list(targets), task_type="CAUSAL_LM"))


def forward_backward(model: nn.Module, mb: MicroBatch, scale: float, device: torch.device,
                     attention_mask: bool) -> torch.Tensor:
    """One micro-batch's loss, its gradient (times `scale`) accumulated into the adapters."""
    ids, labels = mb.ids.to(device), mb.labels.to(device)
    mask = (labels != IGNORE).long() if attention_mask else None
    with torch.autocast(device.type, dtype=torch.bfloat16):
        logits = model(input_ids=ids, attention_mask=mask).logits
    loss = masked_loss(logits, labels)
    (loss * scale).backward()
    return loss.detach()


def train_step(model: nn.Module, opt: torch.optim.Optimizer, step: Sequence[MicroBatch], device: torch.device,
               attention_mask: bool = False) -> float:
    """One optimizer step over its micro-batches (gradient accumulation); the mean micro-batch loss, read back."""
    total = 0
    for mb in step:
        total = total + forward_backward(model, mb, 1 / len(step), device, attention_mask)
        check_terminated()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return (total / len(step)).item()


def graphs() -> int:
    """Graphs dynamo has compiled so far in this process."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


class Terminated(Exception):
    """SIGTERM (a `timeout` around the run) arrived: the row still reports how far the run got."""


TERMINATED: list[int] = []  # the signal, once it came: torch.compile may swallow the exception itself


def raise_terminated(signum: int, frame: object) -> None:
    TERMINATED.append(signum)
    raise Terminated(f"signal {signum}")


def check_terminated() -> None:
    """Raise between micro-batches if a SIGTERM came while compiling code caught its exception."""
    if TERMINATED:
        raise Terminated(f"signal {TERMINATED[0]}")


def progress(row: dict, phase: str, **fields: object) -> None:
    """Record a finished phase in the row (kept if the run is cut short) and say so on stderr."""
    row.update(fields, phase=phase)
    print(f"peft_alpaca_peer: {phase} {json.dumps(fields)}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace, model: nn.Module, steps: list[list[MicroBatch]], device: torch.device,
        row: dict) -> None:
    """Shape pass, warm-up steps, timed steps: the timing fields, written into `row` as each phase ends."""
    shapes = {}
    for mb in (mb for step in steps for mb in step):
        shapes.setdefault(tuple(mb.ids.shape), mb)
    progress(row, "planned", shapes=len(shapes))
    if args.compile and DYNAMIC[args.dynamic] is False:  # one graph per shape: room for all of them
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(shapes) + 1)
    runner = torch.compile(model, dynamic=DYNAMIC[args.dynamic]) if args.compile else model
    runner.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    start_graphs = graphs()
    t = time.perf_counter()
    for done, mb in enumerate(shapes.values() if args.compile else ()):  # compile every shape before the clock
        forward_backward(runner, mb, 1.0, device, args.attention_mask)
        opt.zero_grad(set_to_none=True)
        row.update(shapes_done=done + 1, graphs_compiled=graphs() - start_graphs)
        check_terminated()
    sync(device)
    progress(row, "compiled", compile_s=round(time.perf_counter() - t, 2), graphs_compiled=graphs() - start_graphs)
    t = time.perf_counter()
    for step in steps[:args.warmup]:
        train_step(runner, opt, step, device, args.attention_mask)
    progress(row, "warmed up", warmup_s=round(time.perf_counter() - t, 2))
    timed_graphs = graphs()
    sync(device)
    t = time.perf_counter()
    for step in steps[args.warmup:]:
        loss = train_step(runner, opt, step, device, args.attention_mask)
    seconds = time.perf_counter() - t
    real = sum(mb.real for step in steps[args.warmup:] for mb in step)
    padded = sum(mb.padded for step in steps[args.warmup:] for mb in step)
    progress(row, "timed", real_tokens=real, padded_tokens=padded, real_tokens_per_s=round(real / seconds, 1),
             padded_tokens_per_s=round(padded / seconds, 1), padding_fraction=round(1 - real / padded, 4),
             step_s=round(seconds / args.steps, 4), loss=round(loss, 4),
             graphs_compiled=graphs() - start_graphs, graphs_compiled_timed=graphs() - timed_graphs)


def bench(args: argparse.Namespace) -> dict:
    """Build, batch, time; the JSON row (with `error` when it failed)."""
    device = torch.device(args.device)
    row = {"peer": "peft-alpaca" + ("+compile" if args.compile else ""), "preset": args.preset,
           "targets": ",".join(args.targets), "r": args.lora_r, "samples": args.alpaca, "seed": args.seed,
           "samples_per_step": args.batch, "micro_batch": args.micro_batch, "max_seq_length": args.max_seq_length,
           "pad_multiple": args.pad_multiple, "attention_mask": args.attention_mask, "compile": args.compile,
           "dynamic": args.dynamic if args.compile else None, "steps": args.steps, "warmup": args.warmup,
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "peft": version("peft"), "transformers": version("transformers"), "torch": torch.__version__}
    model = None
    try:
        samples = alpaca_samples(args.alpaca, PRESETS[args.preset][5], args.seed)
        order = batch_order(len(samples), args.batch, args.warmup + args.steps, args.seed)
        steps = plan(samples, order, args.micro_batch, args.max_seq_length, args.pad_multiple)
        t = time.perf_counter()
        model = build(args.preset, device, args.lora_r, args.targets)
        sync(device)
        row.update(build_s=round(time.perf_counter() - t, 2),
                   trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        run(args, model, steps, device, row)
        if not math.isfinite(row["loss"]):
            row["error"] = f"loss is not finite: {row['loss']}"
        if device.type == "cuda":
            row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
    except Exception as e:  # noqa: BLE001 - an OOM, a compile failure or a timeout is reported as a row
        row["error"] = f"{type(e).__name__}: {str(e)[:400]}" + (f" (after phase {row['phase']!r})" if "phase" in row else "")
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def table(rows: list[dict]) -> str:
    head = (f"{'peer':<20} {'seq':>5} {'pad to':>6} {'real tok/s':>10} {'padded tok/s':>12} {'padding':>7} "
            f"{'shapes':>6} {'graphs':>6} {'compile s':>9} {'peak GiB':>8}")
    lines = [head]
    for r in rows:
        if "real_tokens_per_s" not in r:
            lines.append(f"{r['peer']:<20} {r['max_seq_length']:>5} ERROR {r.get('error', '')[:60]}")
            continue
        lines.append(f"{r['peer']:<20} {r['max_seq_length']:>5} {r['pad_multiple']:>6} {r['real_tokens_per_s']:>10} "
                     f"{r['padded_tokens_per_s']:>12} {r['padding_fraction']:>7} {r['shapes']:>6} "
                     f"{r['graphs_compiled']:>6} {r['compile_s']:>9} {r.get('peak_gib')!s:>8}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="7B", type=preset_key, help=", ".join(PRESETS) + " (any case)")
    ap.add_argument("--alpaca", type=int, default=2048, help="samples of Alpaca's length profile (as ours --alpaca)")
    ap.add_argument("--seed", type=int, default=0, help="lengths, token ids and order (ours: 0)")
    ap.add_argument("--batch", type=int, default=128, help="samples per optimizer step (lit-llama: 128)")
    ap.add_argument("--micro_batch", type=int, default=4, help="samples per forward/backward (lit-llama: 4)")
    ap.add_argument("--max_seq_length", type=int, default=256, help="samples are cut here (lit-llama: 256)")
    ap.add_argument("--pad_multiple", type=int, default=64, help="pad each micro-batch's longest up to a multiple "
                    "of this (1: to the longest exactly, as lit-llama)")
    ap.add_argument("--attention_mask", action="store_true", help="pass HF the padding mask, as its collators do")
    ap.add_argument("--lora_r", type=int, default=8)
    ap.add_argument("--targets", default="q_proj,v_proj", help=f"HF module names, or 'all' ({ALL_LINEAR})")
    ap.add_argument("--compile", action="store_true", help="torch.compile the PEFT model")
    ap.add_argument("--dynamic", default="auto", choices=sorted(DYNAMIC), help="torch.compile's dynamic= "
                    "(auto: static, then dynamic once a shape changes; off: one graph per shape)")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=3, help="optimizer steps before the clock starts")
    ap.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke test on --preset tiny)")
    args = ap.parse_args(argv)
    args.targets = (ALL_LINEAR if args.targets == "all" else args.targets).split(",")
    if min(args.alpaca, args.batch, args.micro_batch, args.max_seq_length, args.pad_multiple, args.steps) < 1 \
            or args.warmup < 0:
        ap.error("sizes and --steps must be >= 1, --warmup >= 0")
    if args.batch % args.micro_batch:
        ap.error(f"--batch {args.batch} is not a multiple of --micro_batch {args.micro_batch}")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no GPU (use --device cpu --preset tiny for a smoke test)")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    signal.signal(signal.SIGTERM, raise_terminated)  # `timeout N python ...` still gets its row
    row = bench(parse_args(argv))
    print(json.dumps(row), flush=True)
    print("\n" + table([row]), flush=True)
    return row


if __name__ == "__main__":
    main()  # a failed run is a JSON row with an `error`; the exit status stays 0, as the other peers'
