r"""litgpt checkpoint directory (+ litgpt LoRA fine-tune) -> jaxlora checkpoint directory, streaming.

    python convert/from_litgpt.py --checkpoint_dir checkpoints/meta-llama/Llama-3.1-8B \
        --out_dir checkpoints/jaxlora/llama3.1-8b [--dtype bfloat16] [--overwrite]
    python convert/from_litgpt.py --checkpoint_dir checkpoints/meta-llama/Llama-3.1-8B \
        --lora_dir out/finetune/lora/final --out_dir checkpoints/jaxlora/llama3.1-8b-alpaca
    python convert/from_litgpt.py --lora_dir out/finetune/lora/final --out_dir adapters

--checkpoint_dir is a litgpt model directory (lit_model.pth and model_config.yaml, as
`litgpt download` or its training scripts leave it; lit-gpt's older lit_config.json and
interleaved attn.attn weights are read too). --lora_dir is what litgpt's finetune/lora.py writes
(lit_model.pth.lora, hyperparameters.yaml, model_config.yaml): its adapters on q/k/v, proj and
the MLP, with their r and alpha. Given alone, it becomes an adapters-only directory recording its
base (hyperparameters.yaml's checkpoint_dir), which generate.py --adapters and
train.py --pretrained_path run on directly. Only LLaMA-style litgpt models convert (RMSNorm,
LLaMAMLP, sequential residual, no biases, full RoPE); anything else is refused by its key. The
tokenizer files are copied along. Exit code 2 on bad input.
"""
from __future__ import annotations

import argparse
import sys

import _cli

from jaxlora.weights.engine import release_freed_memory
from jaxlora.weights.litgpt_files import litgpt_to_checkpoint


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_dir", help="litgpt model directory (lit_model.pth + model_config.yaml)")
    p.add_argument("--lora_dir", help="litgpt LoRA fine-tuning output (lit_model.pth.lora + hyperparameters.yaml)")
    p.add_argument("--out_dir", required=True, help="jaxlora checkpoint (or, with --lora_dir alone, adapters) "
                   "directory to create")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="storage dtype of the frozen weights (default: keep the file's); adapters keep theirs")
    p.add_argument("--overwrite", action="store_true", help="replace --out_dir if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress output on stderr")
    args = p.parse_args(argv)
    if args.checkpoint_dir is None and args.lora_dir is None:
        p.error("give --checkpoint_dir, --lora_dir or both")

    release_freed_memory()

    def convert() -> str:
        config, lora, stats = litgpt_to_checkpoint(args.checkpoint_dir, args.out_dir, lora_dir=args.lora_dir,
                                                   dtype=args.dtype, overwrite=args.overwrite, progress=not args.quiet)
        return (f"wrote {args.out_dir} (n_layer={config.n_layer}, n_embd={config.n_embd}, "
                f"n_kv_head={config.n_kv_head}, lora={lora.to_dict() if lora else None}) in "
                f"{stats['seconds']:.1f} s{_cli.rate(stats)}")
    return _cli.run("from_litgpt", convert, args.quiet)


if __name__ == "__main__":
    sys.exit(main())
