"""Fine-tune the weak columns of an OWQ model (or a LoRA / QLoRA baseline) on instruction data.

    python -m wct.train task=alpaca                                   # smollm2-135m, owq-w4-t4.01 on the fly
    python -m wct.train task=alpaca model.quantized=outputs/quantized/smollm2-135m-owq-w3-t3.01
    python -m wct.train task=json task.data.path=my.jsonl task.data.fields.output=answer
    python -m wct.train ckpt_path=last                                 # resume the newest run of this run name
    python -m wct.train -m hparams_search=optuna                       # Optuna sweep (SQLite study, resumable)
    python -m wct.train model=hf model.name=/models/llama-70b model.estimate_only=true   # memory table, no load

Composes :func:`wct.training.run.fit` from the validated config (:func:`wct.config.to_app`). Prints the resolved
config, then (from ``fit``) the trainable parameter count, a memory estimate and the first rendered example; writes
the run folder (checkpoints/, logs, samples.csv, loss.png, config.yaml, results.json). Returns the optimized
metric to sweepers; in a sweep a failed trial returns NaN instead of ending the sweep. With
``model.estimate_only=true`` it prints the memory estimate from ``config.json`` alone
(:func:`wct.training.memory.estimate_run`) and exits without loading a weight.
"""

from __future__ import annotations

import math
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from wct.config import CONF_DIR, TrainApp, to_app
from wct.console import run_output
from wct.errors import cli_errors


def fit(cfg: DictConfig):
    """``(optimized metric, module)`` of the run ``cfg`` describes (tests call this to inspect the module);
    ``(nan, None)`` after printing the estimate when ``model.estimate_only``."""
    app = to_app(cfg, TrainApp)
    if app.model.estimate_only:
        from wct.training.memory import estimate_run

        print(estimate_run(app).table())
        return math.nan, None
    from wct.training.run import fit as fit_app

    with run_output(app.quiet):
        print(OmegaConf.to_yaml(cfg, resolve=True))
        return fit_app(app, OmegaConf.to_container(cfg, resolve=True))


@cli_errors
def run(cfg: DictConfig) -> float:
    """``python -m wct.train``: :func:`fit`, with WCTErrors printed as one message (exit code 2)."""
    return fit(cfg)[0]


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float:
    import wandb

    try:
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            return run(cfg)
        try:
            return run(cfg)
        except (Exception, SystemExit) as e:  # a failed trial must not end the sweep
            print(f"trial failed ({type(e).__name__}: {e}); returning NaN to the sweeper", file=sys.stderr)
            return math.nan
    finally:
        wandb.finish()  # multirun jobs must not log into each other's run


if __name__ == "__main__":
    main()
