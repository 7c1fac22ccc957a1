"""The jaxlora checkpoint directory: what `train.py --pretrained_path` and `generate.py` read.

Layout::

    DIR/config.json   {"model": LLaMAConfig fields, "lora": LoRAConfig fields or null,
                       "base": where the frozen weights came from (adapters-only directories)}
    DIR/params/       the frozen weights: an orbax PyTree checkpoint of our `params` tree
    DIR/lora/         the adapters (only when "lora" is not null): same format, `lora` tree

An adapters-only directory (what `train.py` leaves in OUT_DIR/adapters, like a PEFT adapter
folder) has config.json and lora/ but no params/; `convert/to_lit_llama.py --adapters` pairs it
with a base checkpoint directory for a merged export.

Both trees are ordinary orbax checkpoints (non-OCDBT, zarr v2 per leaf), so plain orbax reads
them: `ocp.PyTreeCheckpointer().restore(DIR / "params")`. Only the array data is written by
`ArrayTreeWriter` straight through tensorstore (orbax writes the tree metadata), one slice at
a time with a leading-layer-axis chunking, so a 65B checkpoint is written without ever
holding more than one layer of one tensor, and read back per layer the same way.

Every write goes to a hidden temporary directory beside the target, renamed into place when
complete: an interrupted write leaves nothing under the final name.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.config import LLaMAConfig, LoRAConfig, dump_json
from jaxlora.errors import CheckpointError

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
LORA_DIR = "lora"
ITEMS = (PARAMS_DIR, LORA_DIR)
MAX_CHUNK_BYTES = 64 << 20  # unlayered 2-D leaves (wte, lm_head) are chunked below this size
# No compression: weights barely compress and zstd would halve conversion throughput.
ZARR_COMPRESSOR = None

Path_ = tuple[str, ...]


# ---------------------------------------------------------------------------------------------
# Small helpers


def _ocp() -> Any:
    import orbax.checkpoint as ocp
    return ocp


@contextlib.contextmanager
def _absl_errors_only() -> Iterator[None]:
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _ts() -> Any:
    import tensorstore as ts
    return ts


def flatten(tree: Mapping[str, Any], prefix: Path_ = ()) -> dict[Path_, Any]:
    """Nested dicts -> {(key, ...): leaf}, in insertion order."""
    out: dict[Path_, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def unflatten(flat: Mapping[Path_, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _name(path: Path_) -> str:
    return "/".join(path)


def is_layered(path: Path_) -> bool:
    """Leaves of the scanned block stack (params/h/..., lora/h/...) carry a leading layer axis."""
    return len(path) > 1 and path[0] == "h"


def expected_variables(config: LLaMAConfig, lora_config: LoRAConfig | None) -> dict[str, dict[Path_, Any]]:
    """{"params": {path: ShapeDtypeStruct}, "lora": {...}} of the model this config describes."""
    from jaxlora.model import LLaMA, abstract_variables
    abstract = abstract_variables(LLaMA(config, lora_config))
    return {item: flatten(abstract[item]) for item in ITEMS if abstract.get(item)}


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


# ---------------------------------------------------------------------------------------------
# Writing orbax trees slice by slice


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


def fsync_tree(directory: Path) -> None:
    """fsync every file and folder under directory (durable before the final rename)."""
    for root, _, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class ArrayTreeWriter:
    """Creates an orbax PyTree checkpoint at `item_dir` whose arrays are filled in piece by piece.

    leaves: {path: (shape, dtype)} or {path: (shape, dtype, chunks)}. Orbax itself writes the
    tree metadata (from 1-element placeholders); each leaf's zarr array is then created full size
    with tensorstore and filled by `write(path, value, where)`: `where` is None (the whole leaf),
    an int (one layer of a layered leaf) or a tuple of slices. Writes should cover whole chunks
    (default chunks: one layer, or row blocks). Writes run in the background, holding a
    reference to `value`; at most `max_pending_bytes` of them are in flight. Call `close()` (or
    leave the `with` block) to wait for them and fsync the files.
    """

    def __init__(self, item_dir: str | os.PathLike, leaves: Mapping[Path_, tuple], *,
                 max_pending_bytes: int = 512 << 20) -> None:
        ocp, ts = _ocp(), _ts()
        self.item_dir = Path(item_dir).absolute()
        self.leaves: dict[Path_, tuple[tuple[int, ...], np.dtype]] = {}
        chunks: dict[Path_, tuple[int, ...]] = {}
        for path, (shape, dtype, *rest) in leaves.items():
            shape, dtype = tuple(int(n) for n in shape), np.dtype(dtype)
            self.leaves[path] = (shape, dtype)
            chunks[path] = tuple(rest[0]) if rest and rest[0] else default_chunks(shape, dtype.itemsize,
                                                                                   is_layered(path))
        self.max_pending_bytes = max_pending_bytes
        self._pending: list[tuple[Any, int]] = []
        placeholder = unflatten({p: np.zeros((1,) * len(shape), dtype) for p, (shape, dtype) in self.leaves.items()})
        checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False))
        with _absl_errors_only():  # orbax warns that it found no OCDBT data to merge: none was asked for
            checkpointer.save(self.item_dir, args=ocp.args.PyTreeSave(placeholder))
        context = _ts_context(sync=False)
        self.arrays: dict[Path_, Any] = {}
        for path, (shape, dtype) in self.leaves.items():
            leaf_dir = self.item_dir / ".".join(path)
            if not (leaf_dir / ".zarray").is_file():
                raise RuntimeError(f"orbax wrote an unexpected layout in {self.item_dir} (no {leaf_dir.name}/.zarray); "
                                   "this orbax version is not supported by the streaming writer")
            spec = {
                "driver": "zarr",
                "kvstore": {"driver": "file", "path": str(leaf_dir)},
                "dtype": jnp.dtype(dtype).name,
                "metadata": {"shape": list(shape), "chunks": list(chunks[path]), "compressor": ZARR_COMPRESSOR,
                             "order": "C", "dimension_separator": "."},
                "create": True, "delete_existing": True,
            }
            self.arrays[path] = ts.open(spec, context=context).result()

    def write(self, path: Path_, value: np.ndarray, where: int | tuple[slice, ...] | None = None) -> None:
        """Write `value` into leaf `path` (see the class doc for `where`); returns before the I/O ends."""
        shape, dtype = self.leaves[path]
        target = self.arrays[path] if where is None else self.arrays[path][where]
        if tuple(value.shape) != tuple(target.shape):
            raise CheckpointError(f"{self.item_dir}: {_name(path)}{'' if where is None else f'[{where}]'} "
                                  f"got shape {tuple(value.shape)}, expected {tuple(target.shape)}")
        value = np.asarray(value, dtype=dtype, order="C")
        try:
            future = target.write(value, can_reference_source_data_indefinitely=True)
        except TypeError:  # older tensorstore
            future = target.write(value)
        self._pending.append((future, value.nbytes))
        while len(self._pending) > 1 and sum(n for _, n in self._pending) > self.max_pending_bytes:
            self._pending.pop(0)[0].result()

    def close(self) -> None:
        while self._pending:
            self._pending.pop(0)[0].result()
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
    """Write a tree of (numpy or jax) arrays with ArrayTreeWriter, one layer at a time."""
    flat = flatten(tree)
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


def _tree_metadata(item_dir: Path) -> dict[str, Any]:
    meta_file = item_dir / "_METADATA"
    if not meta_file.is_file():
        raise CheckpointError(f"{item_dir}: not an orbax PyTree checkpoint (no _METADATA)")
    try:
        return json.loads(meta_file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{meta_file}: unreadable: {e}") from e


def _leaf_paths(meta: Mapping[str, Any]) -> list[Path_]:
    return [tuple(str(k["key"]) for k in entry["key_metadata"]) for entry in meta["tree_metadata"].values()]


class ArrayTreeReader:
    """Reads leaves (or single layers of them) of an orbax PyTree checkpoint as numpy.

    For the zarr-per-leaf layout that jaxlora writes, each read touches only the requested
    slice. Other layouts (e.g. OCDBT, orbax's default) are restored whole on first use.
    """

    def __init__(self, item_dir: str | os.PathLike) -> None:
        self.item_dir = Path(item_dir).absolute()
        meta = _tree_metadata(self.item_dir)
        self.paths = _leaf_paths(meta)
        self.per_leaf = not meta.get("use_ocdbt", True)
        self._zarr3 = bool(meta.get("use_zarr3", False))
        self._arrays: dict[Path_, Any] = {}
        self._restored: dict[Path_, np.ndarray] | None = None

    def shapes(self) -> dict[Path_, tuple[tuple[int, ...], np.dtype]]:
        """{path: (shape, dtype)} without reading array data."""
        if self.per_leaf:
            return {p: (tuple(a.shape), np.dtype(a.dtype.numpy_dtype)) for p, a in
                    ((p, self._open(p)) for p in self.paths)}
        ocp = _ocp()
        meta = ocp.PyTreeCheckpointer().metadata(self.item_dir)
        tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
        return {p: (tuple(m.shape), np.dtype(m.dtype)) for p, m in flatten(tree).items()}

    def _open(self, path: Path_) -> Any:
        if path not in self._arrays:
            if path not in self.paths:
                raise CheckpointError(f"{self.item_dir}: no leaf {_name(path)}")
            ts = _ts()
            spec = {"driver": "zarr3" if self._zarr3 else "zarr",
                    "kvstore": {"driver": "file", "path": str(self.item_dir / ".".join(path))}, "open": True}
            try:
                self._arrays[path] = ts.open(spec, context=_ts_context(), read=True).result()
            except ValueError as e:
                raise CheckpointError(f"{self.item_dir}: cannot open leaf {_name(path)}: {e}") from e
        return self._arrays[path]

    def chunks(self, path: Path_) -> tuple[int, ...] | None:
        """The stored chunk shape of a leaf (None for layouts read whole)."""
        if not self.per_leaf:
            return None
        return tuple(int(n) for n in self._open(path).chunk_layout.read_chunk.shape)

    def read(self, path: Path_, where: int | tuple[slice, ...] | None = None) -> np.ndarray:
        """Leaf `path`, or its layer `where` (int), or a region (tuple of slices), as numpy."""
        if self.per_leaf:
            array = self._open(path)
            return np.asarray((array if where is None else array[where]).read().result())
        if self._restored is None:
            self._restored = flatten(_ocp().PyTreeCheckpointer().restore(self.item_dir))
        value = np.asarray(self._restored[path])
        return value if where is None else np.ascontiguousarray(value[where])


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


def _has_adapters(lora_config: LoRAConfig | None) -> bool:
    return lora_config is not None and lora_config.r > 0 and bool(lora_config.targets)


def write_config(directory: Path, config: LLaMAConfig, lora_config: LoRAConfig | None,
                 base: str | None = None) -> None:
    (directory / CONFIG_FILE).write_text(dump_json(config, lora_config, base) + "\n")


def save_checkpoint(directory: str | os.PathLike, config: LLaMAConfig, lora_config: LoRAConfig | None,
                    params: Mapping[str, Any] | None, lora: Mapping[str, Any] | None = None,
                    overwrite: bool = False, base: str | None = None) -> Path:
    """Write config.json, params/ and (when given) lora/ atomically; returns the directory.

    params=None with adapters writes an adapters-only directory; `base` records where its
    frozen weights are (a path or a description). Arrays are written in their own dtype, one
    layer at a time (numpy or addressable jax arrays), in the stacked layout. Shapes are
    checked against the config first; nothing is written when they disagree.
    """
    directory = Path(directory).absolute()
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} already exists; pass overwrite=True (--overwrite) to replace it")
    if lora is not None and not _has_adapters(lora_config):
        raise CheckpointError(f"{directory}: adapters given but lora_config is {lora_config}")
    if params is None and lora is None:
        raise CheckpointError(f"{directory}: nothing to save (no params, no adapters)")
    expected = expected_variables(config, lora_config if lora is not None else None)
    trees = {PARAMS_DIR: params, LORA_DIR: lora}
    for item in ITEMS:
        if trees[item] is not None:
            flat = flatten(trees[item])
            check_shapes({p: tuple(v.shape) for p, v in flat.items()}, expected.get(item, {}), f"{directory}/{item}")
    with staged_directory(directory, overwrite) as tmp:
        write_config(tmp, config, lora_config if lora is not None else None, base)
        for item in ITEMS:
            if trees[item] is not None:
                write_tree(tmp / item, trees[item])
    return directory


def _sharding_for(shardings: Any, item: str, path: Path_) -> Any:
    if shardings is None:
        return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        return shardings
    node = shardings.get(item) if isinstance(shardings, Mapping) else None
    if isinstance(node, jax.sharding.Sharding):
        return node
    if node is None:
        return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    leaf = flatten(node).get(path)
    if leaf is None:
        raise CheckpointError(f"shardings[{item!r}] has no entry for {_name(path)}")
    return leaf


def load_checkpoint(directory: str | os.PathLike, param_dtype: Any = None, shardings: Any = None,
                    lora_dtype: Any = jnp.float32) -> tuple[LLaMAConfig, LoRAConfig | None, dict[str, Any]]:
    """Read a jaxlora checkpoint straight into device arrays: (config, lora_config, variables).

    variables = {"params": ..., "lora": ...} ("lora" only when the checkpoint has adapters).
    param_dtype: cast the frozen weights while reading (None keeps the stored dtype).
    lora_dtype: dtype of the adapters (default float32, the trainable dtype; None keeps stored).
    shardings: None (first local device), one jax Sharding for every array, or
    {"params": Sharding | tree of Shardings, "lora": ...}; each array is read shard by shard.
    """
    ocp = _ocp()
    directory = Path(directory).absolute()
    config, lora_config = read_config(directory)
    if not (directory / PARAMS_DIR).is_dir():
        raise CheckpointError(f"{directory}: no {PARAMS_DIR}/ directory (incomplete checkpoint)")
    has_lora = _has_adapters(lora_config)
    if has_lora and not (directory / LORA_DIR).is_dir():
        raise CheckpointError(f"{directory}: config.json describes adapters ({lora_config}) but there is no "
                              f"{LORA_DIR}/ directory")
    expected = expected_variables(config, lora_config if has_lora else None)
    variables: dict[str, Any] = {}
    for item in ITEMS:
        if item == LORA_DIR and not has_lora:
            continue
        item_dir = directory / item
        stored = ArrayTreeReader(item_dir).shapes()
        check_shapes({p: s for p, (s, _) in stored.items()}, expected[item], str(item_dir))
        dtype = param_dtype if item == PARAMS_DIR else lora_dtype
        restore_args = unflatten({
            p: ocp.ArrayRestoreArgs(sharding=_sharding_for(shardings, item, p),
                                    dtype=None if dtype is None else jnp.dtype(dtype), global_shape=shape)
            for p, (shape, _) in stored.items()})
        try:
            restored = ocp.PyTreeCheckpointer().restore(item_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
        except Exception as e:  # orbax/tensorstore raise many types for damaged data
            raise CheckpointError(f"{item_dir}: cannot be restored: {e}") from e
        variables[item] = restored
    return config, lora_config, variables
