"""Quantize a causal LM with OWQ / GPTQ / RTN, save an owq-pack v1 checkpoint, report perplexity.

    python -m wct.quantize model=smollm2-135m quant=owq-w3-t3.01 calib=janeausten
    python -m wct.quantize -m quant=owq-w3 quant.target_bit=3.0,3.01,3.1      # one run folder per target

The evaluation corpora are read before quantizing, so a missing corpus fails at once. Each run writes
``results.json`` (perplexities, bits, weak columns, time, checkpoint path) into its Hydra run folder.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from wct.config import CONF_DIR, QuantizeApp, to_app
from wct.console import run_output
from wct.errors import cli_errors
from wct.io import check_output


@cli_errors
def run(cfg: DictConfig) -> dict:
    from wct.data.text import bos_label, calibration_windows, resolve_bos
    from wct.device import place
    from wct.evaluation.perplexity import evaluate_all, load_eval_sets, ppl_table
    from wct.io import write_json
    from wct.models import load_model, model_tag
    from wct.checkpoint import load_quantized, save_quantized, weak_by_type
    from wct.quant.owq import quantize_model
    from wct.quant.stream import quantize_streaming, source_folder, tokenizer_of

    app = to_app(cfg, QuantizeApp)
    with run_output(app.quiet):
        print(OmegaConf.to_yaml(cfg, resolve=True))
        device, dtype = place(app.device, app.model.dtype)  # a missing GPU fails before anything is loaded
        q = app.quant
        out = Path(app.out or Path(app.paths.quantized_dir) / f"{model_tag(app.model.name)}-{q.name}")
        check_output(out, "quantized", app.overwrite)  # before the work, not after it
        start = time.time()
        if app.stream:  # one block in memory at a time, read from the safetensors shards (docs/scale.md)
            folder = source_folder(app.model.name)
            model, tok = None, tokenizer_of(folder)
        else:
            model, tok = load_model(app.model.name, dtype=dtype)
        bos = {"calib": resolve_bos(tok, app.calib.bos, "calib.bos"),
               "eval": resolve_bos(tok, app.eval.bos, "eval.bos")}
        sets = load_eval_sets(tok, app.eval.corpora, app.eval.seqlen, app.eval.max_windows, bos["eval"])
        c = app.calib
        calib = calibration_windows(tok, c.source, c.n_samples, c.seqlen, c.seed, bos["calib"])
        described = asdict(c) | {"bos": bos_label(bos["calib"])}  # in quantization_config["calibration"]
        if app.stream:
            report = quantize_streaming(folder, out, calib, q, device=device, dtype=dtype, progress=app.progress,
                                        overwrite=app.overwrite, calibration=described)
            model, _ = load_quantized(out, dtype=dtype)
        else:
            report = quantize_model(model, calib, q, device=device, progress=app.progress, calibration=described)
            save_quantized(model, tok, out, overwrite=app.overwrite)
        ppl = evaluate_all(model.to(device), sets, app.eval.seqlen, app.progress, bos["eval"]) if sets else {}
        weak = weak_by_type(report.n_weak)
        results = {
            "model": app.model.name,
            "quant": asdict(q),
            "ppl": ppl,
            "paper_bits": report.paper_bits,
            "stored_bits": report.stored_bits,
            "low_bit_fraction": report.low_bit_fraction,
            "weak_by_type": weak,
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "quantize_seconds": report.seconds,
            "seconds": time.time() - start,
            "checkpoint": str(out),
            "checkpoint_bytes": sum(f.stat().st_size for f in out.iterdir()),
            "calib": asdict(app.calib),
            "bos": {k: bos_label(v) for k, v in bos.items()},  # calib.bos / eval.bos resolved for this tokenizer
        }
        results_file = write_json(Path(app.paths.run_dir) / "results.json", results)
        if ppl:
            print(ppl_table({q.name: ppl}, sets))
        types = ", ".join(f"{t}={'/'.join(map(str, v))}" for t, v in weak.items())
        print(
            f"{q.name}: weak columns per layer type {types}\n"
            f"bits: {report.paper_bits:.4f} (paper label), {report.stored_bits:.4f} (true stored)\n"
            f"time: quantization {report.seconds:.1f} s, total {results['seconds']:.1f} s\n"
            f"checkpoint: {out} ({results['checkpoint_bytes'] / 2**20:.1f} MiB)\nresults: {results_file}"
        )
        return results


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="quantize")
def main(cfg: DictConfig) -> float | None:
    ppl = run(cfg)["ppl"]
    return next(iter(ppl.values())) if ppl else None


if __name__ == "__main__":
    main()
