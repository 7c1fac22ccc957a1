"""Scaling chart: training tokens/s against the number of GPUs, with linear scaling for
reference, from bench/scale_out.sh's JSON lines (one series per preset and card).

  python bench/plot_scaling.py docs/bench_logs/scale_h100x4_small.jsonl [MORE ...] --out docs/scaling.png
"""
from __future__ import annotations

import argparse
from collections import defaultdict

from plot_throughput import read_rows  # the same bench JSON lines (run as bench/plot_scaling.py)


def plot(rows: list[dict], out: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[int, dict]] = defaultdict(dict)
    for r in rows:
        series[f"{r['preset']} on {r['device'].replace('NVIDIA ', '')}"][r["devices"]] = r
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, by_n in sorted(series.items()):
        ns = sorted(by_n)
        line, = ax.plot(ns, [by_n[n]["tokens_per_s"] for n in ns], marker="o", label=name)
        if 1 in by_n and len(ns) > 1:
            ax.plot(ns, [by_n[1]["tokens_per_s"] * n for n in ns], ls=":", color=line.get_color(), alpha=0.6,
                    label=f"{name}: linear")
        for n in ns:
            r = by_n[n]
            mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "1 GPU"
            ax.annotate(f"{r['tokens_per_s']:,.0f}\n{mesh}, MFU {r['mfu']:.0%}", (n, r["tokens_per_s"]),
                        textcoords="offset points", xytext=(4, -22), fontsize=7)
    ax.set_xlabel("GPUs (one host)")
    ax.set_ylabel("training tokens/s")
    ax.set_xticks(sorted({n for by_n in series.values() for n in by_n}))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("logs", nargs="+")
    ap.add_argument("--out", default="docs/scaling.png")
    ap.add_argument("--title", default="LoRA r=8 training, lit-llama recipe, 4 x 256 tokens per GPU")
    args = ap.parse_args()
    plot(read_rows(args.logs), args.out, args.title)
    print(args.out)


if __name__ == "__main__":
    main()
