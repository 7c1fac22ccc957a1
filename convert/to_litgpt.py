r"""jaxlora checkpoint -> litgpt model directory, or jaxlora adapters -> litgpt LoRA checkpoint.

    python convert/to_litgpt.py --checkpoint_dir checkpoints/jaxlora/llama3.1-8b --out_dir litgpt/llama3.1-8b \
        [--tokenizer_dir hf/Llama-3.1-8B] [--name Llama-3.1-8B] [--dtype bfloat16]
    python convert/to_litgpt.py --checkpoint_dir BASE --adapters out/lora/alpaca/adapters --merged \
        --out_dir litgpt/llama3.1-8b-alpaca
    python convert/to_litgpt.py --adapters out/lora/alpaca/adapters --lora --out_dir litgpt/alpaca-lora \
        [--base_dir checkpoints/meta-llama/Llama-3.1-8B]

The model directory (lit_model.pth, model_config.yaml, the tokenizer files of --tokenizer_dir or
of the checkpoint) loads strictly into litgpt's GPT: `litgpt chat`, `litgpt generate`,
`litgpt finetune` take it. --merged folds the adapters (the checkpoint's own lora/, or
--adapters') into the weights; any targets. --lora writes what litgpt's finetune/lora.py
leaves (lit_model.pth.lora, hyperparameters.yaml, the base's model_config.yaml and tokenizer
files): `litgpt chat OUT_DIR` merges it onto --base_dir, the base's litgpt directory (default:
the base the adapters record, when it is one). litgpt's switches put adapters on q, k, v and
proj one by one but on the MLP all together, so adapters on only some of gate/up/down are
refused: export those --merged. Exit code 2 on bad input.
"""
from __future__ import annotations

import argparse
import sys

import _cli

from jaxlora.weights.engine import release_freed_memory
from jaxlora.weights.litgpt_files import adapters_to_litgpt, checkpoint_to_litgpt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_dir", help="jaxlora checkpoint directory (config.json, params/); with --lora, "
                   "its lora/ is exported when --adapters is not given")
    p.add_argument("--adapters", help="adapters-only directory (train.py's OUT_DIR/adapters)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--merged", action="store_true", help="fold the adapters into the weights")
    what.add_argument("--lora", action="store_true", help="write a litgpt LoRA checkpoint of the adapters")
    p.add_argument("--out_dir", required=True, help="litgpt directory to create")
    p.add_argument("--base_dir", help="with --lora: the base model's litgpt directory (recorded as "
                   "hyperparameters.yaml's checkpoint_dir)")
    p.add_argument("--tokenizer_dir", help="directory whose tokenizer files (tokenizer.json / tokenizer.model, "
                   "tokenizer_config.json, generation_config.json) are copied in; default the checkpoint's own")
    p.add_argument("--name", default="", help="model_config.yaml's name: litgpt picks its chat prompt style by it "
                   "(e.g. Llama-3.1-8B-Instruct)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype of the written tensors (default: keep the stored dtype)")
    p.add_argument("--overwrite", action="store_true", help="replace --out_dir if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress output on stderr")
    args = p.parse_args(argv)
    if args.lora and not (args.adapters or args.checkpoint_dir):
        p.error("--lora needs --adapters (or --checkpoint_dir with lora/)")
    if args.lora and args.adapters and args.checkpoint_dir:
        p.error("--lora takes the adapters from --adapters or from --checkpoint_dir's lora/, not both")
    if not args.lora and not args.checkpoint_dir:
        p.error("--checkpoint_dir is required (only --lora works from --adapters alone)")
    if args.adapters and not (args.merged or args.lora):
        p.error("--adapters needs --merged or --lora")

    release_freed_memory()

    def convert() -> str:
        if args.lora:
            out = adapters_to_litgpt(args.adapters or args.checkpoint_dir, args.out_dir, base_dir=args.base_dir,
                                     dtype=args.dtype, overwrite=args.overwrite, progress=not args.quiet)
            return f"wrote {out} (litgpt LoRA checkpoint)"
        out = checkpoint_to_litgpt(args.checkpoint_dir, args.out_dir, adapters_dir=args.adapters, merged=args.merged,
                                   dtype=args.dtype, name=args.name, tokenizer_dir=args.tokenizer_dir,
                                   overwrite=args.overwrite, progress=not args.quiet)
        return f"wrote {out}{' (adapters merged)' if args.merged else ''}"
    return _cli.run("to_litgpt", convert, args.quiet)


if __name__ == "__main__":
    sys.exit(main())
