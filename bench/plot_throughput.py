"""Bar chart of training throughput per shape: jaxlora vs the PyTorch peer, from bench logs.

  python bench/plot_throughput.py OURS_LOG PEER_LOG [MORE_LOGS ...] --out docs/throughput_h100.png
  python bench/plot_throughput.py LOGS ... --where remat=dots_no_batch --where fuse_mlp=False   # defaults only

Each log holds JSON lines as printed by bench/train_throughput.py ({"bench": "jaxlora", ...})
or by the peer ({"peer": "peft", ...}); other lines are ignored. Ours are labelled by
their layer layout (per-layer / scanned); bars are annotated with tokens/s and, for ours, MFU.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_rows(paths: list[str], where: dict[str, str] | None = None) -> list[dict]:
    """The rows with a throughput; `where` {key: value} keeps only rows whose key, where they
    have it, prints as value (e.g. {"fuse_mlp": "False"} leaves out a log's fused variant)."""
    rows = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                if "tokens_per_s" in row and all(str(row[k]) == v for k, v in (where or {}).items() if k in row):
                    rows.append(row)
    return rows


PEERS = {"peft": "PEFT", "peft+compile": "PEFT + torch.compile"}


def series_name(row: dict) -> str:
    """PyTorch PEFT [+ torch.compile] for peers; ours by precision of the frozen products and layer layout."""
    if "peer" in row:
        return f"PyTorch {PEERS.get(row['peer'], row['peer'])}"
    precision = "fp8" if row.get("quantize") == "fp8" else "bf16"
    return f"jaxlora {precision}, " + ("scanned layers" if row.get("scan_layers", 1) else "per-layer weights")


def plot(rows: list[dict], out: str, title: str, note: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(r["batch"], r["seq"]) for r in rows}, key=lambda s: (s[0] * s[1], s[1]))
    names = sorted({series_name(r) for r in rows}, key=lambda n: (n.startswith("PyTorch"), n))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for k, name in enumerate(names):
        for j, shape in enumerate(shapes):
            match = [r for r in rows if series_name(r) == name and (r["batch"], r["seq"]) == shape]
            if not match:
                continue
            r = match[-1]
            x = j + (k - (len(names) - 1) / 2) * width
            ax.bar(x, r["tokens_per_s"], width, color=f"C{k}", label=name if j == 0 else None)
            label = f"{int(r['tokens_per_s'] + 0.5):,}" + (f"\n{r['mfu']:.0%} MFU" if "mfu" in r else "")
            ax.text(x, r["tokens_per_s"], label, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(shapes)), [f"{b} x {t}" for b, t in shapes])
    ax.set_xlabel("batch x sequence length")
    ax.set_ylabel("tokens / s (training)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper center", ncol=len(names), frameon=False)
    ax.set_ylim(0, max(r["tokens_per_s"] for r in rows) * 1.3)
    if note:
        fig.text(0.01, 0.01, note, fontsize=7, color="0.35")
    fig.tight_layout(rect=(0, 0.03 if note else 0, 1, 1))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("logs", nargs="+")
    ap.add_argument("--out", default="throughput.png")
    ap.add_argument("--title", default="LoRA fine-tuning throughput, LLaMA-7B shape, r=8 on q,v, bf16")
    ap.add_argument("--note", default="", help="a footnote (e.g. which runs shared a device call)")
    ap.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                    help="keep only rows whose KEY (where they have one) is VALUE; repeatable")
    args = ap.parse_args()
    where = dict(item.split("=", 1) for item in args.where)
    plot(read_rows(args.logs, where), args.out, args.title, args.note)
    print(args.out)


if __name__ == "__main__":
    main()
