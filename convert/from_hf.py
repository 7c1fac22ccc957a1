"""Hugging Face LlamaForCausalLM directory -> jaxlora checkpoint directory, streaming.

    python convert/from_hf.py --hf_dir meta-llama/Llama-2-7b-hf --out_dir checkpoints/jaxlora/llama2-7b \
        [--dtype bfloat16] [--overwrite]

The directory holds config.json and model.safetensors (or shards with model.safetensors.index.json,
or pytorch_model*.bin). q/k rows are taken back from HF's half-split RoPE order. Configurations
jaxlora cannot reproduce exactly (grouped-query attention, rope scaling, biases, tied embeddings,
rms_norm_eps other than 1e-5, rope_theta other than 10000) are refused by name. Exit code 2 on
bad input.
"""
from __future__ import annotations

import argparse
import sys

import _cli


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf_dir", required=True, help="HF model directory (config.json + safetensors or .bin weights)")
    p.add_argument("--out_dir", required=True, help="jaxlora checkpoint directory to create")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="storage dtype of the weights (default: keep the file's)")
    p.add_argument("--overwrite", action="store_true", help="replace --out_dir if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress output on stderr")
    args = p.parse_args(argv)

    from jaxlora.weights.convert import release_freed_memory
    from jaxlora.weights.hf_files import hf_to_checkpoint
    release_freed_memory()

    def convert() -> str:
        config, stats = hf_to_checkpoint(args.hf_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite,
                                         progress=not args.quiet)
        return (f"wrote {args.out_dir} (n_layer={config.n_layer}, n_embd={config.n_embd}, "
                f"vocab={config.padded_vocab_size}) in {stats['seconds']:.1f} s")
    return _cli.run("from_hf", convert, args.quiet)


if __name__ == "__main__":
    sys.exit(main())
