"""Helpers shared by the kernel test files: random packed layers with an independent float64 weight, the float64
forward/backward check, and the fp16x2 path's documented error bound (docs/kernels.md)."""

from __future__ import annotations

import torch

from wct.nn.owq_linear import OWQLinear
from wct.format.layout import pack_linear


N_WEAK = [0, 1, 7, 40]  # 40: all inside the first 256-wide chunk of K


TOL = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def make_layer(bits, group, n_o, dtype=torch.float32, sym=False, n=48, k=256, bias=True, device="cpu", seed=0):
    """A random packed layer and its float64 weight [N, K] built independently of the packer's dequantizer."""
    g = torch.Generator().manual_seed(seed)
    groups = 1 if group is None else k // group
    scales = (torch.rand(groups, n, generator=g) * 0.1 + 0.01).half()
    zeros = torch.full((groups, n), 2 ** (bits - 1)) if sym else torch.randint(0, 2**bits, (groups, n), generator=g)
    codes = torch.randint(0, 2**bits, (k, n), generator=g)
    idx = torch.arange(100, 140) if n_o == 40 else torch.randperm(k, generator=g)[:n_o].sort().values
    rep = k // groups
    w = ((codes - zeros.repeat_interleave(rep, 0)) * scales.double().repeat_interleave(rep, 0)).t().contiguous()
    w[:, idx] = torch.randn(n, n_o, generator=g, dtype=torch.float64).to(dtype).double()
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    packed = pack_linear(w.float(), scales, zeros, idx, bits, bias=b, weak_dtype=dtype)
    return OWQLinear.from_packed(packed, bits, k).to(device), w.to(device)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def check_fwd_bwd(layer, w64, x, dtype):
    """y, dX and dW_o of ``layer`` (through autograd) against float64."""
    x = x.detach().requires_grad_()
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64, dy64 = x.detach().double(), dy.double()
    idx = layer.weak_idx.long()
    ref = x64 @ w64.t() + (layer.bias.double() if layer.bias is not None else 0)
    assert y.dtype == x.dtype and y.shape == ref.shape
    assert rel_err(y, ref) < TOL[dtype]
    assert rel_err(x.grad, dy64 @ w64) < TOL[dtype]
    dwo = x64[..., idx].flatten(0, -2).t() @ dy64.flatten(0, -2)
    assert layer.weak_weight.grad.shape == layer.weak_weight.shape
    if idx.numel():
        assert rel_err(layer.weak_weight.grad, dwo) < TOL[dtype]
    layer.weak_weight.grad = None


U = 2.0**-11  # unit roundoff of fp16


ROWS = {4: 16, 3: 32}  # rows of K per step (one fp16x2 partial)


PRODUCTS = {4: 8, 3: 16}  # products accumulated per fp16x2 lane before the fp32 flush


def half2_bound(bits: int, w64: torch.Tensor, idx: torch.Tensor, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The documented bound (docs/kernels.md) on |y - y_float64| per output: γ_n·Σ_k |W[n,k]·x_k| over the quantized
    columns (n fp16x2 products per lane between fp32 flushes, γ_n = n·u / (1 - n·u)), 2^-20·Σ_k |W[n,k]·x_k| for the
    fp32 sums, and half an fp16 ulp of the output (2^-11·|y|)."""
    n = PRODUCTS[bits]
    gamma = n * U / (1 - n * U)
    terms = (w64.unsqueeze(0) * x.double().unsqueeze(1)).abs()  # [M, N, K]
    quantized = terms.clone()
    quantized[..., idx.long()] = 0
    return gamma * quantized.sum(-1) + 2.0**-20 * terms.sum(-1) + U * ref.abs() + 1e-30


def overflowing_x(bits: int, layer, w64: torch.Tensor, k: int, m: int = 2, big: float = 5000.0):
    """x [M, K] fp16 with |x| ≈ big on a band of quantized channels (massive activations), ~N(0, 4) elsewhere; and
    the [M, N] mask of the outputs whose fp16x2 partial overflows in some step (some lane's exact Σ t·x over the
    step exceeds 65520, which rounds to inf in fp16), from the float64 weights and the documented pair order."""
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(m, k, generator=g) * 2
    band = torch.tensor([c for c in range(32, 64) if c not in set(layer.weak_idx.tolist())])
    x[:, band] = big * torch.randn(m, band.numel(), generator=g).sign()
    x = x.half()
    rows = ROWS[bits]
    s = layer.scales.double().repeat_interleave(k // layer.scales.shape[0], 0)  # [K, N]
    t = w64.t() / s  # code - z at the quantized columns
    t[layer.weak_idx.long()] = 0
    lanes = [[r for pair in pair_rows(bits) for r in pair[:1]], [r for pair in pair_rows(bits) for r in pair[1:]]]
    over = torch.zeros(m, w64.shape[0], dtype=torch.bool)
    for k0 in range(0, k, rows):
        for lane in lanes:
            ks = [k0 + r for r in lane]
            over |= (x.double()[:, ks] @ t[ks]).abs() > 65520
    return x, over


def pair_rows(bits: int) -> list[tuple[int, int]]:
    """The rows (lane 0, lane 1) of each x pair of a step, in the order the kernel documents."""
    if bits == 4:  # two words of 8 nibbles: pairs (c, c+4)
        return [(8 * w + c, 8 * w + c + 4) for w in range(2) for c in range(4)]
    return [(p, p + 16) for p in range(16)]  # 3-bit words: lanes pair rows (p, p + 16)
