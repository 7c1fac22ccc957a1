"""What a finished run leaves for others: the adapters as a jaxlora directory, lit-llama's LoRA
file, a PEFT folder, a litgpt LoRA checkpoint (on a litgpt base) and the loss plot; and `clear_outputs`, which --overwrite uses to remove
an old run's outputs. Optional writers (torch, safetensors, matplotlib) that are missing, or
a format that cannot hold these adapters, skip their file with a line saying why."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from jaxlora.config import (
    ADAPTERS_DIR,
    LIT_LORA_FILE,
    LITGPT_LORA_DIR,
    PEFT_DIR,
    LLaMAConfig,
    LoRAConfig,
)
from jaxlora.parallel import distributed
from jaxlora.train.metrics import METRICS_FILE
from jaxlora.train.plot import plot_loss
from jaxlora.train.settings import TrainArgs
from jaxlora.weights.hf_files import peft_base_name, save_peft_adapters
from jaxlora.weights.jaxlora_dir import save_checkpoint
from jaxlora.weights.lit_files import save_lit_lora
from jaxlora.weights.litgpt_files import adapters_to_litgpt, is_litgpt_dir

__all__ = ["LOSS_PNG", "SUMMARY_FILE", "RUN_OUTPUTS", "Exports", "write_exports", "clear_outputs"]

LOSS_PNG, SUMMARY_FILE = "loss.png", "summary.json"
# Everything a run writes into out_dir besides its checkpoints.
RUN_OUTPUTS = (ADAPTERS_DIR, LIT_LORA_FILE, PEFT_DIR, LITGPT_LORA_DIR, LOSS_PNG, METRICS_FILE, SUMMARY_FILE)


@dataclass
class Exports:
    """The files a run wrote (None: not written)."""

    adapters_dir: Path | None = None
    lit_lora_path: Path | None = None
    peft_dir: Path | None = None
    loss_png: Path | None = None
    litgpt_lora_dir: Path | None = None


def write_exports(lora: Any, config: LLaMAConfig, lora_config: LoRAConfig, a: TrainArgs,
                  log: Callable[[str], None], quantized: dict[str, str] | None = None) -> Exports:
    """Write the run's outputs into a.out_dir (host adapters `lora`). quantized: the base's
    quantization ({"mode", "dtype"}), recorded with the adapters so that a merged export merges
    them into the kernels they were trained with (`jaxlora.weights.quantized.requantized`)."""
    out = Path(a.out_dir)
    adapters = save_checkpoint(out / ADAPTERS_DIR, config, lora_config, None, lora, overwrite=True,
                               base=str(a.pretrained_path), quantized=quantized)
    lit = export_lit(lora, config, lora_config, out / LIT_LORA_FILE, log) if a.export_lit else None
    peft = export_peft(lora, config, lora_config, out / PEFT_DIR, a.pretrained_path, log)
    litgpt = export_litgpt(Path(adapters), a.pretrained_path, out / LITGPT_LORA_DIR, log)
    png = None
    if a.plot:
        title = (f"LoRA fine-tuning of {Path(str(a.pretrained_path)).name}, r={a.lora_r} on "
                 f"{','.join(lora_config.targets)}")
        png = plot_loss(out / METRICS_FILE, out / LOSS_PNG, title=title)
        if png is None:
            log(f"{LOSS_PNG} not written (matplotlib not installed: pip install 'jaxlora[plot]')")
    return Exports(Path(adapters), lit, peft, png, litgpt)


def export_lit(lora: Any, config: LLaMAConfig, lora_config: LoRAConfig, path: Path,
               log: Callable[[str], None]) -> Path | None:
    """lit-llama's LoRA file (q,v adapters only; needs torch)."""
    try:
        save_lit_lora(lora, config, lora_config, path)
    except ImportError:
        log(f"{path.name} not written: writing PyTorch files needs torch (pip install torch, or on a machine "
            "without a GPU: pip install torch --index-url https://download.pytorch.org/whl/cpu)")
        return None
    except ValueError as e:  # e.g. adapters on o/gate/up/down, which lit-llama's format cannot hold
        log(f"{path.name} not written: {e}")
        return None
    return path


def export_peft(lora: Any, config: LLaMAConfig, lora_config: LoRAConfig, path: Path, base: str | None,
                log: Callable[[str], None]) -> Path | None:
    """The adapters as a PEFT folder; base_model_name_or_path names the base when it is a local path."""
    try:
        name = peft_base_name(base)
        return save_peft_adapters(lora, config, lora_config, path, base_model_name_or_path=name)
    except ImportError:
        log(f"{path.name}/ not written: PEFT's format needs safetensors (pip install safetensors)")
    except ValueError as e:
        log(f"{path.name}/ not written: {e}")
    return None


def export_litgpt(adapters: Path, base: str | None, path: Path, log: Callable[[str], None]) -> Path | None:
    """The adapters as a litgpt LoRA checkpoint (`litgpt chat` merges it onto the base), when
    the base is a litgpt directory; skipped with a line saying why when it cannot be written."""
    if not base or not is_litgpt_dir(base):
        return None
    try:
        out = adapters_to_litgpt(adapters, path, base_dir=base, overwrite=True, progress=False)
    except ImportError:
        log(f"{path.name}/ not written: writing PyTorch files needs torch")
        return None
    except ValueError as e:  # e.g. adapters on gate but not up/down: litgpt's lora_mlp means all three
        log(f"{path.name}/ not written: {e}")
        return None
    log(f"litgpt LoRA checkpoint: {out} (litgpt chat {out})")
    return out


def clear_outputs(out: Path) -> list[str]:
    """--overwrite: remove what an earlier run wrote into `out` (its outputs only, nothing else
    there); returns the names removed. The primary process deletes."""
    removed = []
    for name in RUN_OUTPUTS:
        path = out / name
        if not (path.exists() or path.is_symlink()):
            continue
        removed.append(name)
        if distributed.is_primary():
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return removed
