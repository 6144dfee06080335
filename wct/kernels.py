"""Backend dispatch for OWQLinear's product y = deq(W_q)·x + W_o·x[idx] + b.

Minimal torch reference for now (the kernels issue extends this module with the custom op, Triton and CUDA).
"""

from __future__ import annotations

import torch


class _OWQLinearFn(torch.autograd.Function):
    """Reference autograd: forward saves only x[..., idx]; backward gives dX = dY·W_full and dW_o = x_oᵀ·dY."""

    @staticmethod
    def forward(ctx, x, weak_weight, layer):
        w = layer.dequantize(x.dtype)
        ctx.layer = layer
        ctx.save_for_backward(x[..., layer.weak_idx.long()])
        y = x @ w.t()
        return y if layer.bias is None else y + layer.bias.to(y.dtype)

    @staticmethod
    def backward(ctx, dy):
        (x_o,) = ctx.saved_tensors
        layer = ctx.layer
        dy = dy.contiguous()
        dx = dy @ layer.dequantize(dy.dtype) if ctx.needs_input_grad[0] else None
        dwo = None
        if ctx.needs_input_grad[1]:
            dwo = (x_o.reshape(-1, x_o.shape[-1]).float().t() @ dy.reshape(-1, dy.shape[-1]).float())
            dwo = dwo.to(layer.weak_weight.dtype)
        return dx, dwo, None


def owq_linear(x: torch.Tensor, layer) -> torch.Tensor:
    return _OWQLinearFn.apply(x, layer.weak_weight, layer)
