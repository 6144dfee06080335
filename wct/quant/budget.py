"""Global weak-column budget (QEFT-style): the same total number of FP16 columns, ranked across all layers.

OWQ gives every layer of a type the same count (spec §1.5: ``n = round(in·r·ratio)``). ``quant.budget=global``
spends the same total instead on the columns that are most sensitive across the whole model. Sensitivities of
different layers are not on one scale (Hessians grow with depth and differ by layer type), so each layer's
sensitivity vector is divided by its mean, the normalization the QEFT code (github.com/xvyaward/qeft) applies to
H_jj before it compares layers. Columns are ranked in pairs (each layer's sorted columns taken two at a time,
scored by the pair's mean), so every layer keeps an even count, as the per-layer formula does, and the total is
exactly the per-layer allocation's.
"""

from __future__ import annotations

import torch

from wct.errors import WCTError


def global_counts(scores: dict[str, torch.Tensor], total: int) -> dict[str, int]:
    """Weak columns per layer: the ``total`` (even) columns with the highest mean-normalized sensitivity over all
    layers in ``scores`` (layer name -> sensitivity per input column), taken in pairs (module docstring). A layer
    keeps at most all but two of its columns."""
    if total % 2 or total < 0:
        raise WCTError(f"the global weak-column budget must be an even number >= 0, got {total}")
    names, pair_scores = [], []
    for name, s in scores.items():
        s = s.double()
        normalized = (s / s.mean().clamp_min(torch.finfo(torch.float64).tiny)).sort(descending=True).values
        pairs = normalized[: (normalized.numel() - 2) // 2 * 2].view(-1, 2).mean(1)
        names += [name] * pairs.numel()
        pair_scores.append(pairs)
    if total // 2 > len(names):
        raise WCTError(f"the global budget of {total} weak columns exceeds what the layers can hold; lower "
                       "quant.target_bit / target_rank")
    counts = dict.fromkeys(scores, 0)
    if total:
        for i in torch.topk(torch.cat(pair_scores), total // 2).indices.tolist():
            counts[names[i]] += 2
    return counts
