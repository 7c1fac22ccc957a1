"""A PEFT LoRA folder -> a jaxlora adapters-only directory (config.json + lora/).

    python convert/from_peft.py --peft_dir their-adapter --out_dir adapters --base hf/Llama-2-7b-hf
    python convert/from_peft.py --peft_dir out/demo/peft --out_dir out/demo/adapters-again

--base (a local HF model directory, a jaxlora checkpoint or lit-llama's base .pth) gives the
model's shape; by default the adapter_config's base_model_name_or_path, when that is a local
directory or .pth (train.py records the base it trained on). rsLoRA is kept (as the
alpha giving the same scaling). Not supported, and refused by name: DoRA, bias other than none,
rank_pattern / alpha_pattern, modules_to_save, fan_in_fan_out, layers_to_transform, targets
outside the seven projections. Continue training with train.py --init_adapters (which also takes
the PEFT folder itself) or merge with convert/to_hf.py --merged / convert/to_lit_llama.py --merged.
Exit code 2 on bad input.
"""
from __future__ import annotations

import argparse
import sys

import _cli

from jaxlora.weights.hf_files import peft_to_adapters


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peft_dir", required=True, help="PEFT adapter folder (adapter_config.json + adapter_model.*)")
    p.add_argument("--out_dir", required=True, help="adapters-only jaxlora directory to create")
    p.add_argument("--base", default=None, help="the base model: local HF directory, jaxlora checkpoint directory or lit-llama .pth")
    p.add_argument("--overwrite", action="store_true", help="replace --out_dir if it exists")
    args = p.parse_args(argv)

    return _cli.run("from_peft", lambda: "wrote " + str(peft_to_adapters(args.peft_dir, args.out_dir, base=args.base,
                                                                         overwrite=args.overwrite)))


if __name__ == "__main__":
    sys.exit(main())
