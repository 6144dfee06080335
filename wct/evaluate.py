"""Perplexity of a model, FP or OWQ, on one or more corpora (owq-spec §1.10, offline.md §4).

    python -m wct.evaluate model=smollm2-135m eval=janeausten
    python -m wct.evaluate model.quantized=outputs/quantized/smollm2-135m-owq-w3-t3.01 eval.corpora=[wikitext2]

Prints a perplexity table and writes ``results.json`` into the Hydra run folder.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from wct.config import CONF_DIR, EvaluateApp, check_keys
from wct.data.text import eval_tokens
from wct.errors import WCTError, cli_errors
from wct.io import atomic_file


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, seqlen: int, progress: bool = True, desc: str = "ppl") -> float:
    """exp(mean token NLL) over the non-overlapping ``seqlen`` windows of ``tokens`` [T] (spec §1.10).

    Each window is scored on its own (no carried-over context): NLL of tokens 1..seqlen-1 given their prefix.
    All windows have the same length, so the mean of per-window means is the mean over all predicted tokens.
    """
    n = tokens.numel() // seqlen
    if n < 1:
        raise WCTError(f"{tokens.numel()} tokens are fewer than one window of seqlen={seqlen}; use a longer text")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0
    for i in tqdm(range(n), desc=desc, unit="window", disable=not progress):
        x = tokens[i * seqlen : (i + 1) * seqlen].to(device).unsqueeze(0)
        logits = model(x, use_cache=False).logits[0, :-1].float()
        total += F.cross_entropy(logits, x[0, 1:], reduction="mean").item()
    model.train(was_training)
    return math.exp(total / n)


def corpus_label(source: str) -> str:
    """Short name of a corpus: the name itself, or a local file's stem / folder's name."""
    return Path(source).stem if os.sep in source or Path(source).exists() else source


def load_eval_sets(tokenizer, corpora: list[str], seqlen: int, max_windows: int | None) -> dict[str, torch.Tensor]:
    """Evaluation tokens per corpus label, all read before any long work so a missing corpus fails at once."""
    return {corpus_label(c): eval_tokens(tokenizer, c, seqlen, max_windows) for c in corpora}


def evaluate_all(model, sets: dict[str, torch.Tensor], seqlen: int, progress: bool = True) -> dict[str, float]:
    return {name: perplexity(model, toks, seqlen, progress, desc=f"ppl {name}") for name, toks in sets.items()}


def ppl_table(rows: dict[str, dict[str, float]], sets: dict[str, torch.Tensor] | None = None) -> str:
    """A plain-text table: one row per model, one perplexity column per corpus."""
    corpora = list(next(iter(rows.values())))
    head = f"{'model':<40}" + "".join(f"{c:>16}" for c in corpora)
    lines = [head, "-" * len(head)]
    lines += [f"{name:<40}" + "".join(f"{p[c]:>16.4f}" for c in corpora) for name, p in rows.items()]
    if sets:
        lines.append("eval tokens: " + ", ".join(f"{c}={t.numel()}" for c, t in sets.items()))
    return "\n".join(lines)


def write_results(results: dict, run_dir: str | os.PathLike) -> Path:
    path = Path(run_dir) / "results.json"
    with atomic_file(path, "w") as fh:
        json.dump(results, fh, indent=2)
    return path


def load_from_config(cfg: DictConfig):
    """(model, tokenizer, label) of the ``model`` group: a quantized folder if set, else the base model."""
    from wct.models import load_model

    if cfg.model.quantized:
        from wct.quant.checkpoint import load_quantized

        model, tok = load_quantized(cfg.model.quantized, dtype=cfg.model.dtype)
        return model, tok, Path(cfg.model.quantized).name
    model, tok = load_model(cfg.model.name, dtype=cfg.model.dtype)
    return model, tok, Path(cfg.model.name).name


@cli_errors
def run(cfg: DictConfig) -> dict:
    print(OmegaConf.to_yaml(cfg, resolve=True))
    check_keys(cfg, EvaluateApp)
    if not cfg.eval.corpora:
        raise WCTError("eval.corpora is empty; name at least one corpus, e.g. eval.corpora=[wikitext2]")
    start = time.time()
    model, tok, label = load_from_config(cfg)
    sets = load_eval_sets(tok, list(cfg.eval.corpora), cfg.eval.seqlen, cfg.eval.max_windows)
    ppl = evaluate_all(model, sets, cfg.eval.seqlen, cfg.progress)
    print(ppl_table({label: ppl}, sets))
    results = {
        "model": label,
        "ppl": ppl,
        "tokens": {c: t.numel() for c, t in sets.items()},
        "seqlen": cfg.eval.seqlen,
        "quantization_config": getattr(model.config, "quantization_config", None),
        "seconds": time.time() - start,
    }
    print(f"results: {write_results(results, cfg.paths.run_dir)}")
    return results


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> float:
    return next(iter(run(cfg)["ppl"].values()))


if __name__ == "__main__":
    main()
