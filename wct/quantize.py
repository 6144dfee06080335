"""Quantize a causal LM with OWQ / GPTQ / RTN, save an owq-pack v1 checkpoint, report perplexity.

    python -m wct.quantize model=smollm2-135m quant=owq-w3-t3.01 calib=janeausten
    python -m wct.quantize -m quant=owq-w3 quant.target_bit=3.0,3.01,3.1      # one run folder per target

The evaluation corpora are read before quantizing, so a missing corpus fails at once. Each run writes
``results.json`` (perplexities, bits, weak columns, time, checkpoint path) into its Hydra run folder.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from wct.config import CONF_DIR, QuantizeApp, check_keys, quant_config
from wct.errors import cli_errors


def model_tag(name: str) -> str:
    """Short model name for output folders: a built-in name, a folder's name, a GGUF file's stem."""
    path = Path(name)
    return path.stem if path.suffix == ".gguf" else path.name


def weak_by_type(n_weak: dict[str, int]) -> dict[str, list[int]]:
    """Weak-column counts grouped by layer type (the last name component), in first-seen order."""
    out: dict[str, list[int]] = defaultdict(list)
    for name, n in n_weak.items():
        out[name.rsplit(".", 1)[-1]].append(n)
    return dict(out)


@cli_errors
def run(cfg: DictConfig) -> dict:
    from wct.data.text import calibration_windows
    from wct.evaluate import evaluate_all, load_eval_sets, ppl_table, write_results
    from wct.models import load_model
    from wct.quant.checkpoint import bit_summary, owq_layers, save_quantized
    from wct.quant.owq import quantize_model

    print(OmegaConf.to_yaml(cfg, resolve=True))
    check_keys(cfg, QuantizeApp)
    qcfg = quant_config(cfg.quant)
    out = Path(cfg.out or Path(cfg.paths.quantized_dir) / f"{model_tag(cfg.model.name)}-{qcfg.name}")
    start = time.time()
    model, tok = load_model(cfg.model.name, dtype=cfg.model.dtype)
    sets = load_eval_sets(tok, list(cfg.eval.corpora), cfg.eval.seqlen, cfg.eval.max_windows)
    calib = calibration_windows(tok, cfg.calib.source, cfg.calib.n_samples, cfg.calib.seqlen, cfg.calib.seed)
    report = quantize_model(model, calib, qcfg, progress=cfg.progress)
    save_quantized(model, tok, out)
    ppl = evaluate_all(model, sets, cfg.eval.seqlen, cfg.progress) if sets else {}
    weak = weak_by_type(report.n_weak)
    results = {
        "model": cfg.model.name,
        "quant": OmegaConf.to_container(cfg.quant, resolve=True) | {"name": qcfg.name},
        "ppl": ppl,
        "paper_bits": report.paper_bits,
        "stored_bits": report.stored_bits,
        "low_bit_fraction": bit_summary(owq_layers(model))["low_bit_fraction"],
        "weak_by_type": {t: sorted(set(v)) for t, v in weak.items()},
        "quantize_seconds": report.seconds,
        "seconds": time.time() - start,
        "checkpoint": str(out),
        "checkpoint_bytes": sum(f.stat().st_size for f in out.iterdir()),
        "calib": OmegaConf.to_container(cfg.calib, resolve=True),
    }
    results_file = write_results(results, cfg.paths.run_dir)
    if ppl:
        print(ppl_table({qcfg.name: ppl}, sets))
    types = ", ".join(f"{t}={'/'.join(map(str, sorted(set(v))))}" for t, v in weak.items())
    print(
        f"{qcfg.name}: weak columns per layer type {types}\n"
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
