"""lit-llama `.pth` files <-> jaxlora checkpoint directories, through the streaming engine
(`jaxlora.weights.engine`: readers, the lit-llama mapping table, sinks), holding at most a
few single-layer tensors at a time; and what the HF and litgpt converters share with these
(dtype names, output checks, opening a checkpoint's array trees or its merged view:
`checkpoint_view`, writing a torch.save file tensor by tensor: `export_torch_zip`).

- `lit_to_checkpoint`: lit-llama base checkpoint (+ LoRA file) -> DIR/{config.json, params, lora}
  (`MappedReader` over `TorchZipReader`, pread, no mmap -> `import_tree`).
- `checkpoint_to_lit`: DIR -> lit-llama LoRA file, base checkpoint, or merged checkpoint
  (adapters folded in per layer by `MergedView` -> `external_tensors` -> `write_torch_zip`).
  For a merged export the base may also be lit-llama's own `.pth`.

Everything is validated (keys, shapes, preset, r, layer count, existing output) before the
first byte is written, and outputs appear under their final name only when complete.
"""
from __future__ import annotations

import collections
import contextlib
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import ml_dtypes
import numpy as np

from jaxlora.config import LLaMAConfig, LoRAConfig
from jaxlora.errors import CheckpointError, StateDictError
from jaxlora.weights import jaxlora_dir as cio
from jaxlora.weights import lit_llama
from jaxlora.weights.engine import (
    READ_AHEAD_BYTES,
    Entry,
    MappedReader,
    MergedView,
    Progress,
    entry_bytes,
    export_entries,
    external_tensors,
    import_tree,
)
from jaxlora.weights.lit_files import open_lit_base, open_lit_lora
from jaxlora.weights.lit_llama import TensorMap
from jaxlora.weights.quantized import DequantizedReader, merge_plan
from jaxlora.weights.torch_zip import RowBlocks, TorchZipReader, write_torch_zip

DTYPES = ("float32", "bfloat16", "float16")
KINDS = ("lora", "base", "merged")


def parse_dtype(name: Any) -> np.dtype | None:
    """'float32' | 'bfloat16' | 'float16' | None/'keep' | a dtype -> numpy dtype (None keeps the source's)."""
    if name is None or name == "keep":
        return None
    if not isinstance(name, str):
        return np.dtype(name)
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES} (or keep), got {name!r}")
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def check_new_output(out: str | os.PathLike, overwrite: bool) -> Path:
    """The absolute output path; FileExistsError when it exists and overwrite is off."""
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    return out


def _layer_count(keys: Sequence[str]) -> int:
    return len({k.split(".")[2] for k in keys if k.startswith("transformer.h.")})


def _check_lora_file(shapes: Mapping[str, tuple[int, ...]], config: LLaMAConfig, source: str) -> None:
    n_layers = _layer_count(list(shapes))
    if n_layers != config.n_layer:
        raise StateDictError(f"{source}: the LoRA file has adapters for {n_layers} layers, the base checkpoint has "
                             f"{config.n_layer} layers")
    ranks = {tuple(v)[1] for k, v in shapes.items() if k.endswith("lora_B") and len(v) == 2}
    if len(ranks) > 1:
        raise StateDictError(f"{source}: lora_B tensors disagree on r (ranks {sorted(ranks)}); lit-llama uses one r")


def _open_lit_sources(checkpoint_path: Any, lora_path: Any, lora_alpha: float, lora_dropout: float,
                      config: LLaMAConfig | None, stack: contextlib.ExitStack
                      ) -> tuple[LLaMAConfig, LoRAConfig | None, MappedReader, MappedReader | None]:
    with TorchZipReader(checkpoint_path) as probe:
        lora_keys = [k for k in probe.shapes() if ".lora_" in k]
    if lora_keys:
        raise StateDictError(f"{checkpoint_path}: holds LoRA tensors ({lora_keys[0]}, ...); pass the base checkpoint "
                             "as --checkpoint_path and the adapters as --lora_path")
    config, base = open_lit_base(checkpoint_path, config)
    stack.enter_context(base)
    if lora_path is None:
        return config, None, base, None
    with TorchZipReader(lora_path) as probe:  # the layer count first: it explains a wrong file best
        lit_llama.lit_lora_config(probe.shapes(), config.n_embd, lora_alpha, lora_dropout, str(lora_path))
        _check_lora_file(probe.shapes(), config, str(lora_path))
    lora_config, lora = open_lit_lora(lora_path, config, lora_alpha, lora_dropout)
    stack.enter_context(lora)
    return config, lora_config, base, lora


def lit_to_checkpoint(checkpoint_path: str | os.PathLike, out_dir: str | os.PathLike,
                      lora_path: str | os.PathLike | None = None, lora_alpha: float = 16.0,
                      lora_dropout: float = 0.05, dtype: Any = None, config: LLaMAConfig | None = None,
                      overwrite: bool = False, progress: bool = True, workers: int = 2,
                      max_bytes_ahead: int = READ_AHEAD_BYTES) -> tuple[LLaMAConfig, LoRAConfig | None, dict[str, float]]:
    """lit-llama `lit-llama.pth` (+ `lit-llama-lora-finetuned.pth`) -> jaxlora checkpoint directory.

    The preset is recognised from the weights unless `config` is given. The LoRA file holds
    q, v adapters (the only ones it can mean); r comes from it, alpha (not stored by lit-llama)
    from `lora_alpha`.
    dtype: storage dtype of the frozen weights (None: keep the file's); adapters keep theirs.
    Memory: the engine reads, transforms and writes on `workers` threads with at most
    `max_bytes_ahead` of results waiting; wte and lm_head move in blocks of our chunks (<= 64 MB),
    so the peak stays near a few single-layer tensors.
    Returns (config, lora_config, stats) with stats = pieces, bytes read, seconds, GB/s.
    """
    out_dir = check_new_output(out_dir, overwrite)
    cast = parse_dtype(dtype)
    with contextlib.ExitStack() as stack:
        config, lora_config, base, lora = _open_lit_sources(checkpoint_path, lora_path, lora_alpha, lora_dropout,
                                                            config, stack)
        sources = [(cio.PARAMS_DIR, base, cast)] + ([(cio.LORA_DIR, lora, None)] if lora is not None else [])
        meter = Progress("from_lit_llama", sum(r.nbytes(c) for _, r, c in sources), progress)
        with cio.staged_directory(out_dir, overwrite) as tmp:
            cio.write_config(tmp, config, lora_config)
            for item, reader, item_cast in sources:
                import_tree(tmp / item, reader, item_cast, meter, workers, max_bytes_ahead)
    return config, lora_config, meter.stats()
# ---------------------------------------------------------------------------------------------
# jaxlora -> lit-llama


def check_same_model(config: LLaMAConfig, adapter_config: LLaMAConfig, adapters: Path, base: Any,
                     what: str = "model") -> None:
    """CheckpointError naming each field when adapters were trained on another model than `base`."""
    if adapter_config != config:
        diffs = "; ".join(f"{k}: adapters {v}, base {getattr(config, k)}"
                          for k, v in adapter_config.to_dict().items() if getattr(config, k) != v)
        raise CheckpointError(f"{adapters}: adapters for another {what} than {base} ({diffs})")


def open_checked(directory: Path, item: str, expected: Mapping) -> cio.ArrayTreeReader:
    """The array tree `item` of a checkpoint directory, its shapes checked against `expected`."""
    where = directory / item
    if not where.is_dir():
        if item == cio.PARAMS_DIR and cio.is_adapters_dir(directory):
            raise CheckpointError(f"{directory}: an adapters-only directory (config.json and lora/, no params/); "
                                  "pass the base model's jaxlora checkpoint as --checkpoint_dir and this "
                                  "directory as --adapters")
        raise CheckpointError(f"{directory}: no {item}/ directory (incomplete checkpoint)")
    reader = cio.ArrayTreeReader(where)
    cio.check_shapes({p: s for p, (s, _) in reader.shapes().items()}, expected, str(where))
    return reader


def open_params(directory: Path, config: LLaMAConfig) -> Any:
    """A checkpoint's frozen weights as float leaves, checked against its config: its params/, or
    a quantized checkpoint's read dequantized (`jaxlora.weights.quantized.DequantizedReader`)."""
    quantized = cio.read_quantized(directory)
    expected = cio.expected_variables(config, None, quantized and quantized["mode"])[cio.PARAMS_DIR]
    reader = open_checked(directory, cio.PARAMS_DIR, expected)
    return reader if quantized is None else DequantizedReader(reader, quantized, config)


def merged_view(params: Any, base: Path, lora: Any, lora_config: LoRAConfig, lora_home: Path, merge_into: str,
                log: Callable[[str], None] | None) -> MergedView:
    """The base's weights with the adapters folded in, into the kernels `merge_plan` says."""
    base_quantized = None if base.is_file() else cio.read_quantized(base)
    base_kernels, note = merge_plan(base, base_quantized, lora_home, cio.read_quantized(lora_home), merge_into)
    if note and log is not None:
        log(note)
    return MergedView(params, lora, lora_config, base_kernels)


def _warn_lit_fixed(config: LLaMAConfig, source: Any) -> None:
    lit = LLaMAConfig()  # lit-llama's model fixes these two
    for name, what in (("norm_eps", "RMSNorm epsilon"), ("rope_base", "RoPE base")):
        if getattr(config, name) != getattr(lit, name):
            warnings.warn(f"{source}: {what} {getattr(config, name):g}; lit-llama's model always uses "
                          f"{getattr(lit, name):g}, so it will compute this model differently", stacklevel=3)


def _lit_export_sources(checkpoint_dir: Any, kind: str, adapters_dir: Any
                        ) -> tuple[LLaMAConfig, LoRAConfig | None, Any, Path]:
    """(config, lora_config, a lit-llama base .pth or None, where the adapters are)."""
    if checkpoint_dir is None and (adapters_dir is None or kind != "lora"):
        raise ValueError(f"kind {kind!r} needs the base checkpoint directory")
    lit_base, lora_config = None, None
    if checkpoint_dir is not None and Path(checkpoint_dir).is_file() and not zipfile.is_zipfile(checkpoint_dir):
        raise CheckpointError(f"{checkpoint_dir}: a file that is not a PyTorch .pth (torch zip); expected a "
                              "jaxlora checkpoint directory (config.json, params/) or, for --merged with "
                              "--adapters, lit-llama's base lit-llama.pth")
    if checkpoint_dir is not None and Path(checkpoint_dir).is_file():  # lit-llama's own base .pth
        with TorchZipReader(checkpoint_dir) as reader:
            if kind != "merged" or adapters_dir is None:
                raise ValueError(f"{checkpoint_dir}: a lit-llama .pth serves as the base only for a merged export "
                                 "with --adapters; convert it first for anything else (convert/from_lit_llama.py)")
            config = lit_llama.infer_config(reader.shapes(), str(checkpoint_dir))
        lit_base = Path(checkpoint_dir)
    else:
        config, lora_config = cio.read_config(Path(checkpoint_dir if checkpoint_dir is not None else adapters_dir))
    lora_home = Path(checkpoint_dir if adapters_dir is None else adapters_dir).absolute()
    if adapters_dir is not None:
        adapter_config, lora_config = cio.read_config(lora_home)
        check_same_model(config, adapter_config, lora_home, Path(checkpoint_dir or adapters_dir).absolute())
    return config, lora_config, lit_base, lora_home


def _lit_readers(kind: str, config: LLaMAConfig, lora_config: LoRAConfig | None, lit_base: Path | None,
                 checkpoint_dir: Any, lora_home: Path, stack: contextlib.ExitStack, merge_into: str = "trained",
                 log: Callable[[str], None] | None = None) -> MergedView:
    has_lora = cio.has_adapters(lora_config)
    if kind == "lora":
        if not has_lora:
            raise CheckpointError(f"{lora_home}: has no adapters (config.json 'lora' is null); nothing to export "
                                  "as a LoRA file (use --base for the weights)")
        lit_llama.check_lit_lora_targets(lora_config)
    if kind == "merged" and not has_lora:
        raise CheckpointError(f"{lora_home}: has no adapters to merge; use --base")
    expected = cio.expected_variables(config, lora_config if has_lora else None)
    lora = open_checked(lora_home, cio.LORA_DIR, expected[cio.LORA_DIR]) if kind != "base" else None
    if kind == "lora":
        return MergedView(lora)
    if lit_base is not None:
        params = stack.enter_context(open_lit_base(lit_base, config)[1])
    else:
        params = open_params(Path(checkpoint_dir).absolute(), config)
    if kind != "merged":
        return MergedView(params)
    return merged_view(params, Path(checkpoint_dir).absolute(), lora, lora_config, lora_home, merge_into, log)


def _torch_zip_items(tensors: Iterator[tuple[Entry, np.ndarray]], entries: Sequence[Entry],
                     dtypes: Mapping[str, np.dtype], meter: Progress) -> Iterator[tuple[str, Any]]:
    """The torch zip sink's input: (key, array), or (key, RowBlocks) for a tensor moved in blocks."""
    counts = collections.Counter(e.key for e in entries)
    seen = set()
    for e in entries:
        if e.key in seen:
            continue
        seen.add(e.key)
        if e.rows is None:
            _, value = next(tensors)
            meter.update(e.label, value.nbytes)
            yield e.key, value
            continue

        def blocks(count: int = counts[e.key]) -> Iterator[np.ndarray]:
            for _ in range(count):
                part, value = next(tensors)
                meter.update(part.label, value.nbytes)
                yield value
        yield e.key, RowBlocks(e.map.lit_shape, dtypes[e.key], blocks())


def checkpoint_to_lit(checkpoint_dir: str | os.PathLike | None, out: str | os.PathLike, kind: str = "lora",
                      dtype: Any = None, overwrite: bool = False, progress: bool = True,
                      workers: int = 2, max_bytes_ahead: int = READ_AHEAD_BYTES,
                      adapters_dir: str | os.PathLike | None = None, merge_into: str = "trained",
                      log: Callable[[str], None] | None = None) -> dict[str, float]:
    """A jaxlora checkpoint -> one lit-llama .pth file, tensor by tensor, atomically.

    kind: "lora" (lit-llama's LoRA file: targets exactly q, v, else LitLoRATargetsError),
    "base" (the frozen weights as `lit-llama.pth`), "merged" (base with every adapter folded in,
    as lit-llama's convert_lora_weights.py; any targets). dtype: output dtype (None keeps the
    stored one). adapters_dir: take the adapters from this adapters-only directory (what
    train.py writes) instead of checkpoint_dir's lora/; checkpoint_dir may then be None for
    kind "lora", or lit-llama's own base .pth for kind "merged". merge_into: "trained" folds
    adapters trained on a quantized base into the kernels they were trained against,
    "original" into the float weights (`jaxlora.weights.quantized.merge_plan`; log(line) says
    which). A quantized checkpoint is written dequantized. Returns stats (pieces, bytes
    written, seconds, GB/s).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    out = check_new_output(out, overwrite)
    cast = parse_dtype(dtype)
    if checkpoint_dir is not None and not Path(checkpoint_dir).exists():
        raise FileNotFoundError(f"{checkpoint_dir}: no such checkpoint directory or lit-llama .pth")
    config, lora_config, lit_base, lora_home = _lit_export_sources(checkpoint_dir, kind, adapters_dir)
    if kind != "lora":
        _warn_lit_fixed(config, checkpoint_dir)
    with contextlib.ExitStack() as stack:
        view = _lit_readers(kind, config, lora_config, lit_base, checkpoint_dir, lora_home, stack, merge_into, log)
        maps = lit_llama.lora_maps(config, lora_config) if kind == "lora" else lit_llama.base_maps(config)
        return export_torch_zip(view, maps, config.n_layer, lit_llama.sorted_like_lit, cast, out, "to_lit_llama",
                                progress, workers, max_bytes_ahead)


def export_torch_zip(view: MergedView, maps: Sequence[TensorMap], n_layer: int,
                     order: Callable[[dict], dict], cast: np.dtype | None, out: Path, label: str,
                     progress: bool = True, workers: int = 2, max_bytes_ahead: int = READ_AHEAD_BYTES,
                     nest: str | None = None) -> dict[str, float]:
    """Sink: the external tensors of `maps` (our leaves read through `view`, adapters folded in
    per layer) as one torch.save file `out`, in `order`, in dtype `cast` (None keeps the stored
    one), tensor by tensor (wte and lm_head in row blocks). nest: save {nest: state dict}, as
    litgpt's LoRA checkpoints do ("model"). Returns stats (pieces, bytes, seconds, GB/s)."""
    stored = view.params.shapes()
    dtypes = {key: cast or stored[m.path[1:]][1] for m in maps for key in m.keys(n_layer)}
    entries = export_entries(maps, n_layer, order, max(d.itemsize for d in dtypes.values()))
    meter = Progress(label, sum(entry_bytes(e, dtypes[e.key].itemsize) for e in entries), progress)
    tensors = external_tensors(view, entries, dtypes, workers, max_bytes_ahead)
    write_torch_zip(out, _torch_zip_items(tensors, entries, dtypes, meter), nest=nest)
    return meter.stats()


def checkpoint_view(directory: Path, adapters_dir: Any, merged: bool, merge_into: str = "trained",
                    log: Callable[[str], None] | None = None) -> tuple[MergedView, LLaMAConfig]:
    """A jaxlora checkpoint's frozen weights (a quantized one read dequantized; with the adapters
    folded in when merged: its own lora/, or `adapters_dir`'s, into the kernels `merge_into`
    names) and its config, shapes checked."""
    if directory.is_file():
        raise CheckpointError(f"{directory}: a file, not a jaxlora checkpoint directory (config.json, params/)")
    config, lora_config = cio.read_config(directory)
    lora_home = directory
    if adapters_dir is not None:
        lora_home = Path(adapters_dir).absolute()
        adapter_config, lora_config = cio.read_config(lora_home)
        check_same_model(config, adapter_config, lora_home, directory)
    if merged and not cio.has_adapters(lora_config):
        raise CheckpointError(f"{lora_home}: has no adapters to merge (config.json 'lora' is null)")
    expected = cio.expected_variables(config, lora_config if merged else None)
    params = open_params(directory, config)
    if not merged:
        return MergedView(params), config
    lora = open_checked(lora_home, cio.LORA_DIR, expected[cio.LORA_DIR])
    return merged_view(params, directory, lora, lora_config, lora_home, merge_into, log), config
