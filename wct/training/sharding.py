"""Sharded data parallelism of an OWQ model with FSDP2 (``torch.distributed.fsdp.fully_shard``; docs/scale.md).

OWQLinear keeps its packed planes, scales and zeros as frozen parameters, so ``fully_shard`` splits them along
their first dimension across the ranks like any weight (a 4-bit 70B base, ~35 GB packed, needs ~35/N GB per rank)
instead of replicating them as it would buffers; each decoder block is all-gathered for its forward and backward
and freed again. Integer tensors are never cast by a mixed-precision policy (FSDP2 casts floating parameters only)
and :func:`shard_model` sets no ``param_dtype``, so the fp16 scales stay fp16; the compute dtype comes from
autocast (Lightning's ``bf16-mixed``). The weak columns are the only parameters that require a gradient: their
gradients are reduce-scattered and averaged over the ranks, their optimizer state is sharded with them.
"""

from __future__ import annotations

import torch
from torch import nn

from wct.nn import OWQLinear
from wct.quant.blocks import find_blocks


def shard_model(model: nn.Module, mesh=None) -> nn.Module:
    """``fully_shard`` every decoder block of ``model``, then the rest (embeddings, norm, head) at the root, over
    ``mesh`` (None: the default process group's world); in place, returns ``model``.

    Parameters split along their first dimension, except scales and zeros with fewer rows than ranks (per-row
    quantization: one row), which split along the output channels instead, so every rank holds its share."""
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import Shard

    ranks = mesh.size() if mesh is not None else dist.get_world_size()
    few_rows = {id(t) for m in model.modules() if isinstance(m, OWQLinear) for t in (m.scales, m.zeros)
                if t.shape[0] < ranks}

    def placement(p: nn.Parameter) -> Shard | None:
        return Shard(1) if id(p) in few_rows else None

    policy = MixedPrecisionPolicy()  # no param_dtype: parameters (the fp16 scales among them) keep their dtype
    _, blocks = find_blocks(model)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, shard_placement_fn=placement)
    fully_shard(model, mesh=mesh, mp_policy=policy, shard_placement_fn=placement)
    return model


def local_bytes(t: torch.Tensor) -> int:
    """Bytes of ``t`` this rank holds: its shard when ``t`` is a DTensor."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def packed_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the OWQ layers' packed tensors on this rank: ``planes`` (the codes) and ``scales_zeros``."""
    layers = [m for m in model.modules() if isinstance(m, OWQLinear)]
    return {"planes": sum(local_bytes(p) for m in layers for p in m.planes.values()),
            "scales_zeros": sum(local_bytes(m.scales) + local_bytes(m.zeros) for m in layers)}
