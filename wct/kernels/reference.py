"""The torch backend: unpack, dequantize, matmul, add the weak columns. The oracle for the other backends and the
CPU path.

W_dense is the dequantized dense part [N, K], exactly 0 at the weak columns: y = x·W_denseᵀ + x[:, idx]·W_o + b,
and dX = dY·W_dense with dY·W_oᵀ added at the weak columns. With ``dense`` (the cache) it is not rebuilt; without,
it is built for the call and dropped, so cached and uncached calls give the same bits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from wct.format.layout import dequantize_dense, named_codes


def dense_weight(
    planes: list[Tensor], scales: Tensor, zeros: Tensor, bits: int, in_features: int, dtype: torch.dtype
) -> Tensor:
    """deq(W_q) as a contiguous [N, K] tensor in ``dtype`` (what the dense cache holds)."""
    return dequantize_dense(named_codes(planes, bits), scales, zeros, bits, in_features, dtype)


def forward(
    x: Tensor, weak_weight: Tensor, planes: list[Tensor], scales: Tensor, zeros: Tensor, weak_idx: Tensor,
    bias: Tensor | None, dense: Tensor | None, bits: int,
) -> Tensor:
    """y [M, N] for x [M, K]; without a cached ``dense`` it is built for this call, so the result is the same bits
    with and without the cache."""
    if dense is None:
        dense = dense_weight(planes, scales, zeros, bits, x.shape[1], x.dtype)
    return add_weak(x @ dense.t(), x, weak_weight, weak_idx, bias)


def add_weak(y: Tensor, x: Tensor, weak_weight: Tensor, weak_idx: Tensor, bias: Tensor | None) -> Tensor:
    """y + x[:, idx]·W_o + b: the weak columns as their own small product (the dense part is 0 there)."""
    if weak_idx.numel():
        y = torch.addmm(y, x[:, weak_idx.long()], weak_weight.to(x.dtype))
    return y if bias is None else y + bias.to(y.dtype)


def add_weak_dx(dx: Tensor, dy: Tensor, weak_weight: Tensor, weak_idx: Tensor) -> Tensor:
    """dX += dY·W_oᵀ at the weak columns, in place."""
    if weak_idx.numel():
        dx.index_add_(1, weak_idx.long(), dy @ weak_weight.to(dy.dtype).t())
    return dx


def grad_input(
    dy: Tensor, weak_weight: Tensor, planes: list[Tensor], scales: Tensor, zeros: Tensor, weak_idx: Tensor,
    dense: Tensor | None, bits: int, in_features: int,
) -> Tensor:
    """dX [M, K] = dY·W_full for dY [M, N] (the same bits with and without a cached ``dense``, as :func:`forward`)."""
    if dense is None:
        dense = dense_weight(planes, scales, zeros, bits, in_features, dy.dtype)
    return add_weak_dx(dy @ dense, dy, weak_weight, weak_idx)
