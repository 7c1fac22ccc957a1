"""Streaming conversion between lit-llama `.pth` files and jaxlora checkpoint directories.

Both directions walk the TensorMap tables of `jaxlora.weights.lit_llama` (one map per leaf
of ours, one lit tensor per layer) and hold at most a few single-layer tensors at a time:

- `lit_to_checkpoint`: lit-llama base checkpoint (+ LoRA file) -> DIR/{config.json, params, lora}.
  Tensors are read from the torch zip by `TorchZipReader` (no mmap, so the RSS does not grow
  with the file) and written layer by layer into the checkpoint's zarr arrays.
- `checkpoint_to_lit`: DIR -> lit-llama LoRA file, base checkpoint, or merged checkpoint
  (adapters folded into the weights with `jaxlora.model.lora.merge_lora`, one layer at a time).
  For a merged export the base may also be lit-llama's own `.pth` (`LitBaseReader`).

Everything is validated (keys, shapes, preset, r, layer count, existing output) before the
first byte is written, and outputs appear under their final name only when complete.
"""
from __future__ import annotations

import collections
import concurrent.futures
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from jaxlora.config import LLaMAConfig, LoRAConfig
from jaxlora.errors import CheckpointError, StateDictError
from jaxlora.weights import jaxlora_dir as cio
from jaxlora.weights import lit_llama
from jaxlora.weights.lit_llama import TensorMap
from jaxlora.weights.torch_zip import RowBlocks, TorchZipReader, write_torch_zip

DTYPES = ("float32", "bfloat16", "float16")
# Bad input the converters' command lines report in one line and exit 2 for (as train.py):
# StateDictError, CheckpointError and argument errors are ValueErrors.
USER_ERRORS = (ValueError, FileExistsError, FileNotFoundError)


def release_freed_memory() -> None:
    """Make glibc hand buffers of >= 1 MiB back to the OS when freed (fixed mmap threshold).

    By default glibc raises its mmap threshold up to 32 MiB as buffers are freed and keeps
    smaller freed buffers in per-thread arenas, so a converter streaming many 1-32 MiB tensors
    through several threads (ours and tensorstore's) would see its RSS creep up with the core
    count. The converters' command lines call this once; a no-op off glibc.
    """
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_mmap_threshold, m_arena_max = -3, -8
        libc.mallopt(m_mmap_threshold, 1 << 20)
        libc.mallopt(m_arena_max, 4)
    except (OSError, AttributeError):
        pass


def parse_dtype(name: str | None) -> np.dtype | None:
    """'float32' | 'bfloat16' | 'float16' | None/'keep' -> numpy dtype (None keeps the source's)."""
    if name is None or name == "keep":
        return None
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES} (or keep), got {name!r}")
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


class Progress:
    """Counts the pieces and bytes moved (for the returned stats) and shows them on stderr with
    tqdm: bytes done of the total, rate and ETA, and the tensor being moved."""

    def __init__(self, label: str, total_bytes: int, enabled: bool = True) -> None:
        from tqdm import tqdm
        self.bar = tqdm(total=total_bytes, desc=label, unit="B", unit_scale=True, unit_divisor=1000,
                        disable=not enabled, mininterval=1.0, file=sys.stderr, dynamic_ncols=True)
        self.pieces = self.bytes = 0
        self.start = time.perf_counter()

    def update(self, name: str, nbytes: int) -> None:
        self.pieces += 1
        self.bytes += nbytes
        self.bar.set_postfix_str(name, refresh=False)
        self.bar.update(nbytes)

    def stats(self) -> dict[str, float]:
        """Closes the bar; pieces, bytes, seconds, GB/s."""
        self.bar.close()
        seconds = time.perf_counter() - self.start
        return {"pieces": self.pieces, "bytes": self.bytes, "seconds": round(seconds, 3),
                "gb_per_s": round(self.bytes / 1e9 / max(seconds, 1e-9), 4)}


def _prefetched(tasks: Sequence[Callable[[], Any]], sizes: Sequence[int], max_bytes: int,
                workers: int = 2) -> Iterator[Any]:
    """Results of `tasks` in order, computed ahead on a thread pool (preads and numpy copies
    release the GIL) while the sizes of the results not yet consumed stay within max_bytes
    (at least one task always runs)."""
    if workers <= 0:
        for task in tasks:
            yield task()
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        pending: collections.deque = collections.deque()
        ahead = 0
        todo = iter(zip(tasks, sizes))
        nxt = next(todo, None)
        while pending or nxt is not None:
            while nxt is not None and (not pending or (ahead + nxt[1] <= max_bytes and len(pending) <= workers)):
                pending.append((pool.submit(nxt[0]), nxt[1]))
                ahead += nxt[1]
                nxt = next(todo, None)
            future, size = pending.popleft()
            try:
                result = future.result()
            except BaseException:
                for f, _ in pending:
                    f.cancel()
                raise
            ahead -= size
            yield result


@dataclass(frozen=True)
class _Item:
    """One lit-llama tensor, or a block of its rows: key, map, and where it lives in our leaf."""

    key: str
    map: TensorMap
    where: Any = None  # None (whole leaf), int (a layer), or a tuple of slices (a block)
    rows: tuple[int, int] | None = None  # the block's rows of the lit tensor
    first_block: bool = False

    @property
    def label(self) -> str:
        return self.key if self.rows is None else f"{self.key}[{self.rows[0]}:{self.rows[1]}]"


def _items(maps: Sequence[TensorMap], n_layer: int) -> list[_Item]:
    items = {key: _Item(key, m, i if m.layered else None) for m in maps for i, key in enumerate(m.keys(n_layer))}
    return list(lit_llama._sorted_like_lit(items).values())  # lit-llama's own key order


def _row_layout(m: TensorMap) -> str | None:
    """Where the rows of a 2-D lit tensor land in ours: 'rows' (as is), 'cols' (transposed), or None."""
    if m.layered or len(m.lit_shape) != 2:
        return None
    probe = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = m.to_ours(probe)
    if out.shape == probe.shape and np.array_equal(out, probe):
        return "rows"
    if out.shape == probe.T.shape and np.array_equal(out, probe.T):
        return "cols"
    return None


def _blocked(items: list[_Item], chunks_of: Callable[[TensorMap], tuple[int, ...] | None]) -> list[_Item]:
    """Split unlayered 2-D tensors (wte, lm_head) into row blocks that match our leaf's chunks."""
    out: list[_Item] = []
    for it in items:
        layout, chunks = _row_layout(it.map), chunks_of(it.map)
        rows = it.map.lit_shape[0] if layout else 0
        step = (chunks[0] if layout == "rows" else chunks[1]) if layout and chunks else rows
        if not layout or step >= rows:
            out.append(it)
            continue
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            where = (slice(r0, r1), slice(None)) if layout == "rows" else (slice(None), slice(r0, r1))
            out.append(_Item(it.key, it.map, where, (r0, r1), first_block=r0 == 0))
    return out


def _item_bytes(it: _Item, itemsize: int) -> int:
    rows = it.map.lit_shape[0] if it.rows is None or not it.map.lit_shape else it.rows[1] - it.rows[0]
    return int(np.prod(it.map.lit_shape[1:], dtype=np.int64)) * rows * itemsize if it.map.lit_shape else itemsize


def _layer_count(keys: Sequence[str]) -> int:
    return len({k.split(".")[2] for k in keys if k.startswith("transformer.h.")})


def _check_lora_file(shapes: Mapping[str, tuple[int, ...]], config: LLaMAConfig, alpha: float, dropout: float,
                     source: str) -> LoRAConfig:
    lora = lit_llama.lit_lora_config(shapes, config.n_embd, alpha, dropout, source)
    n_layers = _layer_count(list(shapes))
    if n_layers != config.n_layer:
        raise StateDictError(f"{source}: the LoRA file has adapters for {n_layers} layers, the base checkpoint has "
                             f"{config.n_layer} layers")
    ranks = {tuple(v)[1] for k, v in shapes.items() if k.endswith("lora_B") and len(v) == 2}
    if len(ranks) > 1:
        raise StateDictError(f"{source}: lora_B tensors disagree on r (ranks {sorted(ranks)}); lit-llama uses one r")
    lit_llama.check_state_dict(shapes, lit_llama.lora_maps(config, lora), config.n_layer, source)
    return lora


def lit_to_checkpoint(checkpoint_path: str | os.PathLike, out_dir: str | os.PathLike,
                      lora_path: str | os.PathLike | None = None, lora_alpha: float = 16.0,
                      lora_dropout: float = 0.05, dtype: Any = None, config: LLaMAConfig | None = None,
                      overwrite: bool = False, progress: bool = True, workers: int = 2,
                      max_bytes_ahead: int = 128 << 20) -> tuple[LLaMAConfig, LoRAConfig | None, dict[str, float]]:
    """lit-llama `lit-llama.pth` (+ `lit-llama-lora-finetuned.pth`) -> jaxlora checkpoint directory.

    The preset is recognised from the weights unless `config` is given. The LoRA file holds
    q, v adapters (the only ones it can mean); r comes from it, alpha (not stored by lit-llama)
    from `lora_alpha`.
    dtype: storage dtype of the frozen weights (None: keep the file's); adapters keep theirs.
    Memory: tensors are read, transformed and written by `workers` threads with at most
    `max_bytes_ahead` of results waiting and as much again being written; wte and lm_head are
    moved in blocks of our chunks (<= 64 MB). So the peak stays near a few single-layer tensors.
    Returns (config, lora_config, stats) with stats = pieces, bytes read, seconds, GB/s.
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass --overwrite to replace it")
    dtype = parse_dtype(dtype) if isinstance(dtype, str) or dtype is None else np.dtype(dtype)
    base = TorchZipReader(checkpoint_path)
    lora_reader = None
    try:
        source = str(checkpoint_path)
        shapes = base.shapes()
        lora_keys = [k for k in shapes if ".lora_" in k]
        if lora_keys:
            raise StateDictError(f"{source}: holds LoRA tensors ({lora_keys[0]}, ...); pass the base checkpoint as "
                                 "--checkpoint_path and the adapters as --lora_path")
        if config is None:
            config = lit_llama.infer_config(shapes, source)
        lit_llama.check_state_dict(shapes, lit_llama.base_maps(config), config.n_layer, source)
        lora_config = None
        if lora_path is not None:
            lora_reader = TorchZipReader(lora_path)
            lora_config = _check_lora_file(lora_reader.shapes(), config, lora_alpha, lora_dropout, str(lora_path))
        expected = cio.expected_variables(config, lora_config)

        sources = [(base, cio.PARAMS_DIR, lit_llama.base_maps(config), dtype)]
        if lora_reader is not None:
            sources.append((lora_reader, cio.LORA_DIR, lit_llama.lora_maps(config, lora_config), None))
        jobs = []  # (reader, item, work items, leaves spec)
        for reader, item, maps, cast in sources:
            leaves = {}
            for m in maps:
                shape = tuple(expected[item][m.path[1:]].shape)
                leaf_dtype = np.dtype(cast or reader.tensors[m.keys(config.n_layer)[0]].dtype)
                leaves[m.path[1:]] = (shape, leaf_dtype, cio.default_chunks(shape, leaf_dtype.itemsize, m.layered))
            items = _blocked(_items(maps, config.n_layer), lambda m, leaves=leaves: leaves[m.path[1:]][2])
            jobs.append((reader, item, items, leaves))
        total = sum(reader.nbytes() for reader, *_ in sources)
        meter = Progress("from_lit_llama", total, progress)
        with cio.staged_directory(out_dir, overwrite) as tmp:
            cio.write_config(tmp, config, lora_config)
            for reader, item, items, leaves in jobs:
                def task(it: _Item, reader: TorchZipReader = reader, leaves: dict = leaves) -> tuple:
                    if it.first_block:
                        reader.verify(it.key)  # blocks skip the per-read CRC: check the record once
                    raw = reader.read(it.key, it.rows)
                    value = it.map.to_ours(raw).astype(leaves[it.map.path[1:]][1], copy=False)
                    return it, value, raw.nbytes

                sizes = [_item_bytes(i, reader.tensors[i.key].dtype.itemsize) for i in items]
                with cio.ArrayTreeWriter(tmp / item, leaves, max_pending_bytes=max_bytes_ahead) as writer:
                    for it, value, nbytes in _prefetched([lambda it=it: task(it) for it in items], sizes,
                                                         max_bytes_ahead, workers):
                        writer.write(it.map.path[1:], value, it.where)
                        meter.update(it.label, nbytes)
                        del value
    finally:
        base.close()
        if lora_reader is not None:
            lora_reader.close()
    return config, lora_config, meter.stats()


# ---------------------------------------------------------------------------------------------
# jaxlora -> lit-llama

KINDS = ("lora", "base", "merged")


def _merge_layer(kernel: np.ndarray, lora_a: np.ndarray, lora_b: np.ndarray, module: tuple[str, ...],
                 lora_config: LoRAConfig) -> np.ndarray:
    """One layer's kernel with its adapter folded in, by jaxlora.model.lora.merge_lora (float32 sum)."""
    import jax

    from jaxlora.model.lora import merge_lora
    params, lora = {"kernel": kernel}, {"lora_A": lora_a, "lora_B": lora_b}
    for key in reversed(module):
        params, lora = {key: params}, {key: lora}
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu), jax.default_matmul_precision("highest"):
        merged = merge_lora(params, lora, lora_config)
    for key in module:
        merged = merged[key]
    return np.asarray(merged["kernel"])


class LitBaseReader:
    """A lit-llama base `.pth` seen as our `params` tree, read per layer: the reading side of
    `cio.ArrayTreeReader` that `checkpoint_to_lit` uses (shapes, chunks, read)."""

    def __init__(self, path: str | os.PathLike, config: LLaMAConfig) -> None:
        self.path = Path(path)
        self.reader = TorchZipReader(path)
        self.n_layer = config.n_layer
        self.maps = {m.path[1:]: m for m in lit_llama.base_maps(config)}
        lit_llama.check_state_dict(self.reader.shapes(), self.maps.values(), self.n_layer, str(self.path))
        ours = cio.expected_variables(config, None)[cio.PARAMS_DIR]
        dtypes = self.reader.dtypes()
        self._shapes = {p: (tuple(ours[p].shape), np.dtype(dtypes[m.keys(self.n_layer)[0]]))
                        for p, m in self.maps.items()}

    def shapes(self) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
        return dict(self._shapes)

    def chunks(self, path: tuple[str, ...]) -> None:
        return None  # whole tensors: a lit file has no chunk layout to follow

    def read_lit(self, path: tuple[str, ...], where: Any = None) -> np.ndarray:
        """The lit-llama tensor behind our leaf `path` (layer `where`), in lit-llama's layout."""
        m = self.maps[path]
        return self.reader.read(m.keys(self.n_layer)[where] if m.layered else m.lit_key)

    def read(self, path: tuple[str, ...], where: Any = None) -> np.ndarray:
        return self.maps[path].to_ours(self.read_lit(path, where))

    def close(self) -> None:
        self.reader.close()


def checkpoint_to_lit(checkpoint_dir: str | os.PathLike | None, out: str | os.PathLike, kind: str = "lora",
                      dtype: Any = None, overwrite: bool = False, progress: bool = True,
                      workers: int = 2, max_bytes_ahead: int = 128 << 20,
                      adapters_dir: str | os.PathLike | None = None) -> dict[str, float]:
    """A jaxlora checkpoint -> one lit-llama .pth file, tensor by tensor, atomically.

    kind: "lora" (lit-llama's LoRA file: targets exactly q, v, else LitLoRATargetsError),
    "base" (the frozen weights as `lit-llama.pth`), "merged" (base with every adapter folded in,
    as lit-llama's convert_lora_weights.py; any targets). dtype: output dtype (None keeps the
    stored one). adapters_dir: take the adapters from this adapters-only directory (what
    train.py writes) instead of checkpoint_dir's lora/; checkpoint_dir may then be None for
    kind "lora". Returns stats (pieces, bytes written, seconds, GB/s).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    dtype = parse_dtype(dtype) if isinstance(dtype, str) or dtype is None else np.dtype(dtype)
    if checkpoint_dir is None and (adapters_dir is None or kind != "lora"):
        raise ValueError(f"kind {kind!r} needs the base checkpoint directory")
    lit_base = None
    if checkpoint_dir is not None and Path(checkpoint_dir).is_file():  # lit-llama's own base .pth
        if kind != "merged" or adapters_dir is None:
            raise ValueError(f"{checkpoint_dir}: a lit-llama .pth serves as the base only for a merged export "
                             "with --adapters; convert it first for anything else (convert/from_lit_llama.py)")
        with TorchZipReader(checkpoint_dir) as reader:
            config = lit_llama.infer_config(reader.shapes(), str(checkpoint_dir))
        lit_base = Path(checkpoint_dir)
        directory = Path(checkpoint_dir).absolute()
        lora_config = None
    else:
        directory = Path(checkpoint_dir if checkpoint_dir is not None else adapters_dir).absolute()
        config, lora_config = cio.read_config(directory)
    sources = {cio.PARAMS_DIR: directory, cio.LORA_DIR: directory}
    if adapters_dir is not None:
        adapters = Path(adapters_dir).absolute()
        adapter_config, lora_config = cio.read_config(adapters)
        if adapter_config != config:
            diffs = "; ".join(f"{k}: adapters {v}, base {getattr(config, k)}"
                              for k, v in adapter_config.to_dict().items() if getattr(config, k) != v)
            raise CheckpointError(f"{adapters}: adapters for another model than {directory} ({diffs})")
        sources[cio.LORA_DIR] = adapters
    has_lora = cio.has_adapters(lora_config)
    lora_home = sources[cio.LORA_DIR]
    lit = LLaMAConfig()  # lit-llama's model fixes these two
    for name, what in (("norm_eps", "RMSNorm epsilon"), ("rope_base", "RoPE base")):
        if kind != "lora" and getattr(config, name) != getattr(lit, name):
            warnings.warn(f"{checkpoint_dir}: {what} {getattr(config, name):g}; lit-llama's model always uses "
                          f"{getattr(lit, name):g}, so it will compute this model differently", stacklevel=2)
    if kind == "lora":
        if not has_lora:
            raise CheckpointError(f"{lora_home}: has no adapters (config.json 'lora' is null); nothing to export "
                                      "as a LoRA file (use --base for the weights)")
        lit_llama.check_lit_lora_targets(lora_config)
    if kind == "merged" and not has_lora:
        raise CheckpointError(f"{lora_home}: has no adapters to merge; use --base")
    expected = cio.expected_variables(config, lora_config if has_lora else None)
    readers: dict[str, cio.ArrayTreeReader] = {}
    for item in (cio.PARAMS_DIR, cio.LORA_DIR) if kind == "merged" else \
            ((cio.LORA_DIR,) if kind == "lora" else (cio.PARAMS_DIR,)):
        if item == cio.PARAMS_DIR and lit_base is not None:
            readers[item] = LitBaseReader(lit_base, config)  # validates keys and shapes
            continue
        where = sources[item] / item
        if not where.is_dir():
            raise CheckpointError(f"{sources[item]}: no {item}/ directory (incomplete checkpoint)")
        readers[item] = cio.ArrayTreeReader(where)
        stored = readers[item].shapes()
        cio.check_shapes({p: s for p, (s, _) in stored.items()}, expected[item], str(where))

    maps = lit_llama.lora_maps(config, lora_config) if kind == "lora" else lit_llama.base_maps(config)
    lora_paths = set(expected.get(cio.LORA_DIR, {})) if kind == "merged" else set()
    stored_dtype = {(item, p): d for item, r in readers.items() for p, (_, d) in r.shapes().items()}
    out_dtype = {m.path: dtype or stored_dtype[(m.path[0], m.path[1:])] for m in maps}
    items = _blocked(_items(maps, config.n_layer), lambda m: readers[m.path[0]].chunks(m.path[1:]))

    def task(it: _Item) -> tuple[_Item, np.ndarray]:
        path, source = it.map.path[1:], readers[it.map.path[0]]
        merge = path[-1] == "kernel" and path[:-1] + ("lora_A",) in lora_paths
        if isinstance(source, LitBaseReader) and not merge:  # already in lit-llama's layout: no round trip
            return it, source.read_lit(path, it.where).astype(out_dtype[it.map.path], copy=False)
        value = source.read(path, it.where).astype(out_dtype[it.map.path], copy=False)
        if merge:
            # merged into the output dtype: the float32 sum is rounded once
            lora = readers[cio.LORA_DIR]
            value = _merge_layer(value, lora.read(path[:-1] + ("lora_A",), it.where),
                                 lora.read(path[:-1] + ("lora_B",), it.where), path[1:-1], lora_config)
        return it, it.map.to_lit(value)

    sizes = [_item_bytes(it, out_dtype[it.map.path].itemsize) for it in items]
    meter = Progress("to_lit_llama", sum(sizes), progress)

    def stream() -> Iterator[tuple[str, np.ndarray | RowBlocks]]:
        results = _prefetched([lambda it=it: task(it) for it in items], sizes, max_bytes_ahead, workers)
        n = 0
        while n < len(items):
            it = items[n]
            count = 1
            while n + count < len(items) and items[n + count].key == it.key:
                count += 1
            n += count
            if it.rows is None:
                _, value = next(results)
                meter.update(it.label, value.nbytes)
                yield it.key, value
            else:
                def blocks(count: int = count) -> Iterator[np.ndarray]:
                    for _ in range(count):
                        part, value = next(results)
                        meter.update(part.label, value.nbytes)
                        yield value
                yield it.key, RowBlocks(it.map.lit_shape, out_dtype[it.map.path], blocks())

    try:
        write_torch_zip(out, stream())
    finally:
        for reader in readers.values():
            if isinstance(reader, LitBaseReader):
                reader.close()
    return meter.stats()
