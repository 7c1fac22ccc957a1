"""Generate text with a LLaMA (and its LoRA adapters): lit-llama's generate.py / generate/lora.py, in JAX.

    python generate.py                                   # the built-in demo model (+ out/demo's adapters)
    python generate.py --prompt "What food do lamas eat?" --pretrained_path checkpoints/lit-llama/7B/lit-llama.pth \\
        --lora_path out/lora/alpaca/lit-llama-lora-finetuned.pth
    python generate.py --checkpoint_dir checkpoints/jaxlora/7B --adapters out/lora/alpaca/adapters --quantize int8

The response streams to stdout (the model's text only); the instruction, the model loaded, time to
first token and tokens/s (compiling reported apart) go to stderr. This file only parses flags; the
session is jaxlora.infer.session, decoding jaxlora.infer.decode, loading jaxlora.infer.load.
"""
from __future__ import annotations

import argparse
import sys

# Imported eagerly, as train.py does: --help then takes ~1.6 s instead of ~0.1 s (2-core CPU,
# measured 2026-12-01), and the help states the package's own defaults instead of copies.
from jaxlora.demo import DEMO_INSTRUCTION
from jaxlora.errors import run_command
from jaxlora.infer.load import LIT_TOKENIZER, TOKENIZER_FILE
from jaxlora.infer.session import LIT_PROMPT, LIT_TEMPERATURE, GenerateOptions, run
from jaxlora.text.prompts import PROMPT_STYLES
from jaxlora.text.tokenizer import TOKENIZER_JSON

D = GenerateOptions()


def old_template_name(value: str) -> str:
    """--template's values as --prompt_style names (none: plain)."""
    return "plain" if value == "none" else value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("prompt")
    g.add_argument("--prompt", help=f"the instruction (default: {LIT_PROMPT!r}; with no model flags the demo's "
                   f"{DEMO_INSTRUCTION!r})")
    g.add_argument("--input", default=D.input, help="optional input (context) for the instruction")
    g.add_argument("--prompt_style", choices=["auto", *PROMPT_STYLES], default=D.prompt_style,
                   help="how the prompt is put to the model: alpaca (lit-llama's template), plain (continue the "
                   "prompt as is), llama2-chat, llama3-chat (Meta's formats), chat-template (the model's own, from "
                   "its tokenizer_config.json); auto (default): the adapters' style (alpaca unless their config.json "
                   "records another; PEFT adapters record none: the model's chat template if it ships one, else "
                   "alpaca) or the demo's, else the model's chat template if it ships one, else plain")
    g.add_argument("--template", dest="prompt_style", type=old_template_name, choices=["auto", "alpaca", "plain"],
                   help=argparse.SUPPRESS)  # the earlier flag: none is now plain
    g.add_argument("--system", default=D.system, help="system prompt (the chat styles)")
    g = p.add_argument_group("model (none of these: the built-in demo)")
    g.add_argument("--checkpoint_dir", help="jaxlora checkpoint directory (convert/from_lit_llama.py), with its "
                   "adapters if it has them")
    g.add_argument("--pretrained_path", help="base weights: lit-llama's .pth, a Hugging Face LLaMA directory or a "
                   "jaxlora checkpoint directory")
    g.add_argument("--adapters", help="adapters-only directory (train.py's OUT_DIR/adapters), a PEFT LoRA folder "
                   "or a litgpt LoRA directory (finetune/lora.py's); alone, the base it records, when local")
    g.add_argument("--lora_path", help="lit-llama LoRA file (lit-llama-lora-finetuned.pth)")
    g.add_argument("--lora_alpha", type=float, default=D.lora_alpha, help=f"alpha of --lora_path (not stored in "
                   f"the file; default {D.lora_alpha:g})")
    g.add_argument("--tokenizer_path", help=f"default: the tokenizer of the weights, else {LIT_TOKENIZER} (looked for in the "
                   "adapters' or the base's directory, beside a .pth and one folder up); a SentencePiece "
                   f"{TOKENIZER_FILE}, a Hugging Face {TOKENIZER_JSON}, or a directory holding one ({TOKENIZER_JSON} "
                   "first)")
    g.add_argument("--quantize", choices=["int8", "llm.int8", "nf4", "nf4-dq"], help="weight-only int8 kernels "
                   "(half the weight bytes per token; llm.int8 is accepted as lit-llama's name), or QLoRA's NF4 "
                   "(nf4-dq: block scales in 8 bits): about a quarter, the LM head kept, adapters unmerged as "
                   "trained. A quantized checkpoint (train.py --save_quantized) decodes as stored")
    g.add_argument("--unmerged", action="store_true", help="apply the adapters unmerged (default: merged into "
                   "the kernels once, functionally)")
    g.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default=D.dtype,
                   help="weights and compute (auto: bfloat16 on GPU/TPU, float32 on CPU)")
    g.add_argument("--scan_layers", action=argparse.BooleanOptionalAction, default=D.scan_layers,
                   help="layers as one scan over stacked weights (fast compile) instead of per-layer weights "
                   "(fastest decoding; default on GPU/TPU)")
    g = p.add_argument_group("sampling")
    g.add_argument("--num_samples", type=int, default=D.num_samples, help=f"samples to draw (default "
                   f"{D.num_samples})")
    g.add_argument("--max_new_tokens", type=int, default=D.max_new_tokens, help=f"default {D.max_new_tokens}")
    g.add_argument("--top_k", default=D.top_k, help=f"sample among the k most likely tokens; 0 or none: no limit "
                   f"(default {D.top_k})")
    g.add_argument("--top_p", type=float, default=D.top_p, help="then among the most likely tokens holding this "
                   f"probability mass (default {D.top_p}: off)")
    g.add_argument("--temperature", type=float, default=D.temperature, help=f"0 = greedy (default "
                   f"{LIT_TEMPERATURE}, lit-llama's; the demo, with no model flags: 0)")
    g.add_argument("--seed", type=int, default=D.seed, help=f"sampling seed (default {D.seed}, lit-llama's)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("generate.py", lambda: run(GenerateOptions(**vars(args))))


if __name__ == "__main__":
    sys.exit(main())
