"""Sharded data parallelism of an OWQ model with FSDP2 (``torch.distributed.fsdp.fully_shard``; docs/scale.md).

OWQLinear keeps its packed planes, scales and zeros as frozen parameters, so ``fully_shard`` splits them along
their first dimension across the ranks like any weight (a 4-bit 70B base, ~35 GB packed, needs ~35/N GB per rank)
instead of replicating them as it would buffers; each decoder block is all-gathered for its forward and backward
and freed again. Integer tensors are never cast by a mixed-precision policy (FSDP2 casts floating parameters only)
and :func:`shard_model` sets no ``param_dtype``, so the fp16 scales stay fp16; the compute dtype comes from
autocast (Lightning's ``bf16-mixed``). The weak columns are the only parameters that require a gradient: their
gradients are reduce-scattered and averaged over the ranks, their optimizer state is sharded with them.

:class:`ShardedStrategy` is Lightning's FSDP2 strategy with single-file checkpoints (gathered to rank 0: the weak
columns and their optimizer state) that resume in the order the other strategies follow: read, checked by
``TuneModule.on_load_checkpoint``, then set into the sharded model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from wct.nn import OWQLinear
from wct.quant.blocks import find_blocks
from wct.training.resume import load_checkpoint


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


class ShardedStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` (FSDP2, data parallel only) saving one gathered checkpoint file and resuming from it
    as the other strategies do. Lightning's own ``load_checkpoint`` sets the weights and optimizer state into the
    model while it reads the file and drops the ``state_dict``, so ``TuneModule.on_load_checkpoint`` could no longer
    check which tensors the checkpoint trained; it also reads with the caller's ``weights_only``. Here the file is
    read whole by :func:`wct.training.resume.load_checkpoint` (``weights_only=True``), checked by the module, and
    only then are the weak columns and the optimizer state distributed over the ranks' shards."""

    def __init__(self, devices: int) -> None:
        super().__init__(data_parallel_size=devices, tensor_parallel_size=1, save_distributed_checkpoint=False)

    @property
    def lightning_restore_optimizer(self) -> bool:  # Lightning's parent says False: its load_checkpoint did it
        return True

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint(self.broadcast(checkpoint_path))

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # the checkpoint holds the trained tensors only (TuneModule.strict_loading is False)
        set_model_state_dict(self.model, checkpoint["state_dict"],
                             options=StateDictOptions(full_state_dict=True, strict=False))

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        from torch.distributed.fsdp import FullyShardedDataParallel, OptimStateKeyType

        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"], strict=True):
            # saved keyed by parameter index (ModelParallelStrategy.optimizer_state); set by parameter name
            state = FullyShardedDataParallel.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_NAME, self.model)
            set_optimizer_state_dict(self.model, optimizer, state, options=StateDictOptions(full_state_dict=True))
