"""A run's inputs: every input file checked at once, the instruction data loaded, split and
tokenized, and the counts a user should hear about (cut samples, samples with nothing to learn)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np

from jaxlora.errors import DataError, InputsError
from jaxlora.parallel import distributed
from jaxlora.text.prompts import PromptStyle
from jaxlora.text.tokenizer import TextTokenizer
from jaxlora.train.data import (
    LazySamples,
    count_truncated,
    load_prepared,
    load_records,
    prepare_records,
    prepare_sample,
    split_records,
)
from jaxlora.train.settings import TrainArgs
from jaxlora.weights.load import RANDOM_BASE

__all__ = ["check_inputs", "load_data", "count_steps", "report_truncation", "no_loss_tokens"]


def count_steps(a: TrainArgs, n_train: int) -> int:
    """The run's optimizer steps: --max_steps, or --epochs over `n_train` samples."""
    return a.max_steps if a.max_steps is not None else math.ceil(a.epochs * n_train / a.batch_size)


_HOW_TO_GET = {
    "tokenizer_path": "lit-llama's tokenizer: python scripts/download.py --repo_id openlm-research/open_llama_7b "
                      "(in lit-llama) puts it at checkpoints/lit-llama/tokenizer.model",
    "data_path": "the Alpaca JSON (alpaca_data_cleaned.json from the alpaca-lora repository), or lit-llama's "
                 "prepared data: the directory holding train.pt and test.pt (scripts/prepare_alpaca.py)",
    "pretrained_path": "lit-llama's checkpoint (scripts/convert_checkpoint.py in lit-llama writes "
                       "checkpoints/lit-llama/7B/lit-llama.pth), a jaxlora directory from "
                       "convert/from_lit_llama.py, a Hugging Face LLaMA directory (config.json + safetensors), "
                       "or 'none' for random weights",
}


def check_inputs(a: TrainArgs) -> None:
    """Every missing input at once, each with how to get it (before anything is loaded or written)."""
    missing = []
    for name in ("tokenizer_path", "data_path", "pretrained_path"):
        value = getattr(a, name)
        if name == "pretrained_path" and (value is None or str(value).lower() in RANDOM_BASE):
            continue
        if not Path(value).exists():
            missing.append(f"  --{name} {value}: not found. Get it: {_HOW_TO_GET[name]}")
    if missing:
        raise InputsError(f"{len(missing)} input(s) missing:\n" + "\n".join(missing))


def load_data(a: TrainArgs, tokenizer: TextTokenizer, style: PromptStyle, log: Callable[[str], None]
              ) -> tuple[list[dict], list[dict]]:
    """(train samples, validation samples), tokenized. JSON/JSONL records are split here
    (deterministically, seed 42 as lit-llama's prepare_alpaca); a directory holding lit-llama's
    prepared ``train.pt`` and ``test.pt`` is used as it is."""
    path = Path(a.data_path)
    if path.is_dir():
        train_pt, test_pt = path / "train.pt", path / "test.pt"
        if not train_pt.is_file():
            raise FileNotFoundError(f"--data_path {path}: a directory without train.pt (lit-llama's "
                                    "prepare_alpaca.py output); pass a JSON file of records instead")
        train = load_prepared(train_pt)
        val = load_prepared(test_pt) if test_pt.is_file() else []
        log(f"data: {train_pt} ({len(train)} samples), {test_pt} ({len(val)} samples); prepared files keep "
            "their own max length and input masking")
        report_truncation(train + val, a.max_seq_length, log)
        return train, val
    records = load_records(path)
    val_size = a.val_size
    n = len(records)
    if isinstance(val_size, int) and val_size >= n:
        capped = max(1, n // 10) if n > 1 else 0
        log(f"data: val_size {val_size} >= {n} records; using {capped}")
        val_size = capped
    train_recs, val_recs = split_records(records, val_size, seed=42) if val_size else (list(records), [])
    if not train_recs:
        raise DataError(f"{path}: no training records left after taking {len(val_recs)} for validation")
    val = prepare_records(val_recs, tokenizer, a.max_seq_length, a.mask_inputs, style)
    log(f"data: {path}: {n} records -> {len(train_recs)} train / {len(val)} validation (split seed 42)")
    if jax.process_count() == 1:
        train = prepare_records(train_recs, tokenizer, a.max_seq_length, a.mask_inputs, style)
        report_truncation(train + val, a.max_seq_length, log)
        return train, val
    # Several processes: each tokenizes only the samples its batch rows hold (as they come), and
    # a 1/P share of the records now, for the counts at start.
    train = LazySamples(train_recs, lambda r: prepare_sample(r, tokenizer, a.max_seq_length, a.mask_inputs,
                                                               style=style))
    log(f"data: {jax.process_count()} processes: each tokenizes the training samples its own batch rows hold")
    share = [train[i] for i in range(jax.process_index(), len(train), jax.process_count())]
    cut = distributed.sum_over_processes(count_truncated(share, a.max_seq_length))
    empty = distributed.sum_over_processes(no_loss_tokens(share, a.max_seq_length))
    report_counts(cut + count_truncated(val, a.max_seq_length), empty + no_loss_tokens(val, a.max_seq_length),
                   len(train) + len(val), a.max_seq_length, log)
    return train, val


def report_truncation(samples: Sequence[dict], max_seq_length: int, log: Callable[[str], None]) -> None:
    """Say how many samples are cut at max_seq_length and how many keep no loss token at all."""
    report_counts(count_truncated(samples, max_seq_length), no_loss_tokens(samples, max_seq_length),
                   len(samples), max_seq_length, log)


def no_loss_tokens(samples: Sequence[dict], max_seq_length: int) -> int:
    return sum(not np.any(np.asarray(s["labels"][:max_seq_length]) != -1) for s in samples)


def report_counts(long: int, empty: int, total: int, max_seq_length: int, log: Callable[[str], None]) -> None:
    if long:
        log(f"data: {long} of {total} samples are longer than --max_seq_length {max_seq_length} and are "
            "cut (lit-llama does the same; raise --max_seq_length to keep them whole)")
    if empty:
        log(f"warning: {empty} samples have no response token left to learn from (the prompt fills "
            f"--max_seq_length {max_seq_length}); they add nothing to the loss")
