"""Benchmark: which OWQ base should ``python -m wct.train`` build on the fly? Quantization time, perplexity and the
held-out loss before and after WCT, per base recipe.

Each row is a set of Hydra overrides of the default training run (SmolLM2-135M, owq-w4-t4.01, 8 x 512 Emma
calibration windows, embedded alpaca-libre, 30 steps at the default lr). For every row the script runs the real
command, ``python -m wct.train task=alpaca <overrides>``, with a fresh base cache (so the base is quantized, and
timed, inside the run), then ``python -m wct.evaluate model.quantized=<that base>`` (40 windows of Pride and
Prejudice, docs/algorithm.md §1.10). The held-out loss is the run's fixed validation split (``val/loss``) before
the first step (the base) and after the last.

    python scripts/bench_base.py                                  # every row below
    python scripts/bench_base.py --rows default,act_order --steps 10

Prints a table and writes JSON (``--out``) with the load average before and after each row: timings taken on a
shared machine are not comparable with a quiet one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# name -> overrides of the default training run
ROWS: dict[str, list[str]] = {
    "default": [],
    "global": ["quant.budget=global"],
    "w3-t3.1": ["quant=owq-w3-t3.1"],
    "w3-t3.1-global": ["quant=owq-w3-t3.1", "quant.budget=global"],
    "act_order": ["quant.act_order=true"],
    "true_sequential": ["quant.true_sequential=true"],
    "calib32": ["calib.n_samples=32"],
    "calib128": ["calib.n_samples=128"],
}
QUANT_LINE = re.compile(r"(\S+): \d+ linears, .*?; ([\d.]+) bits \(paper label\), [\d.]+ bits stored; ([\d.]+) s")
BASE_LINE = re.compile(r"base: quantizing .* \(cached afterwards in (.+)\)")


def run(cmd: list[str], log: Path) -> tuple[str, float]:
    """Runs ``cmd`` (stdout+stderr to ``log``); ``(output, seconds)``; a failure ends the benchmark with its log."""
    start = time.time()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log.write_text(proc.stdout)
    if proc.returncode:
        sys.exit(f"error: {' '.join(cmd)} failed (exit {proc.returncode}); see {log}")
    return proc.stdout, time.time() - start


def bench_row(name: str, overrides: list[str], work: Path, steps: int) -> dict:
    """One row: train (quantizing a fresh base), then evaluate that base."""
    row_dir = work / name
    common = [f"paths.root_dir={row_dir}", f"cache_dir={row_dir / 'bases'}", "logger=csv", "++callbacks.samples=null",
              f"hydra.run.dir={row_dir / 'train'}", f"trainer.max_steps={steps}"]
    load = os.getloadavg()[0]
    out, train_s = run([sys.executable, "-m", "wct.train", "task=alpaca", *common, *overrides], row_dir / "train.log")
    quant = QUANT_LINE.search(out)
    base = BASE_LINE.search(out)
    if not (quant and base):
        sys.exit(f"error: the training log {row_dir / 'train.log'} names no freshly quantized base")
    results = json.loads((row_dir / "train" / "results.json").read_text())
    _, eval_s = run([sys.executable, "-m", "wct.evaluate", f"model.quantized={base.group(1)}",
                     f"hydra.run.dir={row_dir / 'eval'}", "progress=false"], row_dir / "eval.log")
    ppl = json.loads((row_dir / "eval" / "results.json").read_text())["ppl"]  # {corpus: perplexity}
    return {
        "row": name, "overrides": overrides, "recipe": quant.group(1), "paper_bits": float(quant.group(2)),
        "quantize_s": float(quant.group(3)), "train_run_s": round(train_s, 1), "eval_s": round(eval_s, 1),
        "ppl": ppl, "val_loss_base": results["val_loss_before"], "val_loss_after": results["metrics"]["val/loss"],
        "steps": results["steps"], "load_before": load, "load_after": os.getloadavg()[0],
    }


def ppl_value(ppl: dict[str, float]) -> float:
    """The perplexity on the (one) evaluation corpus."""
    return next(iter(ppl.values()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of: {', '.join(ROWS)}")
    p.add_argument("--steps", type=int, default=30, help="WCT optimizer steps per row")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "wct_bench_base")
    p.add_argument("--out", type=Path, default=Path("bench_base.json"))
    args = p.parse_args()
    names = args.rows.split(",")
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        sys.exit(f"error: --rows names unknown rows {unknown}; choose from {', '.join(ROWS)}")
    if args.work.exists() and any(args.work.iterdir()):
        sys.exit(f"error: --work {args.work} is not empty; name a new folder (its runs would be reused silently)")
    rows = []
    header = "| row | recipe | bits | quantize s | ppl | val/loss base | val/loss after | train run s | load |"
    for name in names:
        r = bench_row(name, ROWS[name], args.work, args.steps)
        rows.append(r)
        print(f"{name}: {r['quantize_s']:.1f} s quantization, ppl {ppl_value(r['ppl']):.3f}, val/loss "
              f"{r['val_loss_base']:.4f} -> {r['val_loss_after']:.4f}", flush=True)
        tmp = args.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"steps": args.steps, "cpus": os.cpu_count(), "rows": rows}, indent=2))
        tmp.replace(args.out)
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        print(f"| {r['row']} | {r['recipe']} | {r['paper_bits']:.3f} | {r['quantize_s']:.1f} | {ppl_value(r['ppl']):.3f} | "
              f"{r['val_loss_base']:.4f} | {r['val_loss_after']:.4f} | {r['train_run_s']:.0f} | "
              f"{r['load_before']:.1f}-{r['load_after']:.1f} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
