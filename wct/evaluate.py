"""Perplexity of a model, FP or OWQ, on one or more corpora (docs/algorithm.md §1.10).

    python -m wct.evaluate model=smollm2-135m eval=janeausten
    python -m wct.evaluate model.quantized=outputs/quantized/smollm2-135m-owq-w3-t3.01 eval.corpora=[wikitext2]

Prints a perplexity table and writes ``results.json`` into the Hydra run folder.
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from wct.config import CONF_DIR, EvaluateApp, to_app
from wct.console import run_output
from wct.errors import cli_errors


@cli_errors
def run(cfg: DictConfig) -> dict:
    from wct.data.text import bos_label, resolve_bos
    from wct.evaluation.perplexity import evaluate_all, load_eval_sets, ppl_table
    from wct.io import write_json
    from wct.loading import load_for_use

    app = to_app(cfg, EvaluateApp)
    with run_output(app.quiet):
        print(OmegaConf.to_yaml(cfg, resolve=True))
        start = time.time()
        loaded = load_for_use(app.model, device=app.device)
        bos = resolve_bos(loaded.tokenizer, app.eval.bos, "eval.bos")
        sets = load_eval_sets(loaded.tokenizer, app.eval.corpora, app.eval.seqlen, app.eval.max_windows, bos)
        ppl = evaluate_all(loaded.model, sets, app.eval.seqlen, app.progress, bos)
        if ppl:
            print(ppl_table({loaded.label: ppl}, sets))
        harness = None
        if app.eval.tasks:
            from wct.evaluation.harness import lm_eval_table, run_lm_eval, summary

            out = run_lm_eval(loaded.model, loaded.tokenizer, list(app.eval.tasks), app.eval.limit,
                              app.eval.num_fewshot, app.eval.include_path, app.eval.batch_size)
            print(lm_eval_table(out))
            harness = summary(out)
        results = {
            "model": loaded.label,
            "ppl": ppl,
            "tokens": {c: t.numel() for c, t in sets.items()},
            "seqlen": app.eval.seqlen,
            "bos": {"eval": bos_label(bos)},  # eval.bos resolved for this tokenizer
            "device": str(next(loaded.model.parameters()).device),
            "quantization_config": getattr(loaded.model.config, "quantization_config", None),
            "lm_eval": harness,
            "seconds": time.time() - start,
        }
        print(f"results: {write_json(Path(app.paths.run_dir) / 'results.json', results)}")
        return results


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    return next(iter(run(cfg)["ppl"].values()), None)


if __name__ == "__main__":
    main()
