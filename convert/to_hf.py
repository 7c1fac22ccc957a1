r"""jaxlora checkpoint directory -> Hugging Face LlamaForCausalLM directory (safetensors).

    python convert/to_hf.py --checkpoint_dir checkpoints/jaxlora/7B --out_dir hf/7B
    python convert/to_hf.py --checkpoint_dir checkpoints/jaxlora/7B --adapters out/lora/alpaca/adapters \
        --merged --out_dir hf/7B-alpaca [--tokenizer_path checkpoints/lit-llama/tokenizer.model] \
        [--dtype bfloat16] [--max_shard_size 2GB]

The output loads with `LlamaForCausalLM.from_pretrained` and serves with vLLM. --merged folds the
adapters (the checkpoint's own, or --adapters') into the weights; without it the frozen weights
are written and the adapters can go to PEFT with convert/to_peft.py. --tokenizer_path adds
LLaMA's tokenizer.model (with a tokenizer_config.json for AutoTokenizer). Exit code 2 on bad input.
"""
from __future__ import annotations

import argparse
import sys

import _cli

from jaxlora.weights.engine import release_freed_memory
from jaxlora.weights.hf_files import checkpoint_to_hf


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_dir", required=True, help="jaxlora checkpoint directory (config.json, params/)")
    p.add_argument("--adapters", help="adapters-only directory (train.py's OUT_DIR/adapters) to merge "
                   "instead of the checkpoint's lora/")
    p.add_argument("--merged", action="store_true", help="fold the adapters into the weights")
    p.add_argument("--out_dir", required=True, help="HF model directory to create")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype of the written tensors (default: keep the stored dtype)")
    p.add_argument("--max_shard_size", default="2GB",
                   help="largest safetensors shard (the host holds one shard while writing); default 2GB")
    p.add_argument("--tokenizer_path", help="LLaMA's tokenizer.model, copied in with a tokenizer_config.json "
                   "so that AutoTokenizer loads it")
    _cli.add_merge_into(p)
    p.add_argument("--overwrite", action="store_true", help="replace --out_dir if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress output on stderr")
    args = p.parse_args(argv)
    if args.adapters and not args.merged:
        p.error("--adapters needs --merged (unmerged adapters go to PEFT: convert/to_peft.py)")

    release_freed_memory()

    def convert() -> str:
        out = checkpoint_to_hf(args.checkpoint_dir, args.out_dir, adapters_dir=args.adapters, merged=args.merged,
                               dtype=args.dtype, max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                               progress=not args.quiet, tokenizer_path=args.tokenizer_path,
                               merge_into=args.merge_into, log=_cli.note(args.quiet))
        return f"wrote {out}{' (adapters merged)' if args.merged else ''}"
    return _cli.run("to_hf", convert, args.quiet)


if __name__ == "__main__":
    sys.exit(main())
