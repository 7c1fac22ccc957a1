"""The jaxlora checkpoint directory: what `train.py --pretrained_path` and `generate.py` read.

Layout::

    DIR/config.json   {"model": LLaMAConfig fields, "lora": LoRAConfig fields or null,
                       "base": where the frozen weights came from (adapters-only directories)}
    DIR/params/       the frozen weights: an array tree (below) of our `params` tree
    DIR/lora/         the adapters (only when "lora" is not null): same format, `lora` tree

An adapters-only directory (what `train.py` leaves in OUT_DIR/adapters, like a PEFT adapter
folder) has config.json and lora/ but no params/; `convert/to_lit_llama.py --adapters` pairs it
with a base checkpoint directory for a merged export.

The array tree format (ours, version 1; read and written with tensorstore's public API only)::

    ITEM/index.json        {"format": "jaxlora-arrays", "version": 1,
                            "leaves": {"h/attn/c_attn/kernel": {"shape": [...], "dtype": "bfloat16"}, ...}}
    ITEM/h.attn.c_attn.kernel/   one zarr v2 array per leaf (.zarray + chunk files "i.j.k"):
                                 the leaf's path joined by "."; C order, no compression

Layered leaves (under "h", a leading layer axis) are chunked one layer per chunk, and 2-D
leaves (wte, lm_head) in blocks of <= MAX_CHUNK_BYTES, so a 65B checkpoint is written and read
one layer (or block) of one tensor at a time: `ArrayTreeWriter` fills arrays slice by slice,
`ArrayTreeReader` reads any slice, and the device loader (`jaxlora.weights.load`) reads only
the slices that each device's shard needs. index.json is written last: a tree without it is incomplete. Any zarr
v2 reader opens the arrays (e.g. `tensorstore.open({"driver": "zarr", "kvstore": "file://ITEM/wte.embedding"})`).

Every write goes to a hidden temporary directory beside the target, renamed into place when
complete: an interrupted write leaves nothing under the final name.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts
from flax import traverse_util

from jaxlora.config import LLaMAConfig, LoRAConfig, dump_json
from jaxlora.errors import CheckpointError
from jaxlora.model.layouts import abstract_variables
from jaxlora.model.llama import LLaMA
from jaxlora.model.quantize import (
    QUANTIZE_MODES,
    abstract_quantized,
    kernel_leaves,
    quantizes,
)

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
LORA_DIR = "lora"
ITEMS = (PARAMS_DIR, LORA_DIR)
INDEX_FILE = "index.json"
FORMAT, FORMAT_VERSION = "jaxlora-arrays", 1
MAX_CHUNK_BYTES = 64 << 20  # unlayered 2-D leaves (wte, lm_head) are chunked below this size
# No compression: weights barely compress and zstd would halve conversion throughput.
ZARR_COMPRESSOR = None

Path_ = tuple[str, ...]
Where = int | tuple[slice, ...] | None  # a whole leaf, one layer, or a region


# ---------------------------------------------------------------------------------------------
# Small helpers


def _ts() -> Any:
    return ts


def _name(path: Path_) -> str:
    return "/".join(path)


def _leaf_dir(item_dir: Path, path: Path_) -> Path:
    return item_dir / ".".join(path)


def is_layered(path: Path_) -> bool:
    """Leaves of the scanned block stack (params/h/..., lora/h/...) carry a leading layer axis."""
    return len(path) > 1 and path[0] == "h"


def expected_variables(config: LLaMAConfig, lora_config: LoRAConfig | None, quantized: str | None = None
                       ) -> dict[str, dict[Path_, Any]]:
    """{"params": {path: ShapeDtypeStruct}, "lora": {...}} of the model this config describes;
    quantized (a --quantize mode): the frozen kernels stored quantized (`quantized_leaves`)."""
    out = {item: dict(leaves) for item, leaves in _abstract_leaves(config, lora_config).items()}
    if quantized is not None:
        out[PARAMS_DIR] = quantized_leaves(out[PARAMS_DIR], quantized)
    return out


@functools.lru_cache(maxsize=16)
def _abstract_leaves(config: LLaMAConfig, lora_config: LoRAConfig | None) -> dict[str, dict[Path_, Any]]:
    # tracing the model's init takes ~0.2 s and a conversion asks several times (configs are frozen)
    abstract = abstract_variables(LLaMA(config, lora_config))
    return {item: traverse_util.flatten_dict(abstract[item]) for item in ITEMS if abstract.get(item)}


def quantized_leaves(params: Mapping[Path_, Any], mode: str) -> dict[Path_, Any]:
    """The stored leaves of frozen weights quantized in `mode`: each kernel `quantizes` names
    (not the LM head) becomes its quantized kernel's leaves, under the kernel's path
    (h/attn/c_attn/kernel/codes, .../absmax, ...; int8: .../q, .../scale)."""
    out: dict[Path_, Any] = {}
    for path, leaf in params.items():
        if not quantizes(path, mode, head=False):
            out[path] = leaf
            continue
        out.update({path + (key,): value for key, value in kernel_leaves(abstract_quantized(tuple(leaf.shape), mode))})
    return out


def check_shapes(stored: Mapping[Path_, tuple[int, ...]], expected: Mapping[Path_, Any], where: str) -> None:
    """Raise CheckpointError naming every missing, unexpected and mis-shaped leaf."""
    problems = [f"missing {_name(p)} (expected shape {tuple(e.shape)})" for p, e in expected.items() if p not in stored]
    problems += [f"unexpected {_name(p)} (shape {tuple(s)})" for p, s in stored.items() if p not in expected]
    problems += [f"{_name(p)} has shape {tuple(stored[p])}, expected {tuple(e.shape)}"
                 for p, e in expected.items() if p in stored and tuple(stored[p]) != tuple(e.shape)]
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise CheckpointError(f"{where}: " + "; ".join(problems[:10]) + more + " — does config.json match the arrays?")


# ---------------------------------------------------------------------------------------------
# Atomic directories


def plain_mode(directory: bool) -> int:
    """The permissions a plain mkdir / open(..., "w") gives under the current umask (0755 / 0644
    under umask 022): what staged outputs must end with, since mkdtemp / mkstemp use 0700 / 0600."""
    mask = os.umask(0o022)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def plain_modes(directory: Path) -> None:
    """Give `directory` and everything under it the modes of plain writes under the umask."""
    dir_mode, file_mode = plain_mode(directory=True), plain_mode(directory=False)
    os.chmod(directory, dir_mode)
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            os.chmod(os.path.join(root, name), dir_mode)
        for name in files:
            os.chmod(os.path.join(root, name), file_mode)


@contextlib.contextmanager
def staged_directory(directory: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `directory`; on success rename it into place.

    Refuses an existing `directory` unless overwrite (checked before and after the work). On any
    exception the temporary directory is removed and `directory` is left as it was.
    """
    directory = Path(directory).absolute()
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} already exists; pass overwrite=True (--overwrite) to replace it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        yield tmp
        plain_modes(tmp)  # mkdtemp's 0700 and some writers' 0600 (safetensors): end as plain writes would
        if directory.exists():
            if not overwrite:
                raise FileExistsError(f"{directory} appeared while writing; not replacing it")
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".old", dir=directory.parent))
            os.rmdir(old)
            os.rename(directory, old)
            os.rename(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """fsync every file and folder under directory (durable before the final rename)."""
    for root, _, files in os.walk(directory):
        for name in files:
            _fsync(os.path.join(root, name))
        _fsync(root)


# ---------------------------------------------------------------------------------------------
# Writing array trees slice by slice


def default_chunks(shape: tuple[int, ...], itemsize: int, layered: bool) -> tuple[int, ...]:
    """One layer per chunk for layered leaves; a 2-D leaf is cut along its longer axis into
    blocks of <= MAX_CHUNK_BYTES (wte by rows, lm_head's (C, V) kernel by columns)."""
    if layered and shape:
        return (1, *shape[1:])
    if len(shape) != 2:
        return tuple(shape)
    axis = 0 if shape[0] >= shape[1] else 1
    line_bytes = shape[1 - axis] * itemsize
    step = max(1, min(shape[axis], MAX_CHUNK_BYTES // max(line_bytes, 1)))
    return (step, shape[1]) if axis == 0 else (shape[0], step)


def _ts_context(sync: bool = True) -> Any:
    # No cache: every slice is written (or read) once; keep memory at the slice itself.
    # Writers skip the per-chunk fsync and sync every file once at the end (fsync_tree).
    return _ts().Context({"cache_pool": {"total_bytes_limit": 0}, "file_io_sync": sync})


def _zarr_spec(leaf_dir: Path) -> dict[str, Any]:
    return {"driver": "zarr", "kvstore": {"driver": "file", "path": str(leaf_dir)}}


class ArrayTreeWriter:
    """Creates the array tree `item_dir` (see the module doc) and fills its leaves piece by piece.

    leaves: {path: (shape, dtype)} or {path: (shape, dtype, chunks)}. Each leaf's zarr array is
    created full size, then filled by `write(path, value, where)`: `where` is None (the whole
    leaf), an int (one layer of a layered leaf) or a tuple of slices. Writes should cover whole
    chunks (default chunks: one layer, or row blocks). Writes run in the background, holding a
    reference to `value`; at most `max_pending_bytes` of them are in flight. `close()` (or
    leaving the `with` block) waits for them, writes index.json and fsyncs the files.
    """

    def __init__(self, item_dir: str | os.PathLike, leaves: Mapping[Path_, tuple], *,
                 max_pending_bytes: int = 512 << 20) -> None:
        ts = _ts()
        self.item_dir = Path(item_dir).absolute()
        if self.item_dir.exists() and any(self.item_dir.iterdir()):
            raise FileExistsError(f"{self.item_dir} is not empty; array trees are written into fresh directories")
        self.item_dir.mkdir(parents=True, exist_ok=True)
        self.leaves: dict[Path_, tuple[tuple[int, ...], np.dtype]] = {}
        self.max_pending_bytes = max_pending_bytes
        self._pending: list[tuple[Any, int]] = []
        self.arrays: dict[Path_, Any] = {}
        context = _ts_context(sync=False)
        for path, (shape, dtype, *rest) in leaves.items():
            if any("." in key or "/" in key for key in path):
                raise ValueError(f"{_name(path)}: leaf keys may not contain '.' or '/'")
            shape, dtype = tuple(int(n) for n in shape), np.dtype(dtype)
            self.leaves[path] = (shape, dtype)
            chunks = tuple(rest[0]) if rest and rest[0] else default_chunks(shape, dtype.itemsize, is_layered(path))
            spec = {**_zarr_spec(_leaf_dir(self.item_dir, path)), "dtype": jnp.dtype(dtype).name,
                    "metadata": {"shape": list(shape), "chunks": list(chunks), "compressor": ZARR_COMPRESSOR,
                                 "order": "C", "dimension_separator": "."},
                    "create": True}
            self.arrays[path] = ts.open(spec, context=context).result()

    def write(self, path: Path_, value: np.ndarray, where: Where = None) -> None:
        """Write `value` into leaf `path` (see the class doc for `where`); returns before the I/O ends."""
        shape, dtype = self.leaves[path]
        target = self.arrays[path] if where is None else self.arrays[path][where]
        if tuple(value.shape) != tuple(target.shape):
            raise CheckpointError(f"{self.item_dir}: {_name(path)}{'' if where is None else f'[{where}]'} "
                                  f"got shape {tuple(value.shape)}, expected {tuple(target.shape)}")
        value = np.asarray(value, dtype=dtype, order="C")
        future = target.write(value, can_reference_source_data_indefinitely=True)
        self._pending.append((future, value.nbytes))
        while len(self._pending) > 1 and sum(n for _, n in self._pending) > self.max_pending_bytes:
            self._pending.pop(0)[0].result()

    def close(self) -> None:
        while self._pending:
            self._pending.pop(0)[0].result()
        index = {"format": FORMAT, "version": FORMAT_VERSION,
                 "leaves": {_name(p): {"shape": list(shape), "dtype": jnp.dtype(dtype).name}
                            for p, (shape, dtype) in self.leaves.items()}}
        (self.item_dir / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
        fsync_tree(self.item_dir)

    def __enter__(self) -> "ArrayTreeWriter":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:  # let pending writes finish (their buffers are borrowed), then propagate
            for future, _ in self._pending:
                with contextlib.suppress(Exception):
                    future.result()
            self._pending.clear()


def write_tree(item_dir: str | os.PathLike, tree: Mapping[str, Any]) -> None:
    """Write a tree of (numpy or addressable jax) arrays with ArrayTreeWriter, one layer at a time."""
    flat = traverse_util.flatten_dict(dict(tree))
    leaves = {p: (tuple(v.shape), v.dtype) for p, v in flat.items()}
    with ArrayTreeWriter(item_dir, leaves) as writer:
        for path, value in flat.items():
            if is_layered(path) and value.ndim:
                for i in range(value.shape[0]):
                    writer.write(path, np.asarray(jax.device_get(value[i])), i)
            else:
                writer.write(path, np.asarray(jax.device_get(value)))


# ---------------------------------------------------------------------------------------------
# Reading


def _read_index(item_dir: Path) -> dict[Path_, tuple[tuple[int, ...], np.dtype]]:
    index_file = item_dir / INDEX_FILE
    if not index_file.is_file():
        if (item_dir / "_METADATA").is_file():
            raise CheckpointError(f"{item_dir}: written by an older jaxlora (orbax layout), which this version no "
                                  "longer reads; convert the lit-llama checkpoint again (convert/from_lit_llama.py)")
        raise CheckpointError(f"{item_dir}: no {INDEX_FILE}; not a jaxlora array tree (or an interrupted write)")
    try:
        index = json.loads(index_file.read_text())
        if index.get("format") != FORMAT or index.get("version") != FORMAT_VERSION:
            raise ValueError(f"format {index.get('format')!r} version {index.get('version')!r}, expected "
                             f"{FORMAT!r} version {FORMAT_VERSION}")
        return {tuple(name.split("/")): (tuple(int(n) for n in leaf["shape"]), np.dtype(jnp.dtype(leaf["dtype"])))
                for name, leaf in index["leaves"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index_file}: unreadable: {e}") from e


class ArrayTreeReader:
    """Reads leaves, single layers or regions of an array tree (see the module doc) as numpy;
    each read touches only the chunks of the requested slice."""

    def __init__(self, item_dir: str | os.PathLike) -> None:
        self.item_dir = Path(item_dir).absolute()
        self._leaves = _read_index(self.item_dir)
        self.paths = list(self._leaves)
        self._arrays: dict[Path_, Any] = {}

    def shapes(self) -> dict[Path_, tuple[tuple[int, ...], np.dtype]]:
        """{path: (shape, dtype)} from the index, without opening the arrays."""
        return dict(self._leaves)

    def _open(self, path: Path_) -> Any:
        if path not in self._arrays:
            if path not in self._leaves:
                raise CheckpointError(f"{self.item_dir}: no leaf {_name(path)}")
            try:
                array = _ts().open({**_zarr_spec(_leaf_dir(self.item_dir, path)), "open": True},
                                   context=_ts_context(), read=True).result()
            except ValueError as e:
                raise CheckpointError(f"{self.item_dir}: cannot open leaf {_name(path)}: {e}") from e
            shape, dtype = self._leaves[path]
            if tuple(array.shape) != shape or np.dtype(array.dtype.numpy_dtype) != dtype:
                raise CheckpointError(f"{self.item_dir}: leaf {_name(path)} holds {tuple(array.shape)} "
                                      f"{array.dtype.name}, the index says {shape} {dtype}")
            self._arrays[path] = array
        return self._arrays[path]

    def chunks(self, path: Path_) -> tuple[int, ...]:
        """The stored chunk shape of a leaf."""
        return tuple(int(n) for n in self._open(path).chunk_layout.read_chunk.shape)

    def read(self, path: Path_, where: Where = None) -> np.ndarray:
        """Leaf `path`, or its layer `where` (int), or a region (tuple of slices), as numpy."""
        array = self._open(path)
        try:
            return np.asarray((array if where is None else array[where]).read().result())
        except ValueError as e:  # a missing or damaged chunk file
            raise CheckpointError(f"{self.item_dir}: cannot read {_name(path)}"
                                  f"{'' if where is None else f'[{where}]'}: {e}") from e


# ---------------------------------------------------------------------------------------------
# The checkpoint directory


def is_jaxlora_checkpoint(path: str | os.PathLike) -> bool:
    """True for a directory holding config.json and params/ (does not validate the arrays)."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir()


def is_adapters_dir(path: str | os.PathLike) -> bool:
    """True for an adapters-only directory: config.json and lora/, no params/."""
    path = Path(path)
    return (path.is_dir() and (path / CONFIG_FILE).is_file() and (path / LORA_DIR).is_dir()
            and not (path / PARAMS_DIR).exists())


def read_base(directory: str | os.PathLike) -> str | None:
    """The "base" recorded in config.json (adapters-only directories), if any."""
    try:
        return json.loads((Path(directory) / CONFIG_FILE).read_text()).get("base")
    except (OSError, ValueError):
        return None


def read_config(directory: str | os.PathLike) -> tuple[LLaMAConfig, LoRAConfig | None]:
    directory = Path(directory)
    if directory.is_file():
        raise CheckpointError(f"{directory}: a file, not a directory; expected a jaxlora checkpoint or adapters "
                              f"directory ({CONFIG_FILE} with {PARAMS_DIR}/ or {LORA_DIR}/)")
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    config_file = directory / CONFIG_FILE
    if not config_file.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_FILE}; not a jaxlora checkpoint "
                              "(a lit-llama .pth must be converted first: convert/from_lit_llama.py)")
    try:
        raw = json.loads(config_file.read_text())
        config = LLaMAConfig.from_dict(raw["model"])
        lora = LoRAConfig.from_dict(raw["lora"]) if raw.get("lora") else None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{config_file}: invalid jaxlora config: {e!r}") from e
    return config, lora


def has_adapters(lora_config: LoRAConfig | None) -> bool:
    return lora_config is not None and lora_config.r > 0 and bool(lora_config.targets)


def write_config(directory: Path, config: LLaMAConfig, lora_config: LoRAConfig | None,
                 base: str | None = None, quantized: dict[str, str] | None = None) -> None:
    (directory / CONFIG_FILE).write_text(dump_json(config, lora_config, base, quantized) + "\n")


def read_quantized(directory: str | os.PathLike) -> dict[str, str] | None:
    """config.json's "quantized" record ({"mode", "dtype"}) of a checkpoint or adapters directory:
    its frozen weights are stored quantized (a checkpoint), or the adapters were trained on a
    base quantized so (an adapters directory); None if it has none."""
    path = Path(directory) / CONFIG_FILE
    try:
        record = json.loads(path.read_text()).get("quantized")
    except (OSError, ValueError):
        return None
    if record is None:
        return None
    if not isinstance(record, dict) or record.get("mode") not in QUANTIZE_MODES or "dtype" not in record:
        raise CheckpointError(f"{path}: 'quantized' must be {{\"mode\": one of {list(QUANTIZE_MODES)}, \"dtype\": "
                              f"...}}, got {record!r}")
    return {"mode": record["mode"], "dtype": str(record["dtype"])}


def save_checkpoint(directory: str | os.PathLike, config: LLaMAConfig, lora_config: LoRAConfig | None,
                    params: Mapping[str, Any] | None, lora: Mapping[str, Any] | None = None,
                    overwrite: bool = False, base: str | None = None, quantized: dict[str, str] | None = None
                    ) -> Path:
    """Write config.json, params/ and (when given) lora/ atomically; returns the directory.

    params=None with adapters writes an adapters-only directory; `base` records where its
    frozen weights are (a path or a description), `quantized` how they were quantized in
    training (`read_quantized`). Arrays are written in their own dtype, one
    layer at a time (numpy or addressable jax arrays), in the stacked layout. Shapes are
    checked against the config first; nothing is written when they disagree.
    """
    directory = Path(directory).absolute()
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} already exists; pass overwrite=True (--overwrite) to replace it")
    if lora is not None and not has_adapters(lora_config):
        raise CheckpointError(f"{directory}: adapters given but lora_config is {lora_config}")
    if params is None and lora is None:
        raise CheckpointError(f"{directory}: nothing to save (no params, no adapters)")
    expected = expected_variables(config, lora_config if lora is not None else None)
    trees = {PARAMS_DIR: params, LORA_DIR: lora}
    for item in ITEMS:
        if trees[item] is not None:
            flat = traverse_util.flatten_dict(dict(trees[item]))
            check_shapes({p: tuple(v.shape) for p, v in flat.items()}, expected.get(item, {}), f"{directory}/{item}")
    with staged_directory(directory, overwrite) as tmp:
        write_config(tmp, config, lora_config if lora is not None else None, base, quantized)
        for item in ITEMS:
            if trees[item] is not None:
                write_tree(tmp / item, trees[item])
    return directory


def open_item(directory: str | os.PathLike, item: str) -> tuple[LLaMAConfig, LoRAConfig | None, ArrayTreeReader]:
    """(config, lora_config, a reader of `item`: PARAMS_DIR or LORA_DIR) of a checkpoint whose
    stored shapes have been checked against its config.json (errors name the file and leaf)."""
    directory = Path(directory).absolute()
    config, lora_config = read_config(directory)
    if not (directory / PARAMS_DIR).is_dir():
        raise CheckpointError(f"{directory}: no {PARAMS_DIR}/ directory (incomplete checkpoint)")
    has_lora = has_adapters(lora_config)
    if has_lora and not (directory / LORA_DIR).is_dir():
        raise CheckpointError(f"{directory}: config.json describes adapters ({lora_config}) but there is no "
                              f"{LORA_DIR}/ directory")
    reader = ArrayTreeReader(directory / item)
    quantized = read_quantized(directory) if item == PARAMS_DIR else None
    expected = expected_variables(config, lora_config if has_lora else None, quantized and quantized["mode"])
    check_shapes({p: s for p, (s, _) in reader.shapes().items()}, expected[item], str(reader.item_dir))
    return config, lora_config, reader
