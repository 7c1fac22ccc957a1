"""The one streaming engine every weights move goes through: readers -> (mapping) -> sinks.

Two kinds of reader, one protocol each:

- a tensor file (`TensorFile`: torch zip `.pth`, safetensors / `pytorch_model*.bin` directories):
  external keys, `read(key, rows)` of a whole tensor or a block of its rows;
- a leaf reader (`LeafReader`: our variables by path): `shapes()` and `read(path, where)` of a
  whole leaf, one layer, or a region. A jaxlora array tree (`ArrayTreeReader`) is one;
  `MappedReader` makes any tensor file one through a mapping table (lit-llama's, HF's, PEFT's,
  litgpt's `TensorMap` lists), reading no more than one layer of one tensor per call.

Sinks: `fill_tree` (a jaxlora array tree, piece by piece), `external_tensors` (the tensors of a
torch zip or safetensors file, in that format's order, adapters folded in by `MergedView`), and
`jaxlora.weights.device.to_device` (device arrays in a model's run layout and sharding). The
host holds about one layer's tensor at a time (wte and lm_head go in row blocks); reads run
ahead on threads (`prefetched`) within a byte budget.
"""
from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import ctypes.util
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import jax
import numpy as np
from tqdm import tqdm

from jaxlora.config import LoRAConfig
from jaxlora.model.lora import merge_lora
from jaxlora.weights import lit_llama
from jaxlora.weights import jaxlora_dir as cio
from jaxlora.weights.lit_llama import TensorMap

Path_ = tuple[str, ...]
Where = int | tuple | None  # a whole leaf, one layer, or a region (layer first for layered leaves)
# Bytes of tensors read ahead of their consumer (preads and copies on threads): the host holds
# about one layer's tensors plus this much while streaming.
READ_AHEAD_BYTES = 128 << 20


class TensorFile(Protocol):
    """External tensors by key: torch zip readers and HF weight files."""

    def shapes(self) -> dict[str, tuple[int, ...]]: ...

    def dtypes(self) -> dict[str, np.dtype]: ...

    def read(self, key: str, rows: tuple[int, int] | None = None) -> np.ndarray: ...


class LeafReader(Protocol):
    """Our variables by leaf path (stored layout: layers stacked first, q/k/v fused)."""

    def shapes(self) -> dict[Path_, tuple[tuple[int, ...], np.dtype]]: ...

    def read(self, path: Path_, where: Where = None) -> np.ndarray: ...


def release_freed_memory() -> None:
    """Make glibc hand buffers of >= 1 MiB back to the OS when freed (fixed mmap threshold).

    By default glibc raises its mmap threshold up to 32 MiB as buffers are freed and keeps
    smaller freed buffers in per-thread arenas, so a converter or loader streaming many 1-32 MiB tensors
    through several threads (ours, tensorstore's, XLA's) would see its RSS creep up with the
    core count. The converters' command lines and `load.load_params` call this; a no-op off glibc.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_mmap_threshold, m_arena_max = -3, -8
        libc.mallopt(m_mmap_threshold, 1 << 20)
        libc.mallopt(m_arena_max, 4)
    except (OSError, AttributeError):
        pass


def row_layout(m: TensorMap) -> str | None:
    """Where the rows of an unlayered 2-D external tensor land in our leaf: 'rows' (as is),
    'cols' (transposed), or None (neither: read it whole)."""
    if m.layered or len(m.lit_shape) != 2 or m.part:
        return None
    probe = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = m.to_ours(probe)
    if out.shape == probe.shape and np.array_equal(out, probe):
        return "rows"
    if out.shape == probe.T.shape and np.array_equal(out, probe.T):
        return "cols"
    return None


def block_rows(rows: int, line_bytes: int, max_bytes: int | None = None) -> list[tuple[int, int]]:
    """[r0, r1) blocks of at most max_bytes (default: the stored chunk size, read when called)
    covering `rows` rows of `line_bytes` each."""
    max_bytes = cio.MAX_CHUNK_BYTES if max_bytes is None else max_bytes
    step = max(1, min(rows, max_bytes // max(line_bytes, 1)))
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def block_where(layout: str, rows: tuple[int, int]) -> tuple[slice, slice]:
    """Our region for a block of external rows, by `row_layout`."""
    block = slice(*rows)
    return (block, slice(None)) if layout == "rows" else (slice(None), block)


class MappedReader:
    """A tensor file seen as our variables through a mapping table (a `LeafReader`).

    Validates every key and shape first (StateDictError names the file and key). `read` of a
    layered leaf reads that layer's external tensor(s) (HF's q, k, v fill one fused kernel);
    the last layer read is kept, so several regions of one layer cost one read. `ignore`:
    key suffixes that are not weights (HF's rotary inv_freq buffers)."""

    def __init__(self, file: TensorFile, maps: Iterable[TensorMap], n_layer: int,
                 expected: Mapping[Path_, Any], source: str, ignore: tuple[str, ...] = ()) -> None:
        self.file, self.n_layer, self.source = file, n_layer, source
        maps = list(maps)
        file_shapes = {k: tuple(s) for k, s in file.shapes().items() if not (ignore and k.endswith(ignore))}
        lit_llama.check_state_dict(file_shapes, maps, n_layer, source)
        self.order = {k: n for n, k in enumerate(file_shapes)}
        dtypes = file.dtypes()
        self.parts = {g[0].path[1:]: g for g in lit_llama.leaf_parts(maps)}
        self._shapes = {p: (tuple(expected[p].shape), np.dtype(dtypes[g[0].key(0)])) for p, g in self.parts.items()}
        self._lock = threading.Lock()
        self._last: tuple[Any, np.ndarray | None] = (None, None)

    def shapes(self) -> dict[Path_, tuple[tuple[int, ...], np.dtype]]:
        return dict(self._shapes)

    def read(self, path: Path_, where: Where = None) -> np.ndarray:
        parts = self.parts[path]
        if not parts[0].layered:
            return self._read_unlayered(parts, where)
        if where is None:
            return np.stack([self._layer(path, i) for i in range(self.n_layer)])
        layer, rest = (where, ()) if isinstance(where, (int, np.integer)) else (where[0], tuple(where[1:]))
        if isinstance(layer, slice):  # a run of layers (a shard of a layer-sharded stacked leaf)
            return np.stack([self._layer(path, i)[rest] for i in range(*layer.indices(self.n_layer))])
        value = self._layer(path, int(layer))
        return value[rest] if rest else value

    def _layer(self, path: Path_, layer: int) -> np.ndarray:
        with self._lock:
            key, value = self._last
            if key == (path, layer):
                return value
            self._last = (None, None)  # let the previous layer go before reading the next
        value = lit_llama.read_slice(self.file.read, self.parts[path], layer)
        with self._lock:
            self._last = ((path, layer), value)
        return value

    def _read_unlayered(self, parts: list[TensorMap], where: Where) -> np.ndarray:
        layout = row_layout(parts[0]) if len(parts) == 1 else None
        if where is None or layout is None:
            value = lit_llama.read_slice(self.file.read, parts, 0)
            return value if where is None else value[where]
        axis = 0 if layout == "rows" else 1
        start, stop, _ = where[axis].indices(self._shapes[parts[0].path[1:]][0][axis])
        verify = getattr(self.file, "verify", None)
        if start == 0 and verify is not None:
            verify(parts[0].key(0))  # block reads skip the per-read CRC: check the record once
        value = parts[0].to_ours(self.file.read(parts[0].key(0), (start, stop)))
        rest = list(where)
        rest[axis] = slice(None)
        return value[tuple(rest)]

    def nbytes(self, cast: Any = None) -> int:
        """Bytes of our leaves in the file's dtypes (or `cast`'s)."""
        return sum(int(np.prod(s, dtype=np.int64)) * np.dtype(cast or d).itemsize for s, d in self._shapes.values())

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "MappedReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_leaves(reader: LeafReader, dtype: Any = None,
                place: Callable[[np.ndarray, Path_], Any] | None = None) -> dict[Path_, Any]:
    """Host sink: every leaf whole (stacked), cast to dtype (None keeps it), then through
    place(leaf, path) when given. For small trees and tests; devices use `device.to_device`."""
    out = {}
    for path in reader.shapes():
        leaf = reader.read(path)
        leaf = leaf if dtype is None else leaf.astype(dtype, copy=False)
        out[path] = place(leaf, path) if place else leaf
    return out


def import_tree(item_dir: Any, reader: MappedReader, cast: np.dtype | None, meter: "Progress",
                workers: int = 2, max_bytes_ahead: int = READ_AHEAD_BYTES) -> None:
    """Sink: a mapped file's leaves into a new jaxlora array tree at item_dir, piece by piece
    (dtype `cast`, None keeps the file's)."""
    dtypes = {p: np.dtype(cast or d) for p, (_, d) in reader.shapes().items()}
    leaves = {p: (s, dtypes[p]) for p, (s, _) in reader.shapes().items()}
    with cio.ArrayTreeWriter(item_dir, leaves, max_pending_bytes=max_bytes_ahead) as writer:
        fill_tree(reader, import_pieces(reader, dtypes), writer, dtypes, meter, workers, max_bytes_ahead)


@dataclass(frozen=True)
class Piece:
    """One move of the engine: our leaf `path`, the part of it (`where`), a label, its bytes."""

    path: Path_
    where: Where
    label: str
    nbytes: int


def leaf_pieces(path: Path_, shape: tuple[int, ...], itemsize: int, layered: bool, layout: str | None,
                label: str) -> list[Piece]:
    """How one leaf moves: layer by layer; an unlayered 2-D leaf whose external rows map to our
    rows or columns (`layout`) in blocks of stored chunks; anything else whole."""
    if layered:
        per = int(np.prod(shape[1:], dtype=np.int64)) * itemsize
        return [Piece(path, i, f"{label}[{i}]", per) for i in range(shape[0])]
    if layout is None:
        return [Piece(path, None, label, int(np.prod(shape, dtype=np.int64)) * itemsize)]
    axis = 0 if layout == "rows" else 1
    line = shape[1 - axis] * itemsize
    return [Piece(path, block_where(layout, rows), f"{label}[{rows[0]}:{rows[1]}]", (rows[1] - rows[0]) * line)
            for rows in block_rows(shape[axis], line)]


def import_pieces(reader: MappedReader, dtypes: Mapping[Path_, np.dtype]) -> list[Piece]:
    """Every piece of a mapped file's leaves, in the file's own key order (sequential reads);
    blocks sized for the output `dtypes` match `jaxlora_dir.default_chunks` (whole chunks)."""
    pieces = []
    for path, (shape, _) in reader.shapes().items():
        parts = reader.parts[path]
        layout = row_layout(parts[0]) if len(parts) == 1 else None
        pieces += leaf_pieces(path, shape, dtypes[path].itemsize, parts[0].layered, layout, parts[0].lit_key)
    first = {path: min(reader.order[k] for m in reader.parts[path] for k in m.keys(reader.n_layer)[:1])
             for path in reader.parts}
    return sorted(pieces, key=lambda p: (first[p.path], p.where if isinstance(p.where, int) else 0))


def prefetched(tasks: Sequence[Callable[[], Any]], sizes: Sequence[int], max_bytes: int,
               workers: int = 2) -> Iterator[Any]:
    """Results of `tasks` in order, computed ahead on a thread pool (preads, numpy copies and
    tensorstore release the GIL) while the results not yet consumed stay within max_bytes (at
    least one task always runs)."""
    if workers <= 0:
        yield from (task() for task in tasks)
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        pending: collections.deque = collections.deque()
        ahead, todo = 0, iter(zip(tasks, sizes))
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


class Progress:
    """Counts the pieces and bytes moved (for the returned stats) and shows them on stderr with
    tqdm: bytes done of the total, rate and ETA, and the tensor being moved."""

    def __init__(self, label: str, total_bytes: int, enabled: bool = True) -> None:
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
        """Closes the bar; pieces, bytes, seconds, GB/s (None when too quick to tell)."""
        self.bar.close()
        seconds = time.perf_counter() - self.start
        rate = round(self.bytes / 1e9 / seconds, 4) if seconds > 0.05 else None
        return {"pieces": self.pieces, "bytes": self.bytes, "seconds": round(seconds, 3), "gb_per_s": rate}


def fill_tree(reader: LeafReader, pieces: Sequence[Piece], writer: Any, dtypes: Mapping[Path_, np.dtype],
              meter: Progress, workers: int = 2, max_bytes_ahead: int = READ_AHEAD_BYTES) -> None:
    """Sink: write `pieces` of `reader`'s leaves into an `ArrayTreeWriter`, cast to `dtypes`,
    reading ahead on `workers` threads within max_bytes_ahead."""
    def task(p: Piece) -> tuple[Piece, np.ndarray]:
        return p, reader.read(p.path, p.where).astype(dtypes[p.path], copy=False)

    for piece, value in prefetched([lambda p=p: task(p) for p in pieces], [p.nbytes for p in pieces],
                                   max_bytes_ahead, workers):
        writer.write(piece.path, value, piece.where)
        meter.update(piece.label, piece.nbytes)
        del value


def merge_layer(kernel: np.ndarray, lora_a: np.ndarray, lora_b: np.ndarray, module: tuple[str, ...],
                lora_config: LoRAConfig) -> np.ndarray:
    """One layer's kernel with its adapter folded in, by `merge_lora` (float32 sum) on the CPU."""
    params, lora = {"kernel": kernel}, {"lora_A": lora_a, "lora_B": lora_b}
    for key in reversed(module):
        params, lora = {key: params}, {key: lora}
    with jax.default_device(jax.devices("cpu")[0]), jax.default_matmul_precision("highest"):
        merged = merge_lora(params, lora, lora_config)
    for key in module:
        merged = merged[key]
    return np.asarray(merged["kernel"])


KernelTransform = Callable[[Path_, Where, np.ndarray], np.ndarray]  # (path, where, kernel) -> float32 kernel


class MergedView:
    """Our frozen weights (a LeafReader) with adapters (another, or None) folded in per layer.
    base_kernels(path, where, kernel): what the adapters are merged into instead of each stored
    kernel (e.g. the quantized-and-dequantized kernel a QLoRA run trained against), float32."""

    def __init__(self, params: LeafReader, lora: LeafReader | None = None, lora_config: LoRAConfig | None = None,
                 base_kernels: KernelTransform | None = None) -> None:
        self.params, self.lora, self.lora_config = params, lora, lora_config
        self.adapted = set(lora.shapes()) if lora is not None else set()
        self.base_kernels = base_kernels

    def read(self, path: Path_, where: Where, dtype: np.dtype) -> np.ndarray:
        """The slice in `dtype`; a merged kernel is summed in float32 and rounded once."""
        value = self.params.read(path, where)
        if self.base_kernels is not None and path[-1] == "kernel":
            value = self.base_kernels(path, where, value)  # float32, rounded to dtype once (after the sum)
        else:
            value = value.astype(dtype, copy=False)
        a_path = path[:-1] + ("lora_A",)
        if path[-1] != "kernel" or a_path not in self.adapted:
            return value.astype(dtype, copy=False)
        merged = merge_layer(value, self.lora.read(a_path, where), self.lora.read(path[:-1] + ("lora_B",), where),
                             path[1:-1], self.lora_config)
        return merged.astype(dtype, copy=False)


@dataclass(frozen=True)
class Entry:
    """One external tensor to produce (or a block of its rows): its key, map and our slice."""

    key: str
    map: TensorMap
    where: Where  # our slice: a layer, a region, or None
    rows: tuple[int, int] | None = None

    @property
    def label(self) -> str:
        return self.key if self.rows is None else f"{self.key}[{self.rows[0]}:{self.rows[1]}]"


def export_entries(maps: Iterable[TensorMap], n_layer: int, order: Callable[[dict], dict],
                   itemsize: int | None = None) -> list[Entry]:
    """The external tensors of `maps`, sorted by `order` (a format's key order); with
    `itemsize`, unlayered 2-D tensors come in row blocks (for sinks that take `RowBlocks`)."""
    entries = {}
    for m in maps:
        for i, key in enumerate(m.keys(n_layer)):
            layout = row_layout(m) if itemsize else None
            if layout is None:
                entries[key] = [Entry(key, m, i if m.layered else None)]
            else:
                line = int(np.prod(m.lit_shape[1:], dtype=np.int64)) * itemsize
                entries[key] = [Entry(key, m, block_where(layout, rows), rows)
                                for rows in block_rows(m.lit_shape[0], line)]
    return [e for key in order(entries) for e in entries[key]]


def entry_bytes(e: Entry, itemsize: int) -> int:
    rows = e.map.lit_shape[0] if e.rows is None or not e.map.lit_shape else e.rows[1] - e.rows[0]
    return int(np.prod(e.map.lit_shape[1:], dtype=np.int64)) * rows * itemsize if e.map.lit_shape else itemsize


def external_tensors(view: MergedView, entries: Sequence[Entry], dtypes: Mapping[str, np.dtype],
                     workers: int = 2, max_bytes_ahead: int = READ_AHEAD_BYTES) -> Iterator[tuple[Entry, np.ndarray]]:
    """Sink side for tensor files: (entry, tensor in the external layout and `dtypes[key]`), in
    order. Entries cut from one slice of ours (HF's q, k, v of one layer) share one read."""
    groups: list[list[Entry]] = []
    for e in entries:
        if groups and groups[-1][0].map.path == e.map.path and groups[-1][0].where == e.where \
                and isinstance(e.where, (int, type(None))):
            groups[-1].append(e)
        else:
            groups.append([e])

    def task(group: list[Entry]) -> list[tuple[Entry, np.ndarray]]:
        dt = dtypes[group[0].key]
        ours = view.read(group[0].map.path[1:], group[0].where, dt)
        return [(e, e.map.to_lit(ours[e.map.part]).astype(dt, copy=False)) for e in group]

    sizes = [sum(entry_bytes(e, dtypes[e.key].itemsize) for e in g) for g in groups]
    for results in prefetched([lambda g=g: task(g) for g in groups], sizes, max_bytes_ahead, workers):
        yield from results
