"""Benchmark: perplexity, bits, checkpoint size and quantization time of FP / RTN / GPTQ / OWQ on SmolLM2-135M.

Calibration: ``--n-samples`` random ``--seqlen``-token windows of Emma (``--seed``, default 0). Evaluation: the first
``--eval-windows`` non-overlapping windows of Pride and Prejudice (docs/algorithm.md §1.10). Each row is a recipe file of
conf/quant/; every quantized model is saved as an owq-pack checkpoint, reloaded, and evaluated from the reload.

    python scripts/bench_quant.py                                   # full: 128 x 512 calibration, 40 windows
    python scripts/bench_quant.py --n-samples 16 --eval-windows 8 --rows fp,rtn-w4,owq-w4-t4.01
    python scripts/bench_quant.py --model gemma-3-270m --rows fp,owq-w4-t4.01   # the second architecture

``--model``: any ``model.name`` (``smollm2-135m``, ``gemma-3-270m`` when its GGUF is installed, a folder or GGUF).
``--bos``: BOS in front of every calibration and evaluation window: auto (what the tokenizer does: SmolLM2 no,
Gemma yes), always, never (docs/algorithm.md §1.10).

Prints a table and writes JSON (``--out``). The load average is recorded: compare only runs under similar load.
The "reference OWQ code" column is the perplexity the authors' code (github.com/xvyaward/owq) gave on this protocol
(128 x 512 Emma windows seed 0, 40 windows of Pride and Prejudice, fp32; docs/algorithm.md §2.1); it is shown
only when the run uses that protocol.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from wct.config import CONF_DIR, quant_schema
from wct.data.text import BOS_MODES, bos_label, calibration_windows, eval_tokens, resolve_bos
from wct.errors import WCTError
from wct.evaluation.perplexity import perplexity
from wct.io import atomic_file
from wct.models import load_model
from wct.checkpoint import load_quantized, save_quantized
from wct.quant.owq import quantize_model

ROWS = "fp,rtn-w4,rtn-w3,gptq-w4,gptq-w3,owq-w4-t4.01,owq-w3-t3.01,owq-w3-t3.1,owq-w3-t3.01-g128"
# perplexity of the authors' OWQ code on the full protocol below, measured once (docs/algorithm.md §2.1)
REFERENCE_PPL = {"gptq-w3": 97.13, "owq-w3-t3.01": 40.64, "owq-w4-t4.01": 29.36}
REFERENCE_PROTOCOL = {"model": "smollm2-135m", "n_samples": 128, "seqlen": 512, "eval_windows": 40, "seed": 0,
                      "dtype": "float32"}
DATA = Path(os.environ.get("WCT_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def recipe(name: str):
    """The QuantConfig of conf/quant/<name>.yaml (validated as the CLI does)."""
    node = OmegaConf.merge(OmegaConf.structured(quant_schema()), OmegaConf.load(Path(CONF_DIR) / "quant" / f"{name}.yaml"))
    return OmegaConf.to_object(node)


def bench_row(name: str, args, calib: torch.Tensor, tokens: torch.Tensor, work: Path, bos: bool) -> dict:
    model, tok = load_model(args.model, dtype=args.dtype)
    if name == "fp":
        ppl = perplexity(model, tokens, args.seqlen, desc="ppl fp", bos=bos)
        size = 2 * sum(p.numel() for p in model.parameters())  # an fp16 checkpoint (tied weights once)
        return {"row": "fp", "ppl": ppl, "paper_bits": 16.0, "stored_bits": 16.0, "low_bit_fraction": 0.0,
                "checkpoint_bytes": size, "quantize_seconds": 0.0}
    cfg = recipe(name)
    report = quantize_model(model, calib, cfg)
    out = save_quantized(model, tok, work / name)
    reloaded, _ = load_quantized(out, dtype=args.dtype)
    ppl = perplexity(reloaded, tokens, args.seqlen, desc=f"ppl {name}", bos=bos)
    return {
        "row": name,
        "ppl": ppl,
        "paper_bits": report.paper_bits,
        "stored_bits": report.stored_bits,
        "low_bit_fraction": report.low_bit_fraction,
        "checkpoint_bytes": sum(f.stat().st_size for f in out.iterdir()),
        "quantize_seconds": report.seconds,
        "weak_by_role": report.weak_by_role,
    }


def reference_ppl(args: argparse.Namespace) -> dict[str, float]:
    """The reference figures, or none when the run's protocol is not the one they were measured on."""
    same = all(getattr(args, key) == value for key, value in REFERENCE_PROTOCOL.items()) and args.bos != "always"
    return REFERENCE_PPL if same and Path(args.calib).name == "emma.txt" else {}


def table(rows: list[dict], reference: dict[str, float]) -> str:
    head = (f"{'row':<20}{'ppl':>10}{'reference OWQ code':>20}{'paper bits':>12}{'true bits':>11}{'ckpt MiB':>10}"
            f"{'quant s':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['row']:<20}  not run: {r['error']}")
            continue
        ref = f"{reference[r['row']]:.2f}" if r["row"] in reference else "-"
        lines.append(
            f"{r['row']:<20}{r['ppl']:>10.3f}{ref:>20}{r['paper_bits']:>12.4f}{r['stored_bits']:>11.4f}"
            f"{r['checkpoint_bytes'] / 2**20:>10.1f}{r['quantize_seconds']:>9.1f}"
        )
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rows", default=ROWS, help="comma-separated: fp and conf/quant recipe names")
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--calib", default=str(DATA / "janeausten" / "emma.txt"))
    p.add_argument("--eval", default=str(DATA / "janeausten" / "prideprejudice.txt"))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--bos", default="auto", choices=BOS_MODES, help="BOS in front of every window")
    p.add_argument("--out", default="bench_quant.json")
    return p


def main() -> None:
    args = parser().parse_args()

    _, tok = load_model(args.model)
    bos = resolve_bos(tok, args.bos, "--bos")
    calib = calibration_windows(tok, args.calib, args.n_samples, args.seqlen, seed=args.seed, bos=bos)
    tokens = eval_tokens(tok, args.eval, args.seqlen, args.eval_windows, bos=bos)
    meta = {"args": vars(args), "bos": bos_label(bos), "threads": torch.get_num_threads(),
            "loadavg_start": os.getloadavg(), "torch": torch.__version__,
            "machine": platform.processor() or platform.machine()}
    print(f"calibration {tuple(calib.shape)} from {args.calib}; evaluation {tokens.numel()} tokens of {args.eval}; "
          f"BOS {meta['bos']}; threads {meta['threads']}, loadavg {meta['loadavg_start']}")
    reference = reference_ppl(args)
    if not reference:
        print("reference OWQ code column: '-' (its figures are for 128 x 512 Emma windows seed 0, 40 eval windows, fp32)")
    rows = []
    start = time.time()
    with tempfile.TemporaryDirectory() as work:
        for name in args.rows.split(","):
            try:
                rows.append(bench_row(name, args, calib, tokens, Path(work), bos))
            except WCTError as e:  # e.g. a group size that does not divide this model's widths
                rows.append({"row": name, "error": str(e)})
            print(table(rows[-1:], reference).splitlines()[-1], flush=True)
    meta.update(loadavg_end=os.getloadavg(), seconds=time.time() - start)
    print(table(rows, reference))
    with atomic_file(args.out, "w") as fh:
        json.dump({"meta": meta, "rows": rows, "reference_owq_code": reference}, fh, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
