r"""Hugging Face LlamaForCausalLM directory (local) -> jaxlora checkpoint directory, streaming.

    python convert/from_hf.py --hf_dir hf/Llama-2-7b-hf --out_dir checkpoints/jaxlora/llama2-7b \
        [--dtype bfloat16] [--overwrite]

--hf_dir is a local directory (nothing is downloaded; fetch a Hub model first, e.g. with
`huggingface-cli download meta-llama/Llama-2-7b-hf --local-dir hf/Llama-2-7b-hf`). It holds
config.json and model.safetensors (or shards with model.safetensors.index.json, or
pytorch_model*.bin). q/k rows are taken back from HF's half-split RoPE order; rms_norm_eps and
rope_theta are read from config.json. Configurations jaxlora cannot reproduce exactly
(grouped-query attention, rope scaling, biases, tied embeddings) are refused by name. Exit
code 2 on bad input.
"""
from __future__ import annotations

import argparse
import sys

import _cli

from jaxlora.weights.engine import release_freed_memory
from jaxlora.weights.hf_files import hf_to_checkpoint


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf_dir", required=True, help="local HF model directory (config.json + safetensors or .bin weights); not a Hub id")
    p.add_argument("--out_dir", required=True, help="jaxlora checkpoint directory to create")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="storage dtype of the weights (default: keep the file's)")
    p.add_argument("--overwrite", action="store_true", help="replace --out_dir if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress output on stderr")
    args = p.parse_args(argv)

    release_freed_memory()

    def convert() -> str:
        config, stats = hf_to_checkpoint(args.hf_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite,
                                         progress=not args.quiet)
        return (f"wrote {args.out_dir} (n_layer={config.n_layer}, n_embd={config.n_embd}, "
                f"vocab={config.padded_vocab_size}) in {stats['seconds']:.1f} s{_cli.rate(stats)}")
    return _cli.run("from_hf", convert, args.quiet)


if __name__ == "__main__":
    sys.exit(main())
