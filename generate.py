"""Generate text with a LLaMA (and its LoRA adapters): lit-llama's generate.py / generate/lora.py, in JAX.

    python generate.py                                   # the built-in demo model (+ out/demo's adapters)
    python generate.py --prompt "What food do lamas eat?" --pretrained_path checkpoints/lit-llama/7B/lit-llama.pth \\
        --lora_path out/lora/alpaca/lit-llama-lora-finetuned.pth --tokenizer_path checkpoints/lit-llama/tokenizer.model
    python generate.py --checkpoint_dir checkpoints/jaxlora/7B --adapters out/lora/alpaca/adapters --quantize int8

The response streams to stdout as it is generated; time to first token and tokens/s go to
stderr. This file only parses flags; decoding is jaxlora.infer.decode, loading jaxlora.infer.load.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

LIT_TOKENIZER = "checkpoints/lit-llama/tokenizer.model"
LIT_PROMPT = "What food do lamas eat?"  # lit-llama's generate/lora.py default


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("prompt")
    g.add_argument("--prompt", help=f"the instruction (default: {LIT_PROMPT!r}; the demo's sample instruction "
                   "with no model flags)")
    g.add_argument("--input", default="", help="optional input (context) for the instruction")
    g.add_argument("--template", choices=["auto", "alpaca", "none"], default="auto",
                   help="alpaca: wrap the prompt in lit-llama's Alpaca template and print the response; none: "
                   "continue the raw prompt; auto (default): alpaca with adapters or the demo, else none")
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint_dir", help="jaxlora checkpoint directory (convert/from_lit_llama.py), with its "
                   "adapters if it has them")
    g.add_argument("--pretrained_path", help="base weights: lit-llama's .pth, a Hugging Face LLaMA directory or a jaxlora "
                   "checkpoint directory")
    g.add_argument("--adapters", help="adapters-only directory (train.py's OUT_DIR/adapters); alone, its "
                   "config.json names the base")
    g.add_argument("--lora_path", help="lit-llama LoRA file (lit-llama-lora-finetuned.pth)")
    g.add_argument("--lora_alpha", type=float, default=16.0, help="alpha of --lora_path (not stored in the "
                   "file; default 16)")
    g.add_argument("--tokenizer_path", help=f"SentencePiece tokenizer.model (default: {LIT_TOKENIZER}; the "
                   "demo's with no model flags)")
    g.add_argument("--quantize", choices=["int8", "llm.int8"], help="weight-only int8 kernels (half the weight "
                   "bytes per token); llm.int8 is accepted as lit-llama's name")
    g.add_argument("--unmerged", action="store_true", help="apply the adapters unmerged (default: merged into "
                   "the kernels once, functionally)")
    g.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                   help="weights and compute (auto: bfloat16 on GPU/TPU, float32 on CPU)")
    g.add_argument("--scan_layers", action=argparse.BooleanOptionalAction, default=None,
                   help="layers as one scan over stacked weights (fast compile) instead of per-layer weights "
                   "(fastest decoding; default on GPU/TPU)")
    g = p.add_argument_group("sampling")
    g.add_argument("--num_samples", type=int, default=1, help="samples to draw (default 1)")
    g.add_argument("--max_new_tokens", type=int, default=100, help="default 100")
    g.add_argument("--top_k", type=int, default=200, help="sample among the k most likely tokens (default 200)")
    g.add_argument("--top_p", type=float, default=1.0, help="then among the most likely tokens holding this "
                   "probability mass (default 1.0: off)")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    g.add_argument("--seed", type=int, default=1234, help="sampling seed (default 1234, lit-llama's)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # CheckpointError, StateDictError, ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def run(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp

    from jaxlora.config import ADAPTERS_DIR
    from jaxlora.demo import DEMO_BASE, DEMO_TOKENIZER
    from jaxlora.infer.decode import Sampling, generate, prepare
    from jaxlora.infer.load import load_for_generation
    from jaxlora.model.llama import LLaMA
    from jaxlora.text.prompts import generate_prompt
    from jaxlora.text.tokenizer import Tokenizer
    from jaxlora.train.settings import DEMO_PROFILE
    from jaxlora.weights import jaxlora_dir as checkpoint_io

    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)  # checks the values
    if args.max_new_tokens < 1 or args.num_samples < 1:
        raise ValueError(f"--max_new_tokens and --num_samples must be >= 1, got {args.max_new_tokens} and "
                         f"{args.num_samples}")
    demo = not any([args.checkpoint_dir, args.pretrained_path, args.adapters, args.lora_path])
    adapters, pretrained, tokenizer_path, prompt = args.adapters, args.pretrained_path, args.tokenizer_path, args.prompt
    if demo:
        pretrained = str(DEMO_BASE)
        demo_adapters = Path(DEMO_PROFILE["out_dir"]) / ADAPTERS_DIR
        adapters = str(demo_adapters) if checkpoint_io.is_adapters_dir(demo_adapters) else None
        tokenizer_path = tokenizer_path or str(DEMO_TOKENIZER)
        prompt = DEMO_PROFILE["sample_instruction"] if prompt is None else prompt
        if adapters is None:
            print(f"demo: base model only ({demo_adapters} not found: run `python train.py` first for the "
                  "fine-tuned adapters)", file=sys.stderr)
    tokenizer = Tokenizer(tokenizer_path or LIT_TOKENIZER)  # a missing file: FileNotFoundError naming it
    prompt = LIT_PROMPT if prompt is None else prompt
    if not prompt.strip():
        raise ValueError("--prompt is empty: give an instruction (or a text to continue with --template none)")

    on_accelerator = jax.default_backend() != "cpu"
    dtype = {"auto": jnp.bfloat16 if on_accelerator else jnp.float32, "bfloat16": jnp.bfloat16,
             "float32": jnp.float32}[args.dtype]
    scan = (not on_accelerator) if args.scan_layers is None else args.scan_layers
    t0 = time.perf_counter()
    config, lora_config, variables, desc = load_for_generation(args.checkpoint_dir, pretrained, adapters,
                                                               args.lora_path, args.lora_alpha, param_dtype=dtype,
                                                               scan_layers=scan)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but the model ({desc}) has "
                         f"vocab_size {config.vocab_size}")
    model = LLaMA(config, lora_config, dtype=dtype, param_dtype=dtype, scan_layers=scan)
    model, variables = prepare(model, variables, merge=not args.unmerged,
                               quantize="int8" if args.quantize else None)
    jax.block_until_ready(variables)
    print(f"model: {desc} ({jnp.dtype(dtype).name}{', int8 kernels' if args.quantize else ''}"
          f"{', adapters unmerged' if 'lora' in variables else ''}) loaded in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr)

    template = args.template if args.template != "auto" else ("alpaca" if demo or lora_config else "none")
    text = generate_prompt({"instruction": prompt, "input": args.input}) if template == "alpaca" else prompt
    ids = tokenizer.encode(text, bos=True, eos=False)
    for i in range(args.num_samples):
        printed, got = "", []
        start = time.perf_counter()
        first_at = None

        def stream(rows: list) -> None:
            nonlocal printed, first_at
            if first_at is None:
                first_at = time.perf_counter()
            got.extend(rows[0].tolist())
            now = tokenizer.decode(got)
            if now.startswith(printed):
                sys.stdout.write(now[len(printed):])
                sys.stdout.flush()
                printed = now

        out = generate(model, variables, [ids], args.max_new_tokens, sampling, eos_id=tokenizer.eos_id,
                       vocab_size=tokenizer.vocab_size, seed=args.seed + i, on_tokens=stream)[0]
        end = time.perf_counter()
        sys.stdout.write(tokenizer.decode(out)[len(printed):] + "\n")
        first_at = first_at or end
        rate = (len(out) - 1) / (end - first_at) if len(out) > 1 and end > first_at else float("nan")
        note = " (the first sample includes compiling)" if i == 0 else ""
        print(f"sample {i + 1}: time to first token {first_at - start:.3f} s, {len(out)} tokens in "
              f"{end - start:.2f} s, {rate:.1f} tokens/s after the first{note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
