"""Streaming conversion between lit-llama `.pth` files and jaxlora checkpoint directories.

Both directions walk the TensorMap tables of `jaxlora.formats.lit_llama` (one map per leaf
of ours, one lit tensor per layer) and hold at most a few single-layer tensors at a time:

- `lit_to_checkpoint`: lit-llama base checkpoint (+ LoRA file) -> DIR/{config.json, params, lora}.
  Tensors are read from the torch zip by `TorchZipReader` (no mmap, so the RSS does not grow
  with the file) and written layer by layer into the checkpoint's zarr arrays.
- `checkpoint_to_lit`: DIR -> lit-llama LoRA file, base checkpoint, or merged checkpoint
  (adapters folded into the weights with `jaxlora.lora.merge_lora`, one layer at a time).

Everything is validated (keys, shapes, preset, r, layer count, existing output) before the
first byte is written, and outputs appear under their final name only when complete.
"""
from __future__ import annotations

import concurrent.futures
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from jaxlora import checkpoint_io as cio
from jaxlora.config import LLaMAConfig, LoRAConfig
from jaxlora.formats import lit_llama
from jaxlora.formats.lit_llama import StateDictError, TensorMap
from jaxlora.formats.torch_stream import TorchZipReader, write_torch_zip

DTYPES = ("float32", "bfloat16", "float16")


def parse_dtype(name: str | None) -> np.dtype | None:
    """'float32' | 'bfloat16' | 'float16' | None/'keep' -> numpy dtype (None keeps the source's)."""
    if name is None or name == "keep":
        return None
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES} (or keep), got {name!r}")
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


class Progress:
    """'[n/N] key  done/total GB  x GB/s' on stderr, at most about once a second."""

    def __init__(self, label: str, total_items: int, total_bytes: int, enabled: bool = True,
                 stream: Any = None, interval: float = 1.0) -> None:
        self.label, self.total_items, self.total_bytes = label, total_items, total_bytes
        self.enabled, self.stream, self.interval = enabled, stream or sys.stderr, interval
        self.items = self.bytes = 0
        self.start = self._last = time.perf_counter()

    def update(self, name: str, nbytes: int) -> None:
        self.items += 1
        self.bytes += nbytes
        now = time.perf_counter()
        if self.enabled and (now - self._last >= self.interval or self.items == self.total_items):
            self._last = now
            print(f"{self.label}: [{self.items}/{self.total_items}] {name}  {self.bytes / 1e9:.2f}/"
                  f"{self.total_bytes / 1e9:.2f} GB  {self.rate():.2f} GB/s", file=self.stream, flush=True)

    def rate(self) -> float:
        return self.bytes / 1e9 / max(time.perf_counter() - self.start, 1e-9)

    def stats(self) -> dict[str, float]:
        seconds = time.perf_counter() - self.start
        return {"tensors": self.items, "bytes": self.bytes, "seconds": round(seconds, 3),
                "gb_per_s": round(self.bytes / 1e9 / max(seconds, 1e-9), 4)}


def _prefetched(tasks: Sequence[Callable[[], Any]], depth: int = 2) -> Iterator[Any]:
    """Results of tasks in order, computing up to `depth` ahead on a thread pool (I/O and numpy
    copies release the GIL). At most depth + 1 results exist at a time."""
    if depth <= 0:
        for task in tasks:
            yield task()
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=depth) as pool:
        futures: list[concurrent.futures.Future] = []
        it = iter(tasks)
        for task in it:
            futures.append(pool.submit(task))
            if len(futures) > depth:
                break
        while futures:
            result = futures.pop(0).result()
            nxt = next(it, None)
            if nxt is not None:
                futures.append(pool.submit(nxt))
            yield result


@dataclass(frozen=True)
class _Item:
    """One lit-llama tensor: its key, its map, its layer (None for unlayered maps)."""

    key: str
    map: TensorMap
    layer: int | None


def _items(maps: Sequence[TensorMap], n_layer: int) -> list[_Item]:
    items = {key: _Item(key, m, i if m.layered else None) for m in maps for i, key in enumerate(m.keys(n_layer))}
    return list(lit_llama._sorted_like_lit(items).values())  # lit-llama's own key order


def _layer_count(keys: Sequence[str]) -> int:
    return len({k.split(".")[2] for k in keys if k.startswith("transformer.h.")})


def _check_lora_file(shapes: Mapping[str, tuple[int, ...]], config: LLaMAConfig, alpha: float, dropout: float,
                     source: str) -> LoRAConfig:
    lora = lit_llama.infer_lora(shapes, config.n_embd, alpha, dropout, source)
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
                      overwrite: bool = False, progress: bool = True,
                      prefetch: int = 2) -> tuple[LLaMAConfig, LoRAConfig | None, dict[str, float]]:
    """lit-llama `lit-llama.pth` (+ `lit-llama-lora-finetuned.pth`) -> jaxlora checkpoint directory.

    The preset is recognised from the weights unless `config` is given. r and the q/k/v layout
    come from the LoRA file; alpha (not stored by lit-llama) from `lora_alpha`.
    dtype: storage dtype of the frozen weights (None: keep the file's); adapters keep theirs.
    Returns (config, lora_config, stats) with stats = tensors, bytes read, seconds, GB/s.
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

        jobs: list[tuple[TorchZipReader, str, str, list[_Item], np.dtype | None]] = [
            (base, cio.PARAMS_DIR, source, _items(lit_llama.base_maps(config), config.n_layer), dtype)]
        if lora_reader is not None:
            jobs.append((lora_reader, cio.LORA_DIR, str(lora_path),
                         _items(lit_llama.lora_maps(config, lora_config), config.n_layer), None))
        total = sum(r.tensors[i.key].nbytes for r, _, _, items, _ in jobs for i in items)
        meter = Progress("from_lit_llama", sum(len(j[3]) for j in jobs), total, progress)
        with cio.staged_directory(out_dir, overwrite) as tmp:
            cio.write_config(tmp, config, lora_config)
            for reader, item, src, items, cast in jobs:
                leaves = {}
                for m in {i.map.path: i.map for i in items}.values():
                    leaf_dtype = cast or reader.tensors[m.keys(config.n_layer)[0]].dtype
                    leaves[m.path[1:]] = (tuple(expected[item][m.path[1:]].shape), leaf_dtype)
                with cio.ArrayTreeWriter(tmp / item, leaves) as writer:
                    def task(it: _Item, reader: TorchZipReader = reader, leaves: dict = leaves) -> tuple:
                        raw = reader.read(it.key)
                        value = it.map.to_ours(raw).astype(leaves[it.map.path[1:]][1], copy=False)
                        return it, value, raw.nbytes
                    for it, value, nbytes in _prefetched([lambda it=it: task(it) for it in items], prefetch):
                        writer.write(it.map.path[1:], value, it.layer)
                        meter.update(it.key, nbytes)
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
    """One layer's kernel with its adapter folded in, by jaxlora.lora.merge_lora (float32 sum)."""
    import jax
    from jaxlora.lora import merge_lora
    params, lora = {"kernel": kernel}, {"lora_A": lora_a, "lora_B": lora_b}
    for key in reversed(module):
        params, lora = {key: params}, {key: lora}
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu), jax.default_matmul_precision("highest"):
        merged = merge_lora(params, lora, lora_config)
    for key in module:
        merged = merged[key]
    return np.asarray(merged["kernel"])


def checkpoint_to_lit(checkpoint_dir: str | os.PathLike, out: str | os.PathLike, kind: str = "lora",
                      dtype: Any = None, overwrite: bool = False, progress: bool = True,
                      prefetch: int = 2) -> dict[str, float]:
    """A jaxlora checkpoint -> one lit-llama .pth file, tensor by tensor, atomically.

    kind: "lora" (lit-llama's LoRA file; q/k/v adapters only, else StateDictError),
    "base" (the frozen weights as `lit-llama.pth`), "merged" (base with every adapter folded in,
    as lit-llama's convert_lora_weights.py; any targets). dtype: output dtype (None keeps the
    stored one). Returns stats (tensors, bytes written, seconds, GB/s).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    dtype = parse_dtype(dtype) if isinstance(dtype, str) or dtype is None else np.dtype(dtype)
    directory = Path(checkpoint_dir).absolute()
    config, lora_config = cio.read_config(directory)
    has_lora = cio._has_adapters(lora_config)
    if kind == "lora":
        if not has_lora:
            raise cio.CheckpointError(f"{directory}: has no adapters (config.json 'lora' is null); nothing to export "
                                      "as a LoRA file (use --base for the weights)")
        lit_llama.lit_lora_compatible(lora_config)
    if kind == "merged" and not has_lora:
        raise cio.CheckpointError(f"{directory}: has no adapters to merge; use --base")
    expected = cio.expected_variables(config, lora_config if has_lora else None)
    readers: dict[str, cio.ArrayTreeReader] = {}
    for item in (cio.PARAMS_DIR, cio.LORA_DIR) if kind == "merged" else \
            ((cio.LORA_DIR,) if kind == "lora" else (cio.PARAMS_DIR,)):
        if not (directory / item).is_dir():
            raise cio.CheckpointError(f"{directory}: no {item}/ directory (incomplete checkpoint)")
        readers[item] = cio.ArrayTreeReader(directory / item)
        stored = readers[item].shapes()
        cio.check_shapes({p: s for p, (s, _) in stored.items()}, expected[item], str(directory / item))

    maps = lit_llama.lora_maps(config, lora_config) if kind == "lora" else lit_llama.base_maps(config)
    items = _items(maps, config.n_layer)
    lora_paths = set(expected.get(cio.LORA_DIR, {})) if kind == "merged" else set()

    def task(it: _Item) -> tuple[str, np.ndarray]:
        path = it.map.path[1:]
        value = readers[it.map.path[0]].read(path, it.layer)
        if dtype is not None:
            value = value.astype(dtype)  # before merging: the merged sum is rounded once, to dtype
        if path[-1] == "kernel" and path[:-1] + ("lora_A",) in lora_paths:
            lora = readers[cio.LORA_DIR]
            value = _merge_layer(value, lora.read(path[:-1] + ("lora_A",), it.layer),
                                 lora.read(path[:-1] + ("lora_B",), it.layer), path[1:-1], lora_config)
        return it.key, it.map.to_lit(value)

    stored_dtypes = {(item, p): d for item, r in readers.items() for p, (_, d) in r.shapes().items()}
    total = sum(int(np.prod(it.map.lit_shape)) * (dtype or stored_dtypes[(it.map.path[0], it.map.path[1:])]).itemsize
                for it in items)
    meter = Progress("to_lit_llama", len(items), total, progress)

    def stream() -> Iterator[tuple[str, np.ndarray]]:
        for key, value in _prefetched([lambda it=it: task(it) for it in items], prefetch):
            meter.update(key, value.nbytes)
            yield key, value

    write_torch_zip(out, stream())
    return meter.stats()
