"""SentencePiece tokenizer with lit-llama's ``encode``/``decode`` semantics.

``encode`` prepends BOS / appends EOS and only *then* truncates to ``max_length``
(lit-llama's behaviour: a text longer than ``max_length`` loses its EOS).
Token ids are returned as int32 numpy arrays, like lit-llama's ``torch.int`` tensors.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

__all__ = ["Tokenizer"]

PathLike = str | os.PathLike


class Tokenizer:
    """A SentencePiece model loaded from ``path`` (e.g. LLaMA's ``tokenizer.model``)."""

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"tokenizer model not found: {self.path}")
        if not self.path.is_file():
            raise ValueError(f"tokenizer model path is not a file: {self.path}")
        self.processor = spm.SentencePieceProcessor()
        try:
            self.processor.Load(str(self.path))
        except (RuntimeError, OSError) as err:
            raise ValueError(f"not a SentencePiece model: {self.path} ({err})") from None

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"

    @property
    def bos_id(self) -> int:
        """Id prepended by ``encode(bos=True)`` (1 for LLaMA)."""
        return self.processor.bos_id()

    @property
    def eos_id(self) -> int:
        """Id appended by ``encode(eos=True)`` (2 for LLaMA)."""
        return self.processor.eos_id()

    @property
    def pad_id(self) -> int:
        """Pad id of the model; -1 for LLaMA, which has no pad piece."""
        return self.processor.pad_id()

    @property
    def vocab_size(self) -> int:
        """Number of pieces in the model."""
        return self.processor.vocab_size()

    def encode(self, text: str, bos: bool = True, eos: bool = False, max_length: int = -1) -> np.ndarray:
        """Encode ``text`` to int32 ids: add BOS/EOS, then truncate to ``max_length`` if > 0."""
        tokens: list[int] = self.processor.encode(text)
        if bos:
            tokens = [self.bos_id] + tokens
        if eos:
            tokens = tokens + [self.eos_id]
        if max_length > 0:
            tokens = tokens[:max_length]
        return np.asarray(tokens, dtype=np.int32)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Decode ids (list, numpy or jax array) back to text; BOS/EOS decode to nothing."""
        return self.processor.decode([int(i) for i in np.asarray(ids).reshape(-1)])

    @staticmethod
    def train(
        input_file: PathLike | Sequence[PathLike],
        destination_dir: PathLike,
        vocab_size: int,
        model_type: str = "bpe",
        model_name: str = "tokenizer",
        byte_fallback: bool = True,
        character_coverage: float = 1.0,
        **options: Any,
    ) -> Path:
        """Train a SentencePiece model with LLaMA's special ids and return its path.

        ``input_file`` is one or more plain-text files (one sentence per line). The model
        gets unk=0, bos=1, eos=2 and no pad piece (pad_id=-1), as LLaMA's. Extra keyword
        ``options`` go to ``SentencePieceTrainer`` (e.g. ``split_digits=True``).
        Writes ``{destination_dir}/{model_name}.model`` and ``.vocab``.
        """
        files = [input_file] if isinstance(input_file, (str, os.PathLike)) else list(input_file)
        for f in files:
            if not Path(f).is_file():
                raise FileNotFoundError(f"tokenizer training file not found: {f}")
        destination = Path(destination_dir)
        destination.mkdir(parents=True, exist_ok=True)
        prefix = destination / model_name
        spm.SentencePieceTrainer.Train(
            input=[str(f) for f in files],
            model_prefix=str(prefix),
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=byte_fallback,
            character_coverage=character_coverage,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            **options,
        )
        return prefix.with_suffix(".model")
