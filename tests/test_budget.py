"""Global (QEFT-style) weak-column budget: the same total as the per-layer formula, ranked over all layers."""

from __future__ import annotations

import pytest
import torch

from wct.errors import WCTError
from wct.models import load_model
from wct.quant.budget import global_counts
from wct.checkpoint import load_quantized, owq_layers, save_quantized
from wct.quant.owq import quantize_model


def brute_force(scores: dict[str, torch.Tensor], total: int) -> dict[str, int]:
    """Reference: every (layer, pair) candidate listed in Python floats, sorted, the best total/2 taken."""
    cands = []
    for name, s in scores.items():
        vals = sorted((float(v) / (sum(map(float, s)) / len(s)) for v in s), reverse=True)
        for p in range((len(vals) - 2) // 2):
            cands.append(((vals[2 * p] + vals[2 * p + 1]) / 2, name))
    counts = dict.fromkeys(scores, 0)
    for _, name in sorted(cands, key=lambda c: -c[0])[: total // 2]:
        counts[name] += 2
    return counts


def test_global_counts_rank_normalized_sensitivity():
    g = torch.Generator().manual_seed(0)
    scores = {
        "flat": torch.rand(64, generator=g) + 1.0,  # no outliers: few columns stand out after normalization
        "spiky": torch.cat([torch.full((6,), 50.0), torch.rand(58, generator=g)]),
        "scaled": 1000 * (torch.rand(32, generator=g) + 1.0),  # large raw values, flat after normalization
    }
    counts = global_counts(scores, 12)
    assert counts == brute_force(scores, 12)
    assert sum(counts.values()) == 12 and all(n % 2 == 0 for n in counts.values())
    assert counts["spiky"] == 6  # its six outliers; the large raw values of "scaled" buy nothing by themselves
    assert global_counts(scores, 0) == dict.fromkeys(scores, 0)
    with pytest.raises(WCTError, match="must be an even number"):
        global_counts(scores, 3)
    with pytest.raises(WCTError, match="exceeds what the layers can hold"):
        global_counts(scores, 1000)


def test_quantize_with_a_global_budget(tmp_path):
    calib = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
    model, tok = load_model("tiny-llama")
    per_layer = quantize_model(model, calib, bits=4, target_rank=4, progress=False)
    model, tok = load_model("tiny-llama")
    report = quantize_model(model, calib, bits=4, target_rank=4, budget="global", progress=False)
    assert sum(report.n_weak.values()) == sum(per_layer.n_weak.values()) == 14 * 4
    assert len(set(report.n_weak.values())) > 1 and all(n % 2 == 0 for n in report.n_weak.values())
    assert {n: m.n_weak for n, m in owq_layers(model).items()} == report.n_weak
    assert "(global budget)" in report.summary() and report.cfg.name == "owq-w4-k4-global"
    reloaded, _ = load_quantized(save_quantized(model, tok, tmp_path / "q"))
    ids = calib[:1]
    assert torch.equal(reloaded(ids).logits, model(ids).logits)
