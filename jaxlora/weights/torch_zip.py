"""`torch.save` zip files, one tensor at a time: a lazy reader and a streaming writer.

Why not `torch.load(mmap=True)`: pages of a memory-mapped file that have been touched stay
in the process's resident set, so reading a whole 27 GB checkpoint through an mmap ends with
an RSS of 27 GB. `TorchZipReader` instead `pread`s each tensor's bytes from its zip entry
into a fresh numpy array (the page cache keeps the file, the process does not), and needs
no torch at all. `write_torch_zip` writes tensor by tensor in the layout `torch.save` uses
(uncompressed entries aligned to 64 bytes, `data.pkl` describing them), so `torch.load`
(with or without `mmap=True`, `weights_only=True`) and lit-llama's `lazy_load` read it.

The format (torch >= 1.6 "zipfile serialization"): a zip whose entries live under one folder
`<archive>/`: `data.pkl` (pickle protocol 2 of the state dict, where every tensor is
`torch._utils._rebuild_tensor_v2(<persistent id ('storage', torch.FloatStorage, key,
'cpu', numel)>, offset, size, stride, requires_grad, OrderedDict())`), the raw little-endian
bytes of storage `key` in `data/<key>`, plus `version`, `byteorder` and friends.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import threading
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import ml_dtypes
import numpy as np

from jaxlora.weights.torch_io import atomic_write, require_torch

# torch's legacy typed-storage class names, as pickled by torch.save, and their numpy dtypes.
STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
_DTYPE_STORAGE = {v: k for k, v in STORAGE_DTYPES.items()}
_READ_LOCK = threading.Lock()
ALIGNMENT = 64  # torch aligns every storage record to 64 bytes (needed by mmap loading)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor of a torch zip lives: its storage record and view geometry."""

    storage_key: str
    dtype: np.dtype
    storage_numel: int
    offset: int  # in elements, into the storage
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def contiguous(self) -> bool:
        expected, acc = [], 1
        for n in reversed(self.shape):
            expected.append(acc)
            acc *= n
        return all(s == e for s, e, n in zip(self.stride, reversed(expected), self.shape) if n > 1)


class _StorageType:
    def __init__(self, name: str) -> None:
        self.name = name


def _rebuild_tensor(storage: tuple, offset: int, size: tuple, stride: tuple, *_: Any) -> TensorInfo:
    storage_type, key, numel = storage
    return TensorInfo(str(key), STORAGE_DTYPES[storage_type.name], int(numel), int(offset),
                      tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data: TensorInfo, *_: Any) -> TensorInfo:
    return data


class _Unpickler(pickle.Unpickler):
    """Builds TensorInfo records instead of tensors; refuses any other global (like weights_only)."""

    ALLOWED = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("collections", "OrderedDict"): collections.OrderedDict,
    }

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"unsupported object {module}.{name} in the pickle "
                                     "(expected a flat state dict of plain tensors)")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        return storage_type, key, numel


class TorchZipReader:
    """A `torch.save`d flat state dict, read lazily tensor by tensor into numpy (bf16 included).

    `shapes()` and `dtypes()` need no tensor data; `read(key)` returns a new C-contiguous array
    holding exactly the tensor's bytes. Raises ValueError naming the file when it is missing,
    not a zip (truncated, or torch's legacy format), damaged, or not a flat dict of tensors.
    Lit-llama's training checkpoints ({"model": state_dict, ...}) are read through "model".
    """

    def __init__(self, path: str | os.PathLike, verify_crc: bool = True) -> None:
        self.path = Path(path)
        self.verify_crc = verify_crc
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such file")
        if not zipfile.is_zipfile(self.path):
            raise ValueError(f"{self.path}: not a PyTorch zip checkpoint (truncated or damaged, or saved with "
                             "torch's legacy non-zip format: re-save it with torch.save in torch >= 1.6)")
        self._file = open(self.path, "rb")
        try:
            self._file_size = os.fstat(self._file.fileno()).st_size
            self._zip = zipfile.ZipFile(self._file)
            self._records = {info.filename: info for info in self._zip.infolist()}
            pkl = [n for n in self._records if n.endswith("data.pkl") and n.count("/") <= 1]
            if len(pkl) != 1:
                raise ValueError(f"{self.path}: a zip file, but not a torch.save checkpoint (no data.pkl)")
            self._prefix = pkl[0][: -len("data.pkl")]
            byteorder = self._records.get(self._prefix + "byteorder")
            self._big_endian = byteorder is not None and self._zip.read(byteorder).strip() == b"big"
            try:
                obj = _Unpickler(io.BytesIO(self._zip.read(pkl[0]))).load()
            except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, KeyError) as e:
                raise ValueError(f"{self.path}: cannot be read as a state dict: {e}") from e
            if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
                obj = obj["model"]  # lit-llama's training checkpoints nest the weights
            if not isinstance(obj, dict) or not all(isinstance(v, TensorInfo) for v in obj.values()):
                raise ValueError(f"{self.path}: expected a flat dict of tensors, got {type(obj).__name__}")
            self.tensors: dict[str, TensorInfo] = dict(obj)
            self._offsets: dict[str, int] = {}
        except zipfile.BadZipFile as e:
            self._file.close()
            raise ValueError(f"{self.path}: damaged zip file: {e}") from e
        except BaseException:
            self._file.close()
            raise

    def __enter__(self) -> "TorchZipReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: t.shape for k, t in self.tensors.items()}

    def dtypes(self) -> dict[str, np.dtype]:
        return {k: t.dtype for k, t in self.tensors.items()}

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def _data_offset(self, storage_key: str, nbytes: int) -> tuple[int, zipfile.ZipInfo]:
        name = f"{self._prefix}data/{storage_key}"
        info = self._records.get(name)
        if info is None:
            raise ValueError(f"{self.path}: storage record {name!r} is missing")
        if storage_key not in self._offsets:
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"{self.path}: record {name!r} is compressed; torch.save never does that")
            header = os.pread(self._file.fileno(), 30, info.header_offset)
            if len(header) != 30 or header[:4] != b"PK\x03\x04":
                raise ValueError(f"{self.path}: damaged zip entry {name!r}")
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            self._offsets[storage_key] = info.header_offset + 30 + name_len + extra_len
        offset = self._offsets[storage_key]
        if info.file_size < nbytes or offset + info.file_size > self._file_size:
            raise ValueError(f"{self.path}: record {name!r} is truncated ({info.file_size} bytes stored, "
                             f"{nbytes} needed)")
        return offset, info

    def read(self, key: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """Tensor `key` as a new numpy array (same bits; bfloat16 as ml_dtypes.bfloat16).

        rows=(start, stop): only those rows (along axis 0) of a contiguous tensor, for reading
        a large tensor in pieces; the record's CRC is then checked by `verify(key)` instead.
        """
        t = self.tensors[key]
        storage_bytes = t.storage_numel * t.dtype.itemsize
        offset, info = self._data_offset(t.storage_key, storage_bytes)
        shape = t.shape
        if rows is not None:
            if not t.contiguous or not shape:
                raise ValueError(f"{self.path}: tensor {key!r} cannot be read by rows (not contiguous)")
            r0, r1 = max(0, rows[0]), min(shape[0], rows[1])
            row = int(np.prod(shape[1:], dtype=np.int64))
            shape = (r1 - r0, *shape[1:])
            start, count = t.offset + r0 * row, (r1 - r0) * row
        elif t.contiguous:
            start, count = t.offset, t.numel
        else:  # read the span the view covers, then gather it
            start = t.offset
            count = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride)) if t.numel else 0
        if start + count > t.storage_numel:
            raise ValueError(f"{self.path}: tensor {key!r} lies outside its storage")
        whole = start == 0 and count == t.storage_numel
        out = np.empty(count, t.dtype)
        buf = memoryview(out.view(np.uint8))
        got = pread_into(self._file.fileno(), buf, offset + start * t.dtype.itemsize)
        if got != len(buf):
            raise ValueError(f"{self.path}: tensor {key!r} is truncated ({got} of {len(buf)} bytes)")
        if self.verify_crc and whole and zlib.crc32(buf) != info.CRC:
            raise ValueError(f"{self.path}: tensor {key!r} is damaged (CRC mismatch)")
        if self._big_endian:
            out = out.byteswap()
        if rows is not None or t.contiguous:
            return out.reshape(shape)
        strided = np.lib.stride_tricks.as_strided(
            out, t.shape, tuple(s * t.dtype.itemsize for s in t.stride), writeable=False)
        return np.ascontiguousarray(strided)

    def verify(self, key: str, block: int = 64 << 20) -> None:
        """Check the CRC of tensor `key`'s whole storage record, streaming (no large buffer)."""
        t = self.tensors[key]
        nbytes = t.storage_numel * t.dtype.itemsize
        offset, info = self._data_offset(t.storage_key, nbytes)
        crc, done, buf = 0, 0, bytearray(min(block, max(info.file_size, 1)))
        view = memoryview(buf)
        while done < info.file_size:
            n = pread_into(self._file.fileno(), view[:min(block, info.file_size - done)], offset + done)
            if n == 0:
                raise ValueError(f"{self.path}: tensor {key!r} is truncated")
            crc = zlib.crc32(view[:n], crc)
            done += n
        if crc != info.CRC:
            raise ValueError(f"{self.path}: tensor {key!r} is damaged (CRC mismatch)")


def pread_into(fd: int, buf: memoryview, offset: int) -> int:
    """Fill buf from the file at offset (positional, so safe from several threads); bytes read."""
    done, step = 0, 1 << 30
    if not hasattr(os, "preadv"):  # e.g. Windows: serialise seek + read
        with _READ_LOCK:
            os.lseek(fd, offset, os.SEEK_SET)
            with open(fd, "rb", closefd=False) as f:
                return f.readinto(buf) or 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:done + step]], offset + done)
        if n == 0:
            break
        done += n
    return done


# ---------------------------------------------------------------------------------------------
# Writing


class _StorageRef:
    def __init__(self, key: str, storage_type: Any, numel: int) -> None:
        self.key, self.storage_type, self.numel = key, storage_type, numel


class _TensorRef:
    """Pickles as torch.save pickles a contiguous tensor that owns its storage."""

    def __init__(self, storage: _StorageRef, shape: tuple[int, ...], rebuild: Callable) -> None:
        self.storage, self.shape, self.rebuild = storage, shape, rebuild

    def __reduce_ex__(self, protocol: int) -> tuple:
        stride, acc = [], 1
        for n in reversed(self.shape):
            stride.append(acc)
            acc *= n
        return (self.rebuild, (self.storage, 0, tuple(self.shape), tuple(reversed(stride)), False,
                               collections.OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _StorageRef):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return None


def _aligned_entry(zf: zipfile.ZipFile, name: str, nbytes: int) -> tuple[zipfile.ZipInfo, bool]:
    """A ZipInfo for an uncompressed entry whose data starts on an ALIGNMENT boundary."""
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = nbytes
    zip64 = nbytes * 1.05 > zipfile.ZIP64_LIMIT  # zipfile's own rule, made explicit
    header = 30 + len(name.encode()) + (20 if zip64 else 0) + 4  # + our padding field's header
    pad = -(zf.fp.tell() + header) % ALIGNMENT
    info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # 'FB' padding field, as torch writes
    return info, zip64


@dataclass(frozen=True)
class RowBlocks:
    """A tensor given as consecutive blocks of rows (axis 0), for writing without holding it whole."""

    shape: tuple[int, ...]
    dtype: np.dtype
    blocks: Iterable[np.ndarray]


def _write_entry(zf: zipfile.ZipFile, name: str, pieces: Iterable[Any], nbytes: int, align: bool = False) -> None:
    """One uncompressed entry of exactly nbytes, written from buffer-like pieces in order."""
    if align:
        info, zip64 = _aligned_entry(zf, name, nbytes)
    else:
        info, zip64 = zipfile.ZipInfo(name), nbytes * 1.05 > zipfile.ZIP64_LIMIT
        info.compress_type = zipfile.ZIP_STORED
        info.file_size = nbytes
    written, step = 0, 1 << 26
    with zf.open(info, "w", force_zip64=zip64) as f:
        for piece in pieces:
            data = memoryview(piece).cast("B")
            for i in range(0, len(data), step):
                f.write(data[i:i + step])
            written += len(data)
    if written != nbytes:
        raise ValueError(f"{name}: wrote {written} bytes, expected {nbytes}")


def _as_bytes(array: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def write_torch_zip(path: str | os.PathLike, items: Iterable[tuple[str, "np.ndarray | RowBlocks"]],
                    archive: str = "archive", nest: str | None = None) -> None:
    """torch.save-compatible file from (key, array) pairs, consumed one at a time, atomically.

    Only one array (or one block of a RowBlocks) is held at a time: the caller's generator
    decides how they are produced. Arrays keep their dtype (ml_dtypes.bfloat16 ->
    torch.bfloat16) and bits. The state dict is a plain dict in `items` order, as
    `torch.save(dict)` writes it; entries are 64-byte aligned like torch's own. nest: the file
    holds {nest: state dict} instead (litgpt's and Lightning's training checkpoints: "model").
    """
    torch = require_torch()  # only for the pickled globals, so torch.load finds the real ones
    rebuild = torch._utils._rebuild_tensor_v2

    def write(tmp: str) -> None:
        refs: dict[str, _TensorRef] = {}
        with open(tmp, "wb") as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for n, (key, value) in enumerate(items):
                if key in refs:
                    raise ValueError(f"duplicate key {key!r}")
                if isinstance(value, RowBlocks):
                    shape, dtype = tuple(value.shape), np.dtype(value.dtype)

                    def pieces(value: RowBlocks = value, key: str = key, dtype: np.dtype = dtype) -> Iterator:
                        for block in value.blocks:
                            if block.dtype != dtype or block.shape[1:] != tuple(value.shape[1:]):
                                raise ValueError(f"{key}: block {block.dtype}{block.shape} does not fit "
                                                 f"{dtype}{tuple(value.shape)}")
                            yield _as_bytes(block)
                    data: Iterable[Any] = pieces()
                else:
                    value = np.asarray(value, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
                    shape, dtype = tuple(value.shape), value.dtype
                    data = [_as_bytes(value)]
                storage_name = _DTYPE_STORAGE.get(dtype)
                if storage_name is None:
                    raise TypeError(f"{key}: dtype {dtype} has no torch storage type")
                numel = int(np.prod(shape, dtype=np.int64))
                refs[key] = _TensorRef(_StorageRef(str(n), getattr(torch, storage_name), numel), shape, rebuild)
                _write_entry(zf, f"{archive}/data/{n}", data, numel * dtype.itemsize, align=True)
                del value, data
            buf = io.BytesIO()
            _Pickler(buf, protocol=2).dump(refs if nest is None else {nest: refs})
            for name, payload in [("data.pkl", buf.getvalue()), (".format_version", b"1"),
                                  (".storage_alignment", str(ALIGNMENT).encode()), ("byteorder", b"little"),
                                  ("version", b"3\n")]:
                _write_entry(zf, f"{archive}/{name}", [payload], len(payload))
            zf.close()
            raw.flush()
            os.fsync(raw.fileno())

    atomic_write(path, write)
