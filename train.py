"""LoRA instruction fine-tuning of LLaMA (lit-llama's finetune/lora.py, in JAX).

    python train.py                      # the built-in demo: ~2 minutes on a laptop CPU
    python train.py --preset 7b \\
        --pretrained_path checkpoints/lit-llama/7B/lit-llama.pth \\
        --tokenizer_path checkpoints/lit-llama/tokenizer.model \\
        --data_path data/alpaca/alpaca_data_cleaned.json

The flags are generated from jaxlora.train.settings.TrainArgs (jaxlora.train.cli); the loop is
jaxlora.train.loop.run.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import textwrap
from dataclasses import dataclass

import jax

from jaxlora.config import ADAPTERS_DIR, LIT_LORA_FILE
from jaxlora.errors import run_command
from jaxlora.model import fp8
from jaxlora.parallel import distributed
from jaxlora.train import cli, loop, memory, settings

DEMO = settings.DEMO_PROFILE

EPILOG = f"""\
defaults: every flag left out takes its value from one of two profiles.
  --preset 7b/13b/30b/65b  lit-llama's finetune/lora.py recipe: r=8, alpha=16, dropout 0.05 on q,v;
                           AdamW lr 3e-4, weight decay 0.01, betas (0.9, 0.999); batch 128 = 32 x 4;
                           100 linear warmup steps, then constant; 256 tokens; 1,171 steps (~3 epochs
                           of Alpaca); eval (100 batches) and checkpoint every 100 steps; bf16-true;
                           files where lit-llama keeps them (checkpoints/lit-llama/..., data/alpaca).
  anything else / no flags the built-in demo: preset 'demo', the base model, tokenizer and instruction
                           data shipped in jaxlora/demo/, sizes for a ~2 minute CPU run, and an
                           exact-match score on {DEMO['exact_match_samples']} held-out prompts before and after.
  Each flag's help shows both defaults as [demo | lit-llama].

outputs in --out_dir: checkpoints/ (orbax: adapters, optimizer state, step, RNG, data position;
  the last --keep_checkpoints kept; also written on Ctrl-C), {ADAPTERS_DIR}/ (the adapters as a jaxlora
  directory: convert/to_lit_llama.py --adapters ... --merged gives a merged lit-llama checkpoint),
  metrics.jsonl (one line per step and per evaluation), loss.png, summary.json, and {LIT_LORA_FILE}
  (lit-llama's LoRA file; q,v adapters only; needs torch), peft/ (a PEFT LoRA folder for HF
  transformers and vLLM).

several devices and hosts: the run spans every device JAX sees (--mesh). The default layout:
{textwrap.fill(settings.DEFAULT_MESH.capitalize(), 96, initial_indent="  ", subsequent_indent="  ")}
  Several hosts: start the same command on each with --coordinator_address HOST:PORT
  --num_processes N --process_id I (or under SLURM / on a TPU pod slice, with none of them).

GPU memory: before JAX starts, train.py estimates the run's memory per GPU. When JAX's default
  share (75%) is too small and the card is not, it sets {memory.FRACTION_VAR}
  (unless you did) and says so; when the card is too small, it stops before loading anything.
  {memory.CARDS_VAR}=MiB[,MiB...] gives the cards' memory where nvidia-smi cannot.
  With --quantize fp8 it adds {fp8.CUBLAS_GEMMS} to XLA_FLAGS (unless they name
  that flag): XLA's Triton FP8 GEMMs are slower than bf16, cuBLASLt's are not.
"""


@dataclass
class HostFlags:
    """The multi-host flags (given to `jaxlora.parallel.distributed.initialize`, not to the run)."""

    coordinator_address: str | None = settings.setting(
        "multi-host: HOST:PORT of process 0 (with --num_processes and --process_id; left out under "
        "SLURM/MPI/TPU pods, which say it themselves)", settings.DEVICES)
    num_processes: int | None = settings.setting("multi-host: how many processes (one per host) take part",
                                                 settings.DEVICES)
    process_id: int | None = settings.setting("multi-host: this process's index, 0 .. num_processes-1",
                                              settings.DEVICES)


def build_parser() -> argparse.ArgumentParser:
    """The flags of every TrainArgs field and of HostFlags; the module docstring's examples on top."""
    return cli.build_parser(__doc__.split("\nThe flags are")[0], EPILOG, HostFlags)


def args_from_cli(argv: list[str] | None = None) -> tuple[settings.TrainArgs, dict]:
    """(the run's settings, the multi-host flags). Flags left out keep TrainArgs' defaults."""
    values = vars(build_parser().parse_args(argv))
    hosts = {f.name: values[f.name] for f in dataclasses.fields(HostFlags)}
    return cli.train_args(values), hosts


def enable_compilation_cache() -> None:
    """Keep compiled programs on disk (JAXLORA_COMPILE_CACHE, default ~/.cache/jaxlora/xla), so a
    rerun or --resume skips compilation: ~2 minutes per batch length for a fully unrolled 7B."""
    path = os.environ.get("JAXLORA_COMPILE_CACHE", os.path.expanduser("~/.cache/jaxlora/xla"))
    if path:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(argv: list[str] | None = None) -> int:
    args, hosts = args_from_cli(argv)
    return run_command("train.py", lambda: _train(args, hosts), on_interrupt="interrupted; continue with --resume")


def _train(args: settings.TrainArgs, hosts: dict) -> None:
    # Before JAX starts its GPU backend, which reads the allocator's share once: 65B on one 141 GB
    # card needs more than the default 75% (jaxlora.train.memory).
    primary = hosts["process_id"] in (None, 0)
    plan = memory.prepare_device_memory(args, hosts["num_processes"],
                                        lambda msg: print(msg, flush=True) if primary else None)
    if plan is not None and plan.fp8_both_layouts is not None:  # --quantize fp8's second layout, decided there
        args = dataclasses.replace(args, fp8_both_layouts=plan.fp8_both_layouts)
    # Likewise XLA_FLAGS: FP8 products of kernels in one layout are fast through cuBLASLt, not XLA's
    # Triton GEMMs (jaxlora.model.fp8).
    if fp8.set_xla_flags(args.quantize, os.environ, bool(args.fp8_both_layouts)):
        if primary and memory.visible_gpus(os.environ):
            print(f"fp8: added {fp8.CUBLAS_GEMMS} to XLA_FLAGS (kernels in one layout: their FP8 GEMMs through "
                  "cuBLASLt; XLA's Triton ones are slower than bf16; name the flag in XLA_FLAGS yourself to "
                  "choose)", flush=True)
    distributed.initialize(**hosts)  # before anything else touches JAX
    enable_compilation_cache()
    loop.run(args)


if __name__ == "__main__":
    sys.exit(main())
