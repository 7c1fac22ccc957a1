"""Hugging Face weight files, one tensor at a time: safetensors (single or sharded with an
index json, as `save_pretrained` writes them) and `pytorch_model*.bin` (torch.save zips, read by
`TorchZipReader`, no torch needed); and a sharded safetensors writer.

`safetensors.safe_open` validates the header and gives shapes and dtypes; tensors (or blocks
of their rows) are read with pread at the header's offsets into fresh numpy buffers: no memory
map whose pages would stay resident, and bfloat16 as `ml_dtypes.bfloat16` bit for bit.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxlora.errors import StateDictError
from jaxlora.weights.torch_zip import TorchZipReader, pread_into

# HF's file names (transformers' SAFE_WEIGHTS_NAME, WEIGHTS_NAME and their "<name>.index.json").
MODEL_SAFETENSORS, MODEL_BIN = "model.safetensors", "pytorch_model.bin"
ADAPTER_SAFETENSORS, ADAPTER_BIN = "adapter_model.safetensors", "adapter_model.bin"
INDEX_SUFFIX = ".index.json"
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _np_dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _open(path: Path, framework: str) -> Any:
    """safe_open, reading with pread where safetensors offers it: pages of a memory-mapped file
    that were read stay in the process's resident set, so reading a whole checkpoint through
    the default mmap would end with its size in RSS."""
    try:
        f = safe_open(str(path), framework=framework, backend="pread")
    except TypeError:  # safetensors < 0.8: mmap only
        f = safe_open(str(path), framework=framework)
    f.__enter__()
    return f


def _data_offsets(path: Path) -> tuple[int, dict[str, tuple[int, int]]]:
    """(where the data starts, {key: (begin, end) within the data}) from the file's header."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return 8 + size, {k: tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__"}


class SafetensorsFile:
    """One .safetensors file: shapes() and dtypes() from its header, read(key, rows) as numpy."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self._file = _open(self.path, "numpy")
        except Exception as e:  # safetensors raises its own error types for damaged headers
            raise StateDictError(f"{self.path}: not a readable safetensors file: {e}") from e
        self._slices = {k: self._file.get_slice(k) for k in self._file.keys()}
        self._start, self._offsets = _data_offsets(self.path)
        self._fd = os.open(self.path, os.O_RDONLY)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(s.get_shape()) for k, s in self._slices.items()}

    def dtypes(self) -> dict[str, np.dtype]:
        out = {}
        for k, s in self._slices.items():
            if s.get_dtype() not in _DTYPES:
                raise StateDictError(f"{self.path}: tensor {k!r} has dtype {s.get_dtype()}; expected one of "
                                     f"{sorted(_DTYPES)}")
            out[k] = _np_dtype(_DTYPES[s.get_dtype()])
        return out

    def read(self, key: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor (or its rows [r0, r1)) read with pread into a fresh buffer: no memory map
        whose pages would stay resident, and bfloat16 bit for bit (ml_dtypes)."""
        shape, dtype = tuple(self._slices[key].get_shape()), _np_dtype(_DTYPES[self._slices[key].get_dtype()])
        begin, end = self._offsets[key]
        r0, r1 = (0, shape[0] if shape else 1) if rows is None else rows
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        buf = np.empty((r1 - r0) * row_bytes, np.uint8)
        if pread_into(self._fd, memoryview(buf), self._start + begin + r0 * row_bytes) != buf.nbytes \
                or begin + r1 * row_bytes > end:
            raise StateDictError(f"{self.path}: tensor {key!r} is truncated")
        return buf.view(dtype).reshape(((r1 - r0,) if shape else ()) + shape[1:])

    def close(self) -> None:
        if self._file is not None:
            self._file.__exit__(None, None, None)
            os.close(self._fd)
        self._file = None


class WeightFiles:
    """The tensors of one or several files (a sharded checkpoint), each key in one file."""

    def __init__(self, files: dict[Path, Any], source: str) -> None:
        self.files, self.source = files, source
        self.where: dict[str, Any] = {}
        for path, reader in files.items():
            for key in reader.shapes():
                if key in self.where:
                    raise StateDictError(f"{source}: tensor {key!r} is in two files ({path.name} and another)")
                self.where[key] = reader

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v) for r in self.files.values() for k, v in r.shapes().items()}

    def dtypes(self) -> dict[str, np.dtype]:
        return {k: np.dtype(v) for r in self.files.values() for k, v in r.dtypes().items()}

    def read(self, key: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        return self.where[key].read(key, rows)

    def close(self) -> None:
        for reader in self.files.values():
            reader.close()

    def __enter__(self) -> "WeightFiles":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def weight_files(directory: str | os.PathLike, names: Sequence[str] = (MODEL_SAFETENSORS, MODEL_BIN)) -> list[Path]:
    """The files holding a directory's weights, by HF's conventions: for each name in turn, its
    index json (every shard it names must exist) or the file itself. Raises FileNotFoundError."""
    directory = Path(directory)
    for name in names:
        index = directory / (name + INDEX_SUFFIX)
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise StateDictError(f"{index}: not a weight index (no 'weight_map'): {e!r}") from e
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (directory / s).is_file()]
            if missing:
                raise FileNotFoundError(f"{index}: names shard file(s) that are missing: {', '.join(missing)}")
            return [directory / s for s in shards]
        if (directory / name).is_file():
            return [directory / name]
    raise FileNotFoundError(f"{directory}: no weights ({', '.join(n + '[' + INDEX_SUFFIX + ']' for n in names)})")


def open_weights(directory: str | os.PathLike, names: Sequence[str] = (MODEL_SAFETENSORS, MODEL_BIN)) -> WeightFiles:
    """All weights of an HF directory, read lazily; an index's keys are checked against its shards."""
    files = weight_files(directory, names)
    readers: dict[Path, Any] = {}
    try:
        for path in files:
            readers[path] = SafetensorsFile(path) if path.suffix == ".safetensors" else TorchZipReader(path)
        reader = WeightFiles(readers, str(directory))
        index = next((Path(directory) / (n + INDEX_SUFFIX) for n in names
                      if (Path(directory) / (n + INDEX_SUFFIX)).is_file()), None)
        if index is not None:
            listed = json.loads(index.read_text())["weight_map"]
            absent = [f"{k!r} (in {f})" for k, f in listed.items() if reader.where.get(k) is not readers[Path(directory) / f]]
            if absent:
                raise StateDictError(f"{index}: {len(absent)} tensor(s) not found in the shard the index names: "
                                     + ", ".join(absent[:5]))
        return reader
    except BaseException:
        for r in readers.values():
            r.close()
        raise


def parse_size(size: str | int) -> int:
    """'2GB' | '500MB' | bytes -> bytes (decimal units, as transformers' max_shard_size)."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for unit, factor in (("GB", 10 ** 9), ("MB", 10 ** 6), ("KB", 10 ** 3), ("B", 1)):
        if text.endswith(unit):
            return int(float(text[:-len(unit)]) * factor)
    return int(text)


def plan_shards(sizes: Sequence[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Keys in order, cut into consecutive shards of at most max_shard_bytes (a larger tensor alone)."""
    shards: list[list[str]] = [[]]
    total = 0
    for key, nbytes in sizes:
        if shards[-1] and total + nbytes > max_shard_bytes:
            shards.append([])
            total = 0
        shards[-1].append(key)
        total += nbytes
    return shards


def save_sharded(directory: str | os.PathLike, sizes: Sequence[tuple[str, int]],
                 tensors: Iterable[tuple[str, np.ndarray]], max_shard_bytes: int, name: str = MODEL_SAFETENSORS,
                 progress: Callable[[str, int], None] | None = None) -> list[str]:
    """Write tensors as HF does: `name` when they fit one shard, else `model-0000k-of-0000N.safetensors`
    and `name.index.json`. sizes: (key, bytes) in order; `tensors` yields (key, tensor) in the
    same order, consumed as each shard is written, so the host holds at most one shard. Returns
    the file names written."""
    directory = Path(directory)
    shards = plan_shards(sizes, max_shard_bytes)
    stem, ext = name.rsplit(".", 1)
    names = [name] if len(shards) == 1 else [f"{stem}-{k + 1:05d}-of-{len(shards):05d}.{ext}" for k in range(len(shards))]
    stream = iter(tensors)
    for keys, file_name in zip(shards, names):
        shard = {}
        for key in keys:
            got, value = next(stream)
            if got != key:
                raise ValueError(f"{file_name}: tensor {got!r} arrived where {key!r} was planned")
            shard[key] = np.ascontiguousarray(value)
            if progress:
                progress(key, shard[key].nbytes)
        save_file(shard, str(directory / file_name), metadata={"format": "pt"})
        del shard
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(n for _, n in sizes)},
                 "weight_map": {key: file_name for keys, file_name in zip(shards, names) for key in keys}}
        (directory / (name + INDEX_SUFFIX)).write_text(json.dumps(index, indent=2) + "\n")
    return names


def tensor_sizes(shapes: Iterable[tuple[str, tuple[int, ...], np.dtype]]) -> list[tuple[str, int]]:
    return [(k, int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize) for k, s, d in shapes]
