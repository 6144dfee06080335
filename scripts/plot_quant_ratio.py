"""Plot perplexity against the quantization ratio (fraction of linear weights kept low-precision) to a PNG.

Inputs: multirun folders of ``python -m wct.quantize -m ...`` (every ``results.json`` below them), single
``results.json`` files, or a JSON written by ``scripts/bench_quant.py``. The FP row of a benchmark (ratio 0) is
drawn as a horizontal reference line.

    python -m wct.quantize -m quant=owq-w3 quant.target_bit=3.0,3.01,3.05,3.1
    python scripts/plot_quant_ratio.py multirun/2026-11-23/10-00-00 --out ratio.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _series(row: str) -> str:
    """Series of a benchmark row: its method, plus the group size if any (owq-w3-t3.01-g64 -> owq g64)."""
    method, _, group = row.partition("-g")
    return method.split("-")[0] + (f" g{group}" if group else "")


def load_points(paths: list[str], corpus: str | None = None) -> list[dict]:
    """(label, bits, low_bit_fraction, ppl) records from run results or benchmark JSONs."""
    files = []
    for p in map(Path, paths):
        files += sorted(p.rglob("results.json")) if p.is_dir() else [p]
    points = []
    for f in files:
        data = json.loads(f.read_text())
        if "rows" in data:  # bench_quant.py
            points += [
                {"label": r["row"], "method": _series(r["row"]), "bits": int(r["paper_bits"]),
                 "ratio": r["low_bit_fraction"], "ppl": r["ppl"], "source": str(f)}
                for r in data["rows"]
                if "ppl" in r
            ]
        elif data.get("ppl"):  # one wct.quantize run; a multirun's runs form one series
            ppl = data["ppl"][corpus] if corpus else next(iter(data["ppl"].values()))
            q = data["quant"]
            points.append({"label": q["name"], "method": q["method"], "bits": q["bits"],
                           "ratio": data["low_bit_fraction"], "ppl": ppl, "source": str(f.parent.parent)})
    if not points:
        raise SystemExit(f"no perplexity results found in {paths}")
    return points


def plot(points: list[dict], out: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in (p for p in points if p["ratio"] == 0):
        ax.axhline(p["ppl"], color="gray", ls="--", lw=1, label=f"{p['label']} ({p['ppl']:.2f})")
    series = sorted({(p["source"], p["method"], p["bits"]) for p in points if p["ratio"] > 0})
    for source, method, bits in series:
        pts = [p for p in points if (p["source"], p["method"], p["bits"]) == (source, method, bits) and p["ratio"] > 0]
        pts.sort(key=lambda p: p["ratio"])
        style = {"owq": "o-", "gptq": "s", "rtn": "x"}.get(method.split()[0], "d")
        ax.plot([p["ratio"] * 100 for p in pts], [p["ppl"] for p in pts], style, label=f"{method} {bits}-bit"
                + (f" ({Path(source).name})" if len(series) > 1 and len({s for s, _, _ in series}) > 1 else ""))
        for p in pts:
            ax.annotate(p["label"], (p["ratio"] * 100, p["ppl"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ppls = [p["ppl"] for p in points]
    if max(ppls) > 5 * min(ppls):
        ax.set_yscale("log")
    ax.set_xlabel("weights kept low-precision (%)")
    ax.set_ylabel("perplexity")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("inputs", nargs="+", help="multirun folders, results.json files or bench JSONs")
    ap.add_argument("--corpus", default=None, help="which corpus of a run's ppl (default: the first)")
    ap.add_argument("--out", default="quant_ratio.png")
    ap.add_argument("--title", default="Perplexity vs quantization ratio")
    args = ap.parse_args()
    points = load_points(args.inputs, args.corpus)
    for p in sorted(points, key=lambda p: (p["bits"], p["ratio"])):
        print(f"{p['label']:<24} {p['ratio'] * 100:8.3f} %  ppl {p['ppl']:.4f}")
    plot(points, args.out, args.title)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
