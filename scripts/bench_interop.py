"""Figures for docs/interop.md: load time and peak RSS of the two loading routes, bytes of a merged export vs a
weak-column delta vs a LoRA r=8 peft adapter, and the time of an in-place delta swap.

    python scripts/bench_interop.py --packed outputs/quantized/smollm2-135m-owq-w4-t4.01 \
        [--delta run/delta-last.safetensors --merged run/export-last] [--repeats 3] [--out bench_interop.json]

Each load runs in a fresh Python process. Its peak RSS is ru_maxrss after the load minus the RSS after the
imports, i.e. what loading the model cost.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROUTES = {
    "wct.load_quantized": "model, _ = wct.load_quantized(FOLDER)",
    "from_pretrained": "model = AutoModelForCausalLM.from_pretrained(FOLDER, dtype=torch.float32)",
}

PROBE = """
import json, resource, time, torch, wct
from transformers import AutoModelForCausalLM
def rss_mb():
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) for l in f if l.startswith('VmRSS')) / 1024
FOLDER = {folder!r}
base = rss_mb()
start = time.perf_counter()
{load}
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"seconds": seconds, "peak_rss_mb": peak - base, "rss_after_mb": rss_mb() - base}}))
"""


def load_route(folder: Path, load: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE.format(folder=str(folder), load=load)], capture_output=True,
                         text=True, check=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def dir_bytes(folder: Path, pattern: str = "*.safetensors") -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern))


def lora_adapter_bytes(folder: Path, r: int) -> int:
    """Bytes of the peft adapter a (Q)LoRA r run on this model exports (all linears, as method=qlora): the same
    tensors whatever the base's precision, so it is measured on the dequantized FP base of the folder's config."""
    from wct.baselines.lora import prepare_lora_model
    from wct.models import load_model

    model, _ = load_model("smollm2-135m")
    peft_model = prepare_lora_model(model, "lora", r=r, alpha=16, dropout=0.1, target_modules="all-linear")
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)
        return dir_bytes(Path(tmp), "adapter_model.*")


def swap_seconds(packed: Path, deltas: list[Path], repeats: int) -> list[float]:
    import time

    import wct

    model, _ = wct.load_quantized(packed)
    times = []
    for _ in range(repeats):
        for d in deltas:
            start = time.perf_counter()
            wct.apply_delta(model, d)
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packed", type=Path, required=True, help="owq-pack v1 folder (the base)")
    ap.add_argument("--delta", type=Path, help="a delta of --packed (format=delta export)")
    ap.add_argument("--merged", type=Path, help="the merged export of the same run")
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench_interop.json"))
    args = ap.parse_args()

    report: dict = {"loadavg": os.getloadavg(), "packed": str(args.packed), "loads": {}}
    for name, load in ROUTES.items():
        runs = [load_route(args.packed, load) for _ in range(args.repeats)]
        report["loads"][name] = {"seconds_min": min(r["seconds"] for r in runs),
                                 "peak_rss_mb_max": max(r["peak_rss_mb"] for r in runs),
                                 "rss_after_mb": runs[-1]["rss_after_mb"]}
    report["bytes"] = {"packed_base": dir_bytes(args.packed), f"lora_r{args.lora_r}_adapter":
                       lora_adapter_bytes(args.packed, args.lora_r)}
    if args.merged:
        report["bytes"]["merged_export"] = dir_bytes(args.merged)
    if args.delta:
        report["bytes"]["delta"] = args.delta.stat().st_size
        report["delta_swap_seconds"] = swap_seconds(args.packed, [args.delta], args.repeats)
    report["loadavg_after"] = os.getloadavg()
    print(f"{'route':<22}{'load s (min)':>14}{'peak RSS MB':>14}{'RSS after MB':>14}")
    for name, r in report["loads"].items():
        print(f"{name:<22}{r['seconds_min']:>14.2f}{r['peak_rss_mb_max']:>14.0f}{r['rss_after_mb']:>14.0f}")
    for name, b in report["bytes"].items():
        print(f"{name:<22}{b:>14,} bytes")
    if "delta_swap_seconds" in report:
        print(f"delta swap: {', '.join(f'{1e3 * s:.1f} ms' for s in report['delta_swap_seconds'])}")
    print(f"loadavg before {report['loadavg']}, after {report['loadavg_after']}")
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
