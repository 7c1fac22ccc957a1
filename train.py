"""LoRA instruction fine-tuning of LLaMA (lit-llama's finetune/lora.py, in JAX).

    python train.py                      # the built-in demo: ~2 minutes on a laptop CPU
    python train.py --preset 7b \\
        --pretrained_path checkpoints/lit-llama/7B/lit-llama.pth \\
        --tokenizer_path checkpoints/lit-llama/tokenizer.model \\
        --data_path data/alpaca/alpaca_data_cleaned.json

This file only parses flags; the loop is jaxlora.train.loop.run.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from jaxlora.config import ADAPTERS_DIR, LIT_LORA_FILE
from jaxlora.train import settings

DEMO, LIT = settings.DEMO_PROFILE, settings.LIT_LLAMA_RECIPE
DEFAULTS = {f.name: f.default for f in dataclasses.fields(settings.TrainArgs)}

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

several devices and hosts: the run spans every device JAX sees (--mesh, default: data parallel
  while the model fits one device, else tensor parallel over the fewest devices of a host that
  hold it).
  Several hosts: start the same command on each with --coordinator_address HOST:PORT
  --num_processes N --process_id I (or under SLURM / on a TPU pod slice, with none of them).
"""


def _d(name: str, fmt: str = "{}") -> str:
    """Both profiles' defaults of a flag, or TrainArgs' own default where no profile sets it."""
    if name not in DEMO and name not in LIT:
        return f" (default {DEFAULTS[name]})"
    demo, lit = DEMO.get(name), LIT.get(name)
    show = lambda v: "-" if v is None else (fmt.format(v) if not isinstance(v, str) else v)  # noqa: E731
    return f" [{show(demo)} | {show(lit)}]"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="LoRA instruction fine-tuning of LLaMA in JAX, compatible with lit-llama.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and files")
    g.add_argument("--preset", help="model size: 7b, 13b, 30b, 65b (lit-llama's presets; selects lit-llama's "
                   "recipe as defaults), or demo/tiny. Checked against the weights; inferred from a lit-llama "
                   "checkpoint when left out with --pretrained_path" + _d("preset"))
    g.add_argument("--pretrained_path", help="frozen base weights: a lit-llama .pth file (read tensor by "
                   "tensor, no torch needed), a jaxlora checkpoint directory (convert/from_lit_llama.py) or a "
                   "Hugging Face LLaMA directory (config.json + safetensors); 'none' for random weights "
                   "(smoke tests)" + _d("pretrained_path"))
    g.add_argument("--tokenizer_path", help="SentencePiece tokenizer.model" + _d("tokenizer_path"))
    g.add_argument("--data_path", help="Alpaca-style data: a JSON list (or JSONL) of {instruction, input, "
                   "output} records, split into train/validation here; or a directory with lit-llama's "
                   "prepared train.pt and test.pt" + _d("data_path"))
    g.add_argument("--out_dir", help="where checkpoints, metrics and the adapters go" + _d("out_dir"))
    g.add_argument("--resume", action="store_true", help="continue the run in --out_dir from its latest "
                   "checkpoint (adapters, optimizer, step, RNG and data position), bit-identically; the "
                   "run-defining flags must be the same")

    g = p.add_argument_group("LoRA")
    g.add_argument("--lora_r", type=int, help="adapter rank" + _d("lora_r"))
    g.add_argument("--lora_alpha", type=float, help="adapter scale numerator (scaling = alpha / r)" + _d("lora_alpha"))
    g.add_argument("--lora_dropout", type=float, help="dropout on the adapter input" + _d("lora_dropout"))
    g.add_argument("--lora_targets", help="comma-separated projections with adapters: q,k,v,o,gate,up,down, "
                   "or 'all' (PEFT names like q_proj also work); lit-llama's LoRA file is written for q,v only"
                   + _d("lora_targets"))

    g = p.add_argument_group("optimization")
    g.add_argument("--learning_rate", type=float, help="peak AdamW learning rate" + _d("learning_rate", "{:g}"))
    g.add_argument("--weight_decay", type=float, help="AdamW decoupled weight decay (lit-llama's effective "
                   "value is torch's default 0.01)" + _d("weight_decay", "{:g}"))
    g.add_argument("--warmup_steps", type=int, help="linear warmup from 0 over this many optimizer steps"
                   + _d("warmup_steps"))
    g.add_argument("--schedule", choices=list(settings.SCHEDULES), help="after warmup: constant "
                   "(lit-llama), or cosine/linear decay to 10%% at the last step" + _d("schedule"))
    g.add_argument("--grad_clip", type=float, help="clip the global gradient norm to this; 0 = off (lit-llama "
                   "does not clip)" + _d("grad_clip", "{:g}"))
    g.add_argument("--batch_size", type=int, help="samples per optimizer step" + _d("batch_size"))
    g.add_argument("--micro_batch_size", type=int, help="samples per forward/backward pass on each batch shard "
                   "of the mesh (data x fsdp devices); gradients are accumulated over batch_size / (micro_batch_size "
                   "x shards) of them inside one jitted step" + _d("micro_batch_size"))
    length = p.add_argument_group("run length").add_mutually_exclusive_group()
    length.add_argument("--max_steps", type=int, help="optimizer steps to train" + _d("max_steps"))
    length.add_argument("--epochs", type=float, help="passes over the training data instead of --max_steps "
                        "(each epoch in a new shuffled order)")
    g.add_argument("--max_seq_length", type=int, help="tokens per sample (longer ones are truncated); batches "
                   "are padded to a few bucket lengths up to this" + _d("max_seq_length"))
    g.add_argument("--mask_inputs", action=argparse.BooleanOptionalAction, help="no loss on the prompt tokens "
                   "(lit-llama's mask_inputs); validation loss is then over response tokens only"
                   + _d("mask_inputs"))
    g.add_argument("--seed", type=int, help="adapter init, dropout and data order" + _d("seed"))
    g.add_argument("--precision", choices=list(settings.PRECISIONS), help="bf16-true: bf16 frozen weights and "
                   "compute (lit-llama); bf16-mixed: f32 weights, bf16 compute; 32-true: all f32 (use on CPU). "
                   "Adapters and optimizer state are always f32" + _d("precision"))
    g.add_argument("--remat", choices=list(settings.REMAT_POLICIES),
                   help="activation rematerialization per layer: none keeps everything; dots/dots_no_batch keep "
                   "matmul outputs and recompute the rest (less memory, and faster on an H100); full recomputes "
                   "each layer" + _d("remat"))
    g.add_argument("--scan_layers", action=argparse.BooleanOptionalAction, help="run the layers as one scan "
                   "over stacked weights (compiles in seconds); --no-scan_layers loops over per-layer weights "
                   "(fastest on GPU, ~30 s compile per batch length at 7B on an H100)" + _d("scan_layers"))
    g.add_argument("--scan_unroll", type=int, help="layers per scan iteration with --scan_layers; 0 unrolls "
                   "the scan" + _d("scan_unroll"))
    g.add_argument("--attention", choices=list(settings.ATTENTION_IMPLS), help="attention kernel: auto = cuDNN "
                   "flash attention on a GPU with 16-bit compute, else XLA" + _d("attention"))
    g.add_argument("--loss_chunk", type=int, help="tokens per cross-entropy chunk (the float32 logits of one "
                   "chunk at a time); 0 = the whole micro-batch at once" + _d("loss_chunk"))
    g.add_argument("--rng_impl", choices=list(settings.RNG_IMPLS), help="PRNG of the dropout masks; rbg is "
                   "cheaper on GPUs, its masks depend on the mesh" + _d("rng_impl"))

    g = p.add_argument_group("devices and hosts")
    g.add_argument("--mesh", help="device mesh 'data=D,fsdp=F,tensor=T' (axes left out are 1; data=-1 or left "
                   "out takes the devices the others leave). data: replicas of the frozen model; fsdp: the "
                   "frozen weights sharded and gathered layer by layer; tensor: heads and MLP split (stays within "
                   "a host). Default: data over every device while the weights fit one device, else fsdp over "
                   "the fewest devices that hold them")
    g.add_argument("--coordinator_address", help="multi-host: HOST:PORT of process 0 (with --num_processes and "
                   "--process_id; left out under SLURM/MPI/TPU pods, which say it themselves)")
    g.add_argument("--num_processes", type=int, help="multi-host: how many processes (one per host) take part")
    g.add_argument("--process_id", type=int, help="multi-host: this process's index, 0 .. num_processes-1")

    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--val_size", type=float, help="validation records split off the data (a count, or a "
                   "fraction < 1); split with seed 42" + _d("val_size"))
    g.add_argument("--eval_interval", type=int, help="validate every this many steps" + _d("eval_interval"))
    g.add_argument("--eval_iters", type=int, help="validation micro-batches per evaluation (the same first "
                   "eval_iters x micro_batch_size validation samples each time)" + _d("eval_iters"))
    g.add_argument("--save_interval", type=int, help="checkpoint every this many steps (and at the end)"
                   + _d("save_interval"))
    g.add_argument("--keep_checkpoints", type=int, help="finished checkpoints to keep" + _d("keep_checkpoints"))
    g.add_argument("--exact_match_samples", type=int, help="held-out prompts whose greedy response is "
                   "compared with the reference before and after training; 0 = off" + _d("exact_match_samples"))
    g.add_argument("--max_new_tokens", type=int, help="length limit of sample generations" + _d("max_new_tokens"))
    g.add_argument("--sample_instruction", help="fixed instruction answered (greedily) at every evaluation"
                   + _d("sample_instruction"))
    g.add_argument("--no_progress", action="store_true", help="no progress bar")
    g.add_argument("--no_plot", action="store_true", help="do not write loss.png")
    return p


DISTRIBUTED_FLAGS = ("coordinator_address", "num_processes", "process_id")


def args_from_cli(argv: list[str] | None = None) -> tuple[settings.TrainArgs, dict]:
    """(the run's settings, the multi-host flags). Flags left out keep TrainArgs' defaults."""
    values = {k: v for k, v in vars(build_parser().parse_args(argv)).items()}
    hosts = {k: values.pop(k) for k in DISTRIBUTED_FLAGS}
    progress, plot = not values.pop("no_progress"), not values.pop("no_plot")
    values = {k: v for k, v in values.items() if v is not None}
    return settings.TrainArgs(**values, progress=progress, plot=plot), hosts


def enable_compilation_cache() -> None:
    """Keep compiled programs on disk (JAXLORA_COMPILE_CACHE, default ~/.cache/jaxlora/xla), so a
    rerun or --resume skips compilation: ~2 minutes per batch length for a fully unrolled 7B."""
    import jax
    path = os.environ.get("JAXLORA_COMPILE_CACHE", os.path.expanduser("~/.cache/jaxlora/xla"))
    if path:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(argv: list[str] | None = None) -> int:
    args, hosts = args_from_cli(argv)
    try:
        from jaxlora.parallel import distributed
        distributed.initialize(**hosts)  # before anything else touches JAX
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    enable_compilation_cache()
    from jaxlora.train import loop as trainer
    try:
        trainer.run(args)
    except trainer.NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, trainer.TrainingError, trainer.CheckpointError) as e:
        # the user's inputs or files (DataError, StateDictError, ...); anything else is a bug and keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; continue with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
