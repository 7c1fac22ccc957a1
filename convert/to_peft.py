r"""jaxlora adapters -> a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors).

    python convert/to_peft.py --checkpoint_dir out/lora/alpaca/adapters --out_dir out/lora/alpaca/peft \
        [--base_model_name_or_path meta-llama/Llama-2-7b-hf] [--use_rslora]

--checkpoint_dir is a training run's adapters/ directory or a jaxlora checkpoint with lora/.
Load the result with `PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(BASE), OUT_DIR)`
(BASE: the HF form of the base, e.g. from convert/to_hf.py) or serve it with vLLM's LoRA support.
All seven targets map to PEFT's q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj.
Exit code 2 on bad input.
"""
from __future__ import annotations

import argparse
import sys

import _cli

from jaxlora.weights.hf_files import adapters_to_peft


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_dir", required=True, help="adapters-only directory or jaxlora checkpoint with lora/")
    p.add_argument("--out_dir", required=True, help="PEFT adapter folder to create")
    p.add_argument("--base_model_name_or_path", default=None,
                   help="recorded in adapter_config.json (default: the base recorded by train.py, when that "
                        "is an HF model directory)")
    p.add_argument("--use_rslora", action="store_true",
                   help="write PEFT's rsLoRA form (lora_alpha = alpha / sqrt(r), use_rslora true): same scaling")
    p.add_argument("--overwrite", action="store_true", help="replace --out_dir if it exists")
    args = p.parse_args(argv)

    return _cli.run("to_peft", lambda: "wrote " + str(adapters_to_peft(
        args.checkpoint_dir, args.out_dir, args.base_model_name_or_path, args.use_rslora, overwrite=args.overwrite)))


if __name__ == "__main__":
    sys.exit(main())
