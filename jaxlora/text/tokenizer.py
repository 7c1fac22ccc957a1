"""Tokenizers: SentencePiece ``tokenizer.model`` (LLaMA 1/2, lit-llama) and Hugging Face
``tokenizer.json`` (Llama 3's byte-level BPE, and the Llama 2 / Mistral / TinyLlama ports), behind
one small interface (`TextTokenizer`); `open_tokenizer` picks one from a file or a model directory.

``encode`` prepends BOS / appends EOS and only *then* truncates to ``max_length`` (lit-llama's
behaviour: a text longer than ``max_length`` loses its EOS). Token ids are int32 numpy arrays,
like lit-llama's ``torch.int`` tensors. The SentencePiece side is lit-llama's, bit for bit.

A tokenizer.json encodes as transformers' fast tokenizer called with ``add_special_tokens=False``
(special tokens written in the text, such as ``<|eot_id|>``, become their ids, as there), and
decodes as its ``decode`` (special tokens kept unless asked). BOS/EOS come from the model's own
files beside the tokenizer: tokenizer_config.json's ``bos_token``/``eos_token`` (``eos_id``, what
``encode(eos=True)`` appends) and generation_config.json's ``eos_token_id``, one id or a list
(``eos_ids``: any of them ends a generation; Llama 3 instruct stops at ``<|eot_id|>`` and
``<|end_of_text|>``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import sentencepiece as spm
import tokenizers

from jaxlora.errors import TokenizerError

__all__ = ["HFTokenizer", "ModelFiles", "TextTokenizer", "Tokenizer", "open_tokenizer", "tokenizer_file"]

PathLike = str | os.PathLike
TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
# A directory holding both (HF ports of Llama 2, Mistral) is read through tokenizer.json: it is
# what transformers (and so the model's fine-tuners) use, it knows the model's special tokens,
# and Llama 3's tokenizer.model is not SentencePiece at all (tiktoken). lit-llama's folders hold
# only tokenizer.model, so they are read as before.
TOKENIZER_FILES = (TOKENIZER_JSON, SENTENCEPIECE_MODEL)
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
MODEL_CONFIG = "config.json"  # HF's; its eos_token_id stands in when there is no generation_config.json
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # newer transformers save the template here (it wins)
TEMPLATE_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")  # what a chat template may name


class TextTokenizer(Protocol):
    """What training and generation need of a tokenizer, whichever its kind."""

    path: Path
    model_files: ModelFiles
    reads_special_tokens: bool  # whether special tokens written in the text become their ids

    @property
    def bos_id(self) -> int | None: ...
    @property
    def eos_id(self) -> int: ...
    @property
    def eos_ids(self) -> tuple[int, ...]: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def special_tokens(self) -> dict[str, int]: ...

    def encode(self, text: str, bos: bool = True, eos: bool = False, max_length: int = -1) -> np.ndarray: ...
    def decode(self, ids: Iterable[int] | np.ndarray) -> str: ...
    def token_id(self, token: str) -> int | None: ...
    def token_text(self, token_id: int) -> str: ...


# ----------------------------------------------------------------------------- the model's files


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; {} when there is no such file; TokenizerError naming it when bad."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise TokenizerError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def id_list(value: Any) -> list[int]:
    """generation_config.json's eos_token_id: one id, a list of them, or absent."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    return [int(v) for v in values if isinstance(v, int) and not isinstance(v, bool)]


def unique(ids: Iterable[int]) -> tuple[int, ...]:
    """Ids in first-seen order, each once."""
    return tuple(dict.fromkeys(int(i) for i in ids))


@dataclass(frozen=True)
class ModelFiles:
    """What a model directory says about its text beside the tokenizer itself: special tokens,
    the ids that end a generation, and its chat template (if it ships one)."""

    directory: Path
    tokenizer_config: dict[str, Any] = field(default_factory=dict)
    generation_config: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None
    chat_template_source: Path | None = None  # the file it came from, for error messages

    @classmethod
    def read(cls, directory: PathLike) -> ModelFiles:
        directory = Path(directory)
        tok_config = read_json(directory / TOKENIZER_CONFIG)
        gen_config = read_json(directory / GENERATION_CONFIG) or {
            k: v for k, v in read_json(directory / MODEL_CONFIG).items() if k in ("bos_token_id", "eos_token_id")}
        template, source = read_chat_template(directory, tok_config)
        return cls(directory, tok_config, gen_config, template, source)

    def token(self, key: str) -> str | None:
        """tokenizer_config.json's text for `key` ("bos_token", "eos_token", ...), if given."""
        return token_content(self.tokenizer_config.get(key))

    @property
    def generation_eos_ids(self) -> list[int]:
        return id_list(self.generation_config.get("eos_token_id"))


def read_chat_template(directory: Path, tok_config: dict[str, Any]) -> tuple[str | None, Path | None]:
    """(template, its file): chat_template.jinja, else tokenizer_config.json's "chat_template"
    (a string, or a list of named templates of which "default" is the chat one)."""
    jinja_file = directory / CHAT_TEMPLATE_FILE
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8"), jinja_file
    template = tok_config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None:
        return None, None
    if not isinstance(template, str):
        raise TokenizerError(f"{directory / TOKENIZER_CONFIG}: chat_template is not a string (or a list with a "
                             "'default' entry)")
    return template, directory / TOKENIZER_CONFIG


def with_bos_eos(ids: Sequence[int], bos_id: int | None, eos_id: int, bos: bool, eos: bool,
                 max_length: int) -> np.ndarray:
    """lit-llama's order: BOS and EOS added first, then the cut to max_length (if > 0)."""
    tokens = list(ids)
    if bos and bos_id is not None:
        tokens = [bos_id] + tokens
    if eos:
        tokens = tokens + [eos_id]
    if max_length > 0:
        tokens = tokens[:max_length]
    return np.asarray(tokens, dtype=np.int32)


def existing_file(path: PathLike, what: str) -> Path:
    """`path`, refused by name when it is missing or not a file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if not path.is_file():
        raise ValueError(f"{what} path is not a file: {path}")
    return path


def as_id_list(ids: Iterable[int] | np.ndarray) -> list[int]:
    """Ids from a list, numpy or jax array (any shape) as Python ints."""
    return [int(i) for i in np.asarray(ids).reshape(-1)]


# ----------------------------------------------------------------------------- SentencePiece


class Tokenizer:
    """A SentencePiece model loaded from ``path`` (e.g. LLaMA's ``tokenizer.model``)."""

    reads_special_tokens = False  # "<s>" in the text is three characters, as in lit-llama

    def __init__(self, path: PathLike) -> None:
        self.path = existing_file(path, "tokenizer model")
        self.processor = spm.SentencePieceProcessor()
        try:
            self.processor.Load(str(self.path))
        except (RuntimeError, OSError) as err:
            raise ValueError(f"not a SentencePiece model: {self.path} ({err})") from None
        self.model_files = ModelFiles.read(self.path.parent)

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
    def eos_ids(self) -> tuple[int, ...]:
        """Ids that end a generation: EOS, and any more generation_config.json names."""
        extra = [i for i in self.model_files.generation_eos_ids if 0 <= i < self.vocab_size]
        return unique([self.eos_id] + extra)

    @property
    def pad_id(self) -> int:
        """Pad id of the model; -1 for LLaMA, which has no pad piece."""
        return self.processor.pad_id()

    @property
    def vocab_size(self) -> int:
        """Number of pieces in the model."""
        return self.processor.vocab_size()

    @property
    def special_tokens(self) -> dict[str, int]:
        """The control pieces (<s>, </s> for LLaMA): never produced from text."""
        p = self.processor
        return {p.id_to_piece(i): i for i in range(p.vocab_size()) if p.is_control(i)}

    def token_id(self, token: str) -> int | None:
        """The id of piece `token`, None if the model has no such piece."""
        i = self.processor.piece_to_id(token)
        return i if self.processor.id_to_piece(i) == token else None

    def token_text(self, token_id: int) -> str:
        return self.processor.id_to_piece(int(token_id))

    def encode(self, text: str, bos: bool = True, eos: bool = False, max_length: int = -1) -> np.ndarray:
        """Encode ``text`` to int32 ids: add BOS/EOS, then truncate to ``max_length`` if > 0."""
        return with_bos_eos(self.processor.encode(text), self.bos_id, self.eos_id, bos, eos, max_length)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Decode ids (list, numpy or jax array) back to text; BOS/EOS decode to nothing."""
        return self.processor.decode(as_id_list(ids))

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


SentencePieceTokenizer = Tokenizer


# ----------------------------------------------------------------------------- tokenizer.json


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (through the ``tokenizers`` library), with BOS/EOS
    from the tokenizer_config.json / generation_config.json beside it."""

    reads_special_tokens = True

    def __init__(self, path: PathLike) -> None:
        self.path = existing_file(path, "tokenizer file")
        try:
            self.backend = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as err:  # noqa: BLE001 (the Rust side raises plain Exceptions for any bad file)
            raise TokenizerError(f"not a Hugging Face tokenizer.json: {self.path} ({err})") from None
        self.backend.no_truncation()  # a file may carry settings for batching; encode returns every id
        self.backend.no_padding()
        self.model_files = ModelFiles.read(self.path.parent)
        self._bos = self.special_id("bos_token", "bos_token_id")
        eos = self.special_id("eos_token", "eos_token_id")
        extra = self.model_files.generation_eos_ids
        if eos is None and not extra:
            raise TokenizerError(f"{self.path}: no EOS token: {self.path.parent / TOKENIZER_CONFIG} has no eos_token "
                                 f"and {self.path.parent / GENERATION_CONFIG} no eos_token_id")
        self._eos_ids = unique(([] if eos is None else [eos]) + extra)
        self.check_ids(self._eos_ids, GENERATION_CONFIG)

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"

    def special_id(self, key: str, id_key: str) -> int | None:
        """The id of tokenizer_config.json's `key` token, else generation_config.json's `id_key`."""
        text = self.model_files.token(key)
        if text is not None:
            token_id = self.backend.token_to_id(text)
            if token_id is None:
                raise TokenizerError(f"{self.path.parent / TOKENIZER_CONFIG}: {key} {text!r} is not a token of "
                                     f"{self.path}")
            return token_id
        ids = id_list(self.model_files.generation_config.get(id_key))
        return ids[0] if ids else None

    def check_ids(self, ids: Iterable[int], source: str) -> None:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"{self.path.parent / source}: token ids {bad} are outside {self.path}'s "
                                 f"{self.vocab_size} ids")

    @property
    def bos_id(self) -> int | None:
        """Id prepended by ``encode(bos=True)``; None: the model has none (nothing is prepended)."""
        return self._bos

    @property
    def eos_id(self) -> int:
        """Id appended by ``encode(eos=True)``: tokenizer_config.json's eos_token."""
        return self._eos_ids[0]

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Ids that end a generation: eos_id, then generation_config.json's eos_token_id(s)."""
        return self._eos_ids

    @property
    def vocab_size(self) -> int:
        """Every id, added tokens included (128,256 for Llama 3)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> dict[str, int]:
        return {t.content: i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}

    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def token_text(self, token_id: int) -> str:
        return self.backend.id_to_token(int(token_id)) or ""

    def encode(self, text: str, bos: bool = True, eos: bool = False, max_length: int = -1) -> np.ndarray:
        """Encode ``text`` to int32 ids: add BOS/EOS, then truncate to ``max_length`` if > 0."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return with_bos_eos(ids, self.bos_id, self.eos_id, bos, eos, max_length)

    def decode(self, ids: Iterable[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
        """Decode ids (list, numpy or jax array) as transformers does (special tokens kept by default).
        transformers 5 ignores clean_up_tokenization_spaces for BPE tokenizers (it corrupts text); so do we."""
        return self.backend.decode(as_id_list(ids), skip_special_tokens=skip_special_tokens)


# ----------------------------------------------------------------------------- choosing one


def tokenizer_file(directory: PathLike) -> Path | None:
    """The tokenizer file a model directory holds (tokenizer.json first: see TOKENIZER_FILES)."""
    for name in TOKENIZER_FILES:
        candidate = Path(directory) / name
        if candidate.is_file():
            return candidate
    return None


def open_tokenizer(path: PathLike) -> Tokenizer | HFTokenizer:
    """The tokenizer at `path`: a tokenizer.json (any *.json) or a SentencePiece model file, or a
    model directory holding one (tokenizer.json preferred; see TOKENIZER_FILES)."""
    path = Path(path)
    if path.is_dir():
        found = tokenizer_file(path)
        if found is None:
            raise FileNotFoundError(f"{path}: no {' or '.join(TOKENIZER_FILES)} in this directory")
        path = found
    return HFTokenizer(path) if path.suffix == ".json" else Tokenizer(path)
