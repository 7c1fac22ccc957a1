"""Peak memory and throughput of the streaming lit-llama converters, on a synthetic checkpoint.

Writes a lit-llama-format checkpoint of real LLaMA shapes (default: 7B widths, 8 layers,
float32: 7.5 GB) to --workdir, then runs, each in a fresh process whose peak RSS is taken
from wait4():

  1. `python -c 'import ...'`: the interpreter + jax/orbax/tensorstore import baseline;
  2. convert/from_lit_llama.py  (lit-llama .pth -> jaxlora checkpoint directory);
  3. convert/to_lit_llama.py --base  (jaxlora checkpoint -> lit-llama .pth);

and prints one JSON line per run plus a summary line. Throughput is tensor bytes / wall time.
With `--cold`, the source file is dropped from the page cache first (posix_fadvise), so the
read comes from disk.

    python bench/convert_memory.py [--preset 7B] [--n_layer 8] [--dtype float32] [--workdir /tmp]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from jaxlora.config import LLaMAConfig  # noqa: E402
from jaxlora.weights import lit_llama  # noqa: E402
from jaxlora.weights.torch_zip import write_torch_zip  # noqa: E402


def synthetic_items(config: LLaMAConfig, dtype: np.dtype, seed: int = 0) -> Iterator[tuple[str, np.ndarray]]:
    """(key, array) of a lit-llama base checkpoint, one tensor at a time; cheap pseudo-random fill."""
    rng = np.random.default_rng(seed)
    block = (0.02 * rng.standard_normal(1 << 20)).astype(dtype)
    maps = lit_llama.base_maps(config)
    keys = {k: m for m in maps for k in m.keys(config.n_layer)}
    for n, key in enumerate(lit_llama.sorted_like_lit(keys)):
        shape = keys[key].lit_shape
        size = int(np.prod(shape))
        yield key, np.resize(np.roll(block, -(n * 7919)), size).reshape(shape)  # a different phase per tensor


# Runs a script and reports its peak RSS (VmHWM) at exit. Not getrusage(RUSAGE_CHILDREN).ru_maxrss:
# Linux keeps ru_maxrss across fork+exec, so a child would inherit this (large) process's peak.
PEAK_RSS_WRAPPER = """
import atexit, runpy, sys
def _report():
    with open('/proc/self/status') as f:
        hwm = [l.split()[1] for l in f if l.startswith('VmHWM:')][0]
    sys.stderr.write('PEAK_RSS_KB ' + hwm + chr(10))
atexit.register(_report)
sys.argv = sys.argv[1:]
if sys.argv[0] == '-c':
    sys.argv = sys.argv[1:]
    exec(sys.argv[0])
else:
    runpy.run_path(sys.argv[0], run_name='__main__')
"""


def run_measured(args: list[str]) -> dict:
    """Run `python *args`; return wall seconds and the peak RSS (MiB) of that process alone."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS_WRAPPER, *args], cwd=ROOT, stderr=subprocess.PIPE,
                          text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{proc.stderr}")
    peak_kb = int(proc.stderr.rsplit("PEAK_RSS_KB ", 1)[1].split()[0])
    return {"seconds": round(seconds, 2), "peak_rss_mib": round(peak_kb / 1024, 1),
            "log_tail": proc.stderr.rsplit("PEAK_RSS_KB", 1)[0].strip()[-200:]}


def drop_from_page_cache(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="7B")
    p.add_argument("--n_layer", type=int, default=8, help="layers (fewer than the preset keeps the file small)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--workdir", default="/tmp/jaxlora_convert_bench")
    p.add_argument("--cold", action="store_true", help="evict the source file from the page cache before reading")
    p.add_argument("--keep", action="store_true", help="keep the files afterwards")
    args = p.parse_args()

    from jaxlora.weights.convert import parse_dtype
    dtype = parse_dtype(args.dtype)
    config = LLaMAConfig.from_name(args.preset, n_layer=args.n_layer)
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    src, ckpt, back = work / "lit-llama.pth", work / "jaxlora", work / "lit-llama-back.pth"
    t0 = time.perf_counter()
    write_torch_zip(src, synthetic_items(config, dtype))
    size = src.stat().st_size
    largest = max(int(np.prod(m.lit_shape)) * dtype.itemsize for m in lit_llama.base_maps(config))
    largest_stacked = max(int(np.prod(m.lit_shape)) * dtype.itemsize * (config.n_layer if m.layered else 1)
                          for m in lit_llama.base_maps(config))
    info = {"machine": f"{platform.machine()} {os.cpu_count()} cores, "
                       f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM",
            "python": platform.python_version(), "preset": args.preset, "n_layer": args.n_layer,
            "dtype": args.dtype, "file_gb": round(size / 1e9, 3),
            "largest_tensor_mib": round(largest / 2**20, 1),
            "largest_stacked_leaf_mib": round(largest_stacked / 2**20, 1),
            "write_source_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps({"setup": info}), flush=True)

    model_config = json.dumps(config.to_dict())
    results = {}
    results["import_baseline"] = run_measured(["-c", "import jaxlora.weights.convert, jaxlora.model.llama, orbax.checkpoint"])
    if args.cold:
        drop_from_page_cache(src)
    r = run_measured(["convert/from_lit_llama.py", "--checkpoint_path", str(src),
                      "--out_dir", str(ckpt), "--model_config", model_config])
    r["gb_per_s"] = round(size / 1e9 / r["seconds"], 3)
    results["from_lit_llama"] = r
    r = run_measured(["convert/to_lit_llama.py", "--checkpoint_dir", str(ckpt), "--out", str(back),
                      "--base"])
    r["gb_per_s"] = round(back.stat().st_size / 1e9 / r["seconds"], 3)
    results["to_lit_llama_base"] = r
    for name, res in results.items():
        print(json.dumps({name: res}), flush=True)

    # Spot-check the round trip: first, a middle and the last tensor, bit for bit.
    from jaxlora.weights.torch_zip import TorchZipReader
    with TorchZipReader(src) as a, TorchZipReader(back) as b:
        keys = a.keys()
        assert keys == b.keys(), "key order differs after the round trip"
        for key in (keys[0], keys[len(keys) // 2], keys[-1]):
            assert np.array_equal(a.read(key).view(np.uint8), b.read(key).view(np.uint8)), key
    summary = {"summary": {
        "file_gb": info["file_gb"], "largest_stacked_leaf_mib": info["largest_stacked_leaf_mib"],
        "baseline_rss_mib": results["import_baseline"]["peak_rss_mib"],
        "from_lit_peak_rss_mib": results["from_lit_llama"]["peak_rss_mib"],
        "from_lit_gb_per_s": results["from_lit_llama"]["gb_per_s"],
        "to_lit_peak_rss_mib": results["to_lit_llama_base"]["peak_rss_mib"],
        "to_lit_gb_per_s": results["to_lit_llama_base"]["gb_per_s"], "round_trip_bit_exact": True,
        "cold_cache": args.cold}}
    print(json.dumps(summary), flush=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
