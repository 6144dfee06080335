"""Perplexity of a model, FP or OWQ, on one or more corpora (docs/algorithm.md §1.10)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from wct.data.text import eval_tokens
from wct.errors import WCTError
from wct.nn.modes import eval_mode


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, seqlen: int, progress: bool = True, desc: str = "ppl",
               bos: bool = False) -> float:
    """exp(mean token NLL) over the non-overlapping ``seqlen`` windows of ``tokens`` [T].

    Each window is scored on its own (no carried-over context): NLL of tokens 1..seqlen-1 given their prefix.
    ``bos``: each window is BOS + text (:func:`wct.data.text.eval_tokens` with ``bos``); the first text token,
    predicted from BOS alone, is not scored either, so tokens 2..seqlen-1 are: every scored token has at least one
    text token of context, as without BOS. All windows have the same length, so the mean of per-window means is
    the mean over all predicted tokens.
    """
    n = tokens.numel() // seqlen
    if n < 1:
        raise WCTError(f"{tokens.numel()} tokens are fewer than one window of seqlen={seqlen}; use a longer text")
    first = 1 if bos else 0  # logits at positions first..seqlen-2 predict tokens first+1..seqlen-1
    device = next(model.parameters()).device
    total = 0.0
    with eval_mode(model):
        for i in tqdm(range(n), desc=desc, unit="window", disable=not progress):
            x = tokens[i * seqlen : (i + 1) * seqlen].to(device).unsqueeze(0)
            logits = model(x, use_cache=False).logits[0, first:-1].float()
            total += F.cross_entropy(logits, x[0, first + 1 :], reduction="mean").item()
    return math.exp(total / n)


def corpus_label(source: str) -> str:
    """Short name of a corpus: the name itself, or a local file's stem / folder's name."""
    return Path(source).stem if os.sep in source or Path(source).exists() else source


def load_eval_sets(tokenizer, corpora: list[str], seqlen: int, max_windows: int | None,
                   bos: bool = False) -> dict[str, torch.Tensor]:
    """Evaluation tokens per corpus label, all read before any long work so a missing corpus fails at once
    (``bos``: as :func:`wct.data.text.eval_tokens`'s)."""
    return {corpus_label(c): eval_tokens(tokenizer, c, seqlen, max_windows, bos) for c in corpora}


def evaluate_all(model, sets: dict[str, torch.Tensor], seqlen: int, progress: bool = True,
                 bos: bool = False) -> dict[str, float]:
    """Perplexity of ``model`` on each set of :func:`load_eval_sets` (made with the same ``bos``)."""
    return {name: perplexity(model, toks, seqlen, progress, f"ppl {name}", bos) for name, toks in sets.items()}


def ppl_table(rows: dict[str, dict[str, float]], sets: dict[str, torch.Tensor] | None = None) -> str:
    """A plain-text table: one row per model, one perplexity column per corpus."""
    corpora = list(next(iter(rows.values())))
    head = f"{'model':<40}" + "".join(f"{c:>16}" for c in corpora)
    lines = [head, "-" * len(head)]
    lines += [f"{name:<40}" + "".join(f"{p[c]:>16.4f}" for c in corpora) for name, p in rows.items()]
    if sets:
        lines.append("eval tokens: " + ", ".join(f"{c}={t.numel()}" for c, t in sets.items()))
    return "\n".join(lines)
