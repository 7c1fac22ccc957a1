r"""lit-llama checkpoint (+ LoRA file) -> jaxlora checkpoint directory, streaming.

    python convert/from_lit_llama.py --checkpoint_path checkpoints/lit-llama/7B/lit-llama.pth \
        [--lora_path out/lora/alpaca/lit-llama-lora-finetuned.pth --lora_alpha 16] \
        --out_dir checkpoints/jaxlora/7B [--dtype bfloat16] [--overwrite]

The output (config.json, params/, lora/) is what `train.py --pretrained_path` and
`generate.py` read. Memory stays near one layer of one tensor whatever the file size.
A LoRA file is lit-llama's lit-llama-lora-finetuned.pth: adapters on q and v (the only targets
lit-llama's lora() can load); r is read from it. Exit status: 0 done, 2 bad input (the message
says what), 1 an unexpected failure.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import _cli

from jaxlora.config import PRESETS, LLaMAConfig
from jaxlora.weights.convert import lit_to_checkpoint
from jaxlora.weights.engine import release_freed_memory


def parse_model_config(spec: str | None) -> LLaMAConfig | None:
    """None, a preset name ('7B'), or JSON of LLaMAConfig fields ('{"n_layer": 4, ...}' or a .json file)."""
    if spec is None:
        return None
    if spec.lower() in {k.lower() for k in PRESETS}:
        return LLaMAConfig.from_name(spec)
    text = Path(spec).read_text() if spec.endswith(".json") and Path(spec).is_file() else spec
    fields = json.loads(text)
    fields = fields.get("model", fields)  # also accepts a jaxlora config.json
    return LLaMAConfig.from_dict(fields)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_path", required=True,
                   help="lit-llama base checkpoint (torch.save zip, e.g. checkpoints/lit-llama/7B/lit-llama.pth)")
    p.add_argument("--lora_path", default=None,
                   help="optional lit-llama LoRA file (lit-llama-lora-finetuned.pth: q,v adapters); r is read from it")
    p.add_argument("--lora_alpha", type=float, default=16.0,
                   help="LoRA alpha (lit-llama does not store it; its fine-tuning script uses 16)")
    p.add_argument("--lora_dropout", type=float, default=0.05,
                   help="LoRA dropout recorded in config.json for further training (default 0.05)")
    p.add_argument("--out_dir", required=True, help="jaxlora checkpoint directory to create")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="storage dtype of the frozen weights (default: keep the file's); adapters keep theirs")
    p.add_argument("--model_config", default=None,
                   help="model shape, when it is not a lit-llama preset: a preset name or JSON of LLaMAConfig "
                        "fields (inline or a .json file). Default: recognised from the weights")
    p.add_argument("--overwrite", action="store_true", help="replace --out_dir if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress output on stderr")
    args = p.parse_args(argv)

    release_freed_memory()

    def convert() -> str:
        config, lora, stats = lit_to_checkpoint(
            args.checkpoint_path, args.out_dir, lora_path=args.lora_path, lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout, dtype=args.dtype, config=parse_model_config(args.model_config),
            overwrite=args.overwrite, progress=not args.quiet)
        return (f"wrote {args.out_dir} (n_layer={config.n_layer}, n_embd={config.n_embd}, "
                f"lora={lora.to_dict() if lora else None}) in {stats['seconds']:.1f} s{_cli.rate(stats)}")
    return _cli.run("from_lit_llama", convert, args.quiet)


if __name__ == "__main__":
    sys.exit(main())
