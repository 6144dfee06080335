"""The ``torch.library`` custom ops behind OWQLinear: ``wct::owq_linear`` (forward) and ``wct::owq_linear_dx``.

Registered with fake implementations and autograd so ``torch.compile`` traces them and CUDA graphs capture them.
Autograd (docs/kernels.md): forward saves only X_o = x[..., idx] (plus references to the frozen inputs);
backward gives dX = dY·W_full through ``wct::owq_linear_dx`` on the same backend, and
dW_o = X_oᵀ·dY [n_o, N] summed over batch and tokens, accumulated in fp32, in ``weak_weight``'s dtype.
Packed tensors, indices, bias and the dense cache get no gradient.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

import wct.kernels.reference as reference


def _backend(name: str):
    """The backend module (imported on first use: the triton backend imports triton)."""
    if name == "torch":
        return reference
    if name == "cpu":
        import wct.kernels.cpu_backend as cpu_backend

        return cpu_backend
    if name == "triton":
        import wct.kernels.triton_backend as triton_backend

        return triton_backend
    if name == "cuda":
        import wct.kernels.cuda_backend as cuda_backend

        return cuda_backend
    raise ValueError(f"unknown backend {name!r}")


@torch.library.custom_op("wct::owq_linear", mutates_args=())
def owq_linear_op(
    x: Tensor,
    weak_weight: Tensor,
    planes: list[Tensor],
    scales: Tensor,
    zeros: Tensor,
    weak_idx: Tensor,
    bias: Optional[Tensor],
    dense: Optional[Tensor],
    bits: int,
    backend: str,
) -> Tensor:
    """y [..., N] = deq(W_q)·x + W_o·x[idx] + b for x [..., K]; ``dense`` (torch backend only) is the cached deq(W_q)."""
    x2 = x.reshape(-1, x.shape[-1])
    impl = reference if dense is not None else _backend(backend)
    y = impl.forward(x2, weak_weight, planes, scales, zeros, weak_idx, bias, dense, bits)
    return y.reshape(*x.shape[:-1], scales.shape[1])


@owq_linear_op.register_fake
def _(x, weak_weight, planes, scales, zeros, weak_idx, bias, dense, bits, backend):
    return x.new_empty(*x.shape[:-1], scales.shape[1])


@torch.library.custom_op("wct::owq_linear_dx", mutates_args=())
def owq_linear_dx_op(
    dy: Tensor,
    weak_weight: Tensor,
    planes: list[Tensor],
    scales: Tensor,
    zeros: Tensor,
    weak_idx: Tensor,
    dense: Optional[Tensor],
    bits: int,
    in_features: int,
    backend: str,
) -> Tensor:
    """dX [..., K] = dY·W_full for dY [..., N]."""
    dy2 = dy.reshape(-1, dy.shape[-1]).contiguous()  # a stride-0 dY (from .sum().backward()) must be materialised
    impl = reference if dense is not None else _backend(backend)
    dx = impl.grad_input(dy2, weak_weight, planes, scales, zeros, weak_idx, dense, bits, in_features)
    return dx.reshape(*dy.shape[:-1], in_features)


@owq_linear_dx_op.register_fake
def _(dy, weak_weight, planes, scales, zeros, weak_idx, dense, bits, in_features, backend):
    return dy.new_empty(*dy.shape[:-1], in_features)


def _setup_context(ctx, inputs, output) -> None:
    x, weak_weight, planes, scales, zeros, weak_idx, bias, dense, bits, backend = inputs
    ctx.bits, ctx.backend, ctx.in_features = bits, backend, x.shape[-1]
    ctx.n_planes = len(planes)
    ctx.save_for_backward(x[..., weak_idx.long()], weak_weight, scales, zeros, weak_idx, dense, *planes)


def _backward(ctx, dy):
    x_o, weak_weight, scales, zeros, weak_idx, dense, *planes = ctx.saved_tensors
    dy = dy.to(x_o.dtype)  # under autocast dY can arrive in another dtype than x; dX must match x
    dx = dwo = None
    if ctx.needs_input_grad[0]:
        dx = owq_linear_dx_op(dy, weak_weight, planes, scales, zeros, weak_idx, dense, ctx.bits, ctx.in_features, ctx.backend)
    if ctx.needs_input_grad[1]:
        dwo = (x_o.flatten(0, -2).float().t() @ dy.flatten(0, -2).float()).to(weak_weight.dtype)
    return dx, dwo, [None] * ctx.n_planes, None, None, None, None, None, None, None


owq_linear_op.register_autograd(_backward, setup_context=_setup_context)
