"""jaxlora checkpoint directory -> lit-llama .pth (LoRA file, base weights, or merged), streaming.

    python convert/to_lit_llama.py --checkpoint_dir D --out lit-llama-lora-finetuned.pth
    python convert/to_lit_llama.py --checkpoint_dir D --out lit-llama-lora-merged-weights.pth --merged
    python convert/to_lit_llama.py --checkpoint_dir D --out lit-llama.pth --base
    python convert/to_lit_llama.py --checkpoint_dir BASE --adapters OUT_DIR/adapters --merged --out merged.pth
    python convert/to_lit_llama.py --checkpoint_dir lit-llama.pth --adapters OUT_DIR/adapters --merged --out merged.pth
    python convert/to_lit_llama.py --adapters OUT_DIR/adapters --out lit-llama-lora-finetuned.pth

The LoRA file loads into lit-llama's generate/lora.py (with the base checkpoint, under
`with lora(r=..., alpha=..., dropout=...)`). It is written only for adapters on exactly q and v:
lit-llama's lora() builds enable_lora=[True, False, True] whatever the file holds. For any other
targets (k, o, MLP, ...) export --merged: a plain lit-llama checkpoint with the adapters folded in.
--adapters takes the adapters from an adapters-only directory (train.py's OUT_DIR/adapters)
instead of the checkpoint's own lora/. Exit status: 0 done, 2 bad input (the message says
what), 1 an unexpected failure.
"""
from __future__ import annotations

import argparse
import sys

import _cli

from jaxlora.weights.convert import checkpoint_to_lit
from jaxlora.weights.engine import release_freed_memory


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_dir", help="jaxlora checkpoint directory (config.json, params/, lora/); "
                   "for --merged with --adapters also lit-llama's base .pth itself; not needed for a LoRA "
                   "file from --adapters")
    p.add_argument("--adapters", help="adapters-only directory (config.json, lora/), e.g. train.py's "
                   "OUT_DIR/adapters; used instead of the checkpoint's lora/")
    p.add_argument("--out", required=True, help="the .pth file to write")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--merged", action="store_true",
                      help="write a full lit-llama checkpoint with the adapters folded into the weights "
                           "(like lit-llama's convert_lora_weights.py); any LoRA targets")
    what.add_argument("--base", action="store_true", help="write the frozen base weights as a lit-llama checkpoint")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype of the written tensors (default: keep the stored dtype; lit-llama's bf16 runs "
                        "write bfloat16)")
    _cli.add_merge_into(p)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress output on stderr")
    args = p.parse_args(argv)
    if args.checkpoint_dir is None and (args.adapters is None or args.merged or args.base):
        p.error("--checkpoint_dir is required (only a LoRA file can be written from --adapters alone)")

    release_freed_memory()
    kind = "merged" if args.merged else "base" if args.base else "lora"

    def convert() -> str:
        stats = checkpoint_to_lit(args.checkpoint_dir, args.out, kind=kind, dtype=args.dtype,
                                  overwrite=args.overwrite, progress=not args.quiet, adapters_dir=args.adapters,
                                  merge_into=args.merge_into, log=_cli.note(args.quiet))
        return f"wrote {args.out} ({kind}) in {stats['seconds']:.1f} s{_cli.rate(stats)}"
    return _cli.run("to_lit_llama", convert, args.quiet)


if __name__ == "__main__":
    sys.exit(main())
