"""Split-K arrival counters shared by the fused GEMV kernels (CUDA and Triton; docs/kernels.md).

The last program of a column tile is elected by an atomic ticket on its counter; it resets the counter to 0, so a
buffer stays zero between launches and CUDA-graph replays. One int32 buffer per device, grown when a launch needs
more tiles. Two launches that may overlap must not share a stream-concurrent buffer: wct runs them on one stream.
"""

from __future__ import annotations

import torch

_counters: dict[torch.device, torch.Tensor] = {}


def tile_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """A zeroed int32 buffer of at least ``tiles`` entries on ``device`` (kept and reused)."""
    c = _counters.get(device)
    if c is None or c.numel() < tiles:
        c = _counters[device] = torch.zeros(max(tiles, 256), dtype=torch.int32, device=device)
    return c
