"""Alpaca instruction data: loading, lit-llama-exact tokenization, and batching.

Prompts, tokenization and label masking reproduce lit-llama's ``scripts/prepare_alpaca.py``
byte for byte, and ``load_prepared`` reads the ``train.pt`` / ``test.pt`` files it writes.

Batching deliberately differs from lit-llama. lit-llama samples every micro-batch *with
replacement* (``torch.randint``) and pads it to its own longest sample. Here ``Batcher``
walks *epochs* over the data, each shuffled by ``(seed, epoch)``, so every sample is seen
once per epoch and the position ``(epoch, position)`` can be saved and resumed exactly.
Each batch is padded to a *bucket* length (a few fixed sizes up to ``max_seq_length``)
so that a jitted train step compiles only a handful of shapes. Padding values match
lit-llama: ``input_ids`` with 0, ``labels`` with -1. Labels are *not* shifted; as in
lit-llama, the loss compares ``logits[:, :-1]`` with ``labels[:, 1:]``.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxlora.errors import DataError
from jaxlora.text.prompts import DEFAULT_STYLE, PromptStyle, encode_rendered, get_style
from jaxlora.text.tokenizer import TextTokenizer

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "load_records",
    "prepare_sample",
    "prepare_records",
    "count_truncated",
    "load_prepared",
    "split_records",
    "bucket_lengths",
    "Batcher",
    "eval_batches",
]

PathLike = str | os.PathLike

IGNORE_INDEX = -1
"""Label value ignored by the loss (lit-llama's ``IGNORE_INDEX``)."""

PAD_ID = 0
"""Value used to pad ``input_ids`` (lit-llama pads with 0)."""

_TOKEN_KEYS = ("input_ids", "input_ids_no_response", "labels")


# --------------------------------------------------------------------------- raw records


def load_records(path: PathLike) -> list[dict]:
    """Read Alpaca records from a JSON list or a JSONL file (one object per line).

    Each record needs string ``instruction`` and ``output`` fields; ``input`` is optional
    (missing or null becomes ""). Other fields are kept. Raises ``DataError`` naming the
    file and the record / line at fault, and ``FileNotFoundError`` if the file is missing.
    """
    path = Path(path)
    if _is_torch_file(path):
        raise DataError(f"{path}: a PyTorch file, not JSON records. lit-llama's prepared data (prepare_alpaca.py's "
                        f"train.pt and test.pt) is given as the directory that holds them: --data_path {path.parent}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err}); expected Alpaca records as JSON or JSONL") from None

    if path.suffix.lower() == ".jsonl":
        located = _parse_jsonl(path, text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            if text.lstrip().startswith("{"):  # probably JSONL under another name
                located = _parse_jsonl(path, text)
            else:
                raise DataError(f"{path}: malformed JSON {_where(err)}") from None
        else:
            if not isinstance(data, list):
                raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
            located = [(f"record {i}", rec) for i, rec in enumerate(data)]

    if not located:
        raise DataError(f"{path}: the data set is empty")
    return [_check_record(path, where, rec) for where, rec in located]


def _parse_jsonl(path: Path, text: str) -> list[tuple[str, Any]]:
    """Parse JSONL text into ``(location, object)`` pairs, skipping blank lines."""
    located = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: malformed JSON at line {lineno}, {_where(err, with_line=False)}") from None
        located.append((f"record {len(located)} (line {lineno})", obj))
    return located


def _is_torch_file(path: Path) -> bool:
    """A .pt/.pth name, or torch.save's zip container (whatever the name)."""
    if path.suffix.lower() in (".pt", ".pth"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def _where(err: json.JSONDecodeError, with_line: bool = True) -> str:
    """'at line L, column C (character P): <what>, near <snippet>' for a JSON error, and a hint
    when the text ends before the value does (a truncated file)."""
    doc, pos = err.doc, err.pos
    snippet = doc[max(0, pos - 30):pos + 30]
    what = err.msg[:-3] + " here" if err.msg.endswith(" at") else err.msg  # "Unterminated string starting at"
    ends = ("; the text ends before it is closed: is the file truncated?"
            if err.msg.startswith("Unterminated") or not doc[pos:].strip() else "")
    line = f"at line {err.lineno}, " if with_line else ""
    return f"{line}column {err.colno} (character {pos}): {what}, near {snippet!r}{ends}"


def _check_record(path: Path, where: str, record: Any) -> dict:
    """Validate one record and return a copy with ``input`` defaulted to ""."""
    if not isinstance(record, dict):
        raise DataError(f"{path}: {where} is a {type(record).__name__}, expected an object")
    for field in ("instruction", "output"):
        if field not in record:
            raise DataError(f"{path}: {where} has no {field!r} field")
        if not isinstance(record[field], str):
            kind = type(record[field]).__name__
            raise DataError(f"{path}: {where} field {field!r} must be a string, got {kind}")
    out = dict(record)
    if out.get("input") is None:
        out["input"] = ""
    elif not isinstance(out["input"], str):
        raise DataError(f"{path}: {where} field 'input' must be a string, got {type(out['input']).__name__}")
    return out


def split_records(records: Sequence[dict], val_size: int | float, seed: int = 42) -> tuple[list[dict], list[dict]]:
    """Split into ``(train, val)`` deterministically; ``val_size`` is a count or a fraction in (0, 1).

    Both parts keep the original relative order. (lit-llama uses torch's ``random_split``;
    the same records are not selected here.)
    """
    n = len(records)
    if isinstance(val_size, float) and not 0.0 < val_size < 1.0:
        raise ValueError(f"val_size as a fraction must be in (0, 1), got {val_size}")
    count = round(val_size * n) if isinstance(val_size, float) else int(val_size)
    if not 0 <= count < n:
        raise ValueError(f"val_size={val_size} leaves no training records out of {n}")
    val_idx = set(np.random.default_rng(seed).permutation(n)[:count].tolist())
    train = [r for i, r in enumerate(records) if i not in val_idx]
    val = [r for i, r in enumerate(records) if i in val_idx]
    return train, val


# --------------------------------------------------------------------------- tokenized samples


def prepare_sample(
    record: dict,
    tokenizer: TextTokenizer,
    max_length: int = 256,
    mask_inputs: bool = False,
    ignore_index: int = IGNORE_INDEX,
    style: PromptStyle | None = None,
) -> dict:
    """Tokenize one record exactly like lit-llama's ``prepare_alpaca.prepare_sample`` (with the
    default Alpaca style; another `style` renders the record its way, same cut and masking).

    Returns the record's fields plus int32 arrays ``input_ids`` (prompt + output, BOS and
    EOS, truncated to ``max_length`` after EOS is appended), ``input_ids_no_response``
    (prompt with BOS, same truncation) and ``labels`` (a copy of ``input_ids``; with
    ``mask_inputs`` the prompt positions are set to ``ignore_index``), and ``num_tokens``,
    the length of ``input_ids`` before truncation (not in lit-llama's files).
    """
    encoded = encode_rendered((style or get_style(DEFAULT_STYLE)).render(record), tokenizer, max_length)
    labels = encoded.input_ids.copy()
    if mask_inputs:
        labels[: len(encoded.prompt_ids)] = ignore_index
    return {**record, "input_ids": encoded.input_ids, "input_ids_no_response": encoded.prompt_ids,
            "labels": labels, "num_tokens": encoded.num_tokens}


def prepare_records(
    records: Sequence[dict], tokenizer: TextTokenizer, max_length: int = 256, mask_inputs: bool = False,
    style: PromptStyle | None = None,
) -> list[dict]:
    """``prepare_sample`` applied to every record (``count_truncated`` says how many were cut)."""
    return [prepare_sample(r, tokenizer, max_length, mask_inputs, style=style) for r in records]


def count_truncated(samples: Sequence[dict], max_seq_length: int) -> int:
    """How many samples are longer than ``max_seq_length`` tokens and so lose their end: cut when
    prepared (``num_tokens``, the length before truncation) or, for lit-llama's prepared files,
    by the batcher."""
    return sum(1 for s in samples if s.get("num_tokens", len(s["input_ids"])) > max_seq_length)


def load_prepared(path: PathLike, allow_pickle: bool = False) -> list[dict]:
    """Read lit-llama's prepared ``train.pt`` / ``test.pt`` (a list of dicts of tensors).

    Loads with ``torch.load(weights_only=True)``; ``allow_pickle=True`` permits a full
    unpickle for files that need it (only for files you trust). Tensors become numpy
    arrays, the token fields int32. Needs PyTorch.
    """
    try:
        import torch
    except ImportError:
        raise ImportError("load_prepared needs PyTorch to read .pt files: pip install torch") from None
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prepared data file not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as err:
        raise DataError(
            f"{path}: cannot be read with weights_only=True ({err}); "
            "pass allow_pickle=True if you trust the file"
        ) from None
    except RuntimeError as err:
        raise DataError(f"{path}: not a torch.save file ({err})") from None

    if not isinstance(data, (list, tuple)):
        raise DataError(f"{path}: expected a list of samples, got {type(data).__name__}")
    if not data:
        raise DataError(f"{path}: the data set is empty")
    samples = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise DataError(f"{path}: sample {i} is a {type(item).__name__}, expected a dict")
        for key in ("input_ids", "labels"):
            if key not in item:
                raise DataError(f"{path}: sample {i} has no {key!r} field")
        sample = {}
        for key, value in item.items():
            if isinstance(value, torch.Tensor):
                value = value.cpu().numpy()
            if key in _TOKEN_KEYS:
                value = np.asarray(value, dtype=np.int32).reshape(-1)
            sample[key] = value
        samples.append(sample)
    return samples


# --------------------------------------------------------------------------- batching


def bucket_lengths(max_seq_length: int, min_length: int = 64) -> tuple[int, ...]:
    """Padded lengths a batch may take: powers of two from ``min_length``, then ``max_seq_length``.

    E.g. 256 -> (64, 128, 256); 300 -> (64, 128, 256, 300); 40 -> (40,).
    """
    if max_seq_length < 1:
        raise ValueError(f"max_seq_length must be positive, got {max_seq_length}")
    lengths = []
    n = min_length
    while n < max_seq_length:
        lengths.append(n)
        n *= 2
    lengths.append(max_seq_length)
    return tuple(lengths)


def _pad_rows(
    samples: Sequence[dict], rows: int, buckets: Sequence[int], max_seq_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Stack samples into ``(rows, T)`` ids (pad 0) and labels (pad -1), truncated to ``max_seq_length``.

    T is the smallest bucket that holds the longest (truncated) sample; rows beyond
    ``len(samples)`` are pure padding.
    """
    longest = max(min(len(s["input_ids"]), max_seq_length) for s in samples)
    return _rows_at(dict(enumerate(samples)), rows, next(b for b in buckets if b >= longest), max_seq_length)


def _rows_at(samples: Mapping[int, dict], rows: int, length: int, max_seq_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, length) ids (pad 0) and labels (pad -1) holding each sample at its row; other rows are padding."""
    ids = np.full((rows, length), PAD_ID, dtype=np.int32)
    labels = np.full((rows, length), IGNORE_INDEX, dtype=np.int32)
    for row, s in samples.items():
        x = np.asarray(s["input_ids"][:max_seq_length], dtype=np.int32)
        y = np.asarray(s["labels"][:max_seq_length], dtype=np.int32)
        ids[row, : len(x)] = x
        labels[row, : len(y)] = y
    return ids, labels


class LazySamples(Sequence):
    """Records tokenized on first use and kept: in a run of several processes each tokenizes
    only the samples its own batch rows hold (`Batcher(local=...)`)."""

    def __init__(self, records: Sequence[dict], prepare: Callable[[dict], dict]) -> None:
        self.records, self.prepare, self._done = list(records), prepare, {}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        if i not in self._done:
            self._done[i] = self.prepare(self.records[i])
        return self._done[i]

    @property
    def tokenized(self) -> int:
        return len(self._done)


@dataclass(frozen=True)
class LocalRows:
    """A process's part of every training batch (rows in flattened (n_micro, micro_batch_size)
    order): `fill`, the rows its devices hold (the others stay padding: other processes fill
    them); `count`, the rows whose tokens it counts (it is the lowest process holding them);
    `agree`, (longest local sample, counted tokens) -> the whole batch's, over all processes."""

    fill: np.ndarray
    count: np.ndarray
    agree: Callable[[int, int], tuple[int, int]]


def _check_buckets(buckets: Sequence[int] | None, max_seq_length: int) -> tuple[int, ...]:
    """Default or validate a set of bucket lengths; ``max_seq_length`` is always included."""
    if buckets is None:
        return bucket_lengths(max_seq_length)
    lengths = sorted({int(b) for b in buckets} | {max_seq_length})
    if lengths[0] < 1 or lengths[-1] > max_seq_length:
        raise ValueError(f"bucket lengths must be in [1, {max_seq_length}], got {list(buckets)}")
    return tuple(lengths)


class Batcher:
    """Endless iterator of training batches over epochs of shuffled samples.

    Each ``next()`` gives ``{"input_ids", "labels", "index"}``: int32 arrays of shape
    ``(n_micro, micro_batch_size, T)`` (``index``: ``(n_micro, micro_batch_size)``, the
    sample positions), with ``n_micro = batch_size // micro_batch_size`` gradient
    accumulation micro-batches and T the smallest bucket length that holds the longest
    sample of the whole batch. Samples longer than ``max_seq_length`` are truncated.

    Epoch ``e`` visits the samples in ``permutation(rng(seed, e))`` order. When an epoch
    runs out in the middle of a batch, the batch is completed from the start of the next
    epoch's order, so every batch is full and no sample is dropped or repeated within an
    epoch. ``state()`` / ``restore()`` (or ``state=``) give exact resumption.
    """

    def __init__(
        self,
        samples: Sequence[dict],
        batch_size: int,
        micro_batch_size: int,
        max_seq_length: int,
        seed: int = 0,
        buckets: Sequence[int] | None = None,
        state: dict | None = None,
        local: LocalRows | None = None,
    ) -> None:
        if not samples:
            raise ValueError("Batcher needs at least one sample")
        if micro_batch_size < 1 or batch_size < 1:
            raise ValueError(f"batch sizes must be positive, got {batch_size=}, {micro_batch_size=}")
        if batch_size % micro_batch_size:
            raise ValueError(
                f"batch_size={batch_size} is not a multiple of micro_batch_size={micro_batch_size}"
            )
        self.samples = samples
        self.batch_size = batch_size
        self.micro_batch_size = micro_batch_size
        self.n_micro = batch_size // micro_batch_size
        self.max_seq_length = max_seq_length
        self.seed = seed
        self.buckets = _check_buckets(buckets, max_seq_length)
        self.local = local
        self.epoch = 0
        self.position = 0
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)
        if state is not None:
            self.restore(state)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Sample indices in the order epoch ``epoch`` visits them."""
        if epoch != self._order_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order = rng.permutation(len(self.samples))
            self._order_epoch = epoch
        return self._order

    def state(self) -> dict:
        """Where the next batch starts: a small JSON-able dict for checkpoints."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_samples": len(self.samples)}

    def restore(self, state: dict) -> None:
        """Continue from a ``state()``; checks that seed and data size match."""
        for key, mine in (("seed", self.seed), ("num_samples", len(self.samples))):
            if key in state and state[key] != mine:
                raise ValueError(f"batcher state was saved with {key}={state[key]}, this batcher has {mine}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < len(self.samples):
            raise ValueError(f"invalid batcher state {state}")
        self.epoch, self.position = epoch, position

    def next_indices(self) -> np.ndarray:
        """Advance by one batch and return its ``batch_size`` sample indices."""
        n = len(self.samples)
        picked: list[np.ndarray] = []
        need = self.batch_size
        while need:
            order = self.epoch_order(self.epoch)
            take = order[self.position : self.position + need]
            picked.append(take)
            need -= len(take)
            self.position += len(take)
            if self.position == n:
                self.epoch, self.position = self.epoch + 1, 0
        return np.concatenate(picked)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        idx = self.next_indices()
        L = self.max_seq_length
        if self.local is None:
            rows = {row: self.samples[i] for row, i in enumerate(idx)}
            counted = rows
        else:  # only this process's rows; the batch's length and token count agreed with the others
            rows = {row: self.samples[i] for row, i in enumerate(idx) if self.local.fill[row]}
            counted = {row: s for row, s in rows.items() if self.local.count[row]}
        longest = max((min(len(s["input_ids"]), L) for s in rows.values()), default=1)
        tokens = sum(min(len(s["input_ids"]), L) for s in counted.values())
        if self.local is not None:
            longest, tokens = self.local.agree(longest, tokens)
        ids, labels = _rows_at(rows, self.batch_size, next(b for b in self.buckets if b >= longest), L)
        shape = (self.n_micro, self.micro_batch_size, ids.shape[1])
        return {
            "input_ids": ids.reshape(shape),
            "labels": labels.reshape(shape),
            "index": idx.astype(np.int32).reshape(shape[:2]),
            "tokens": np.asarray(tokens, np.int64),  # real (unpadded) tokens of the whole batch
        }


def eval_batches(
    samples: Sequence[dict],
    micro_batch_size: int,
    max_seq_length: int,
    buckets: Sequence[int] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Validation batches of shape ``(1, micro_batch_size, T)``, in order, each sample once.

    Same keys and padding as ``Batcher``. The last batch is filled with padding rows
    (labels all -1, ``index`` -1) so every batch is full. Pass ``buckets=[max_seq_length]``
    for a single fixed shape.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
    lengths = _check_buckets(buckets, max_seq_length)
    for start in range(0, len(samples), micro_batch_size):
        chunk = samples[start : start + micro_batch_size]
        ids, labels = _pad_rows(chunk, micro_batch_size, lengths, max_seq_length)
        index = np.full(micro_batch_size, -1, dtype=np.int32)
        index[: len(chunk)] = np.arange(start, start + len(chunk))
        yield {"input_ids": ids[None], "labels": labels[None], "index": index[None]}
