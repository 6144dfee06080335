"""Launchers for the Triton kernels in ``kernels/owq_triton.py`` (the ``triton`` backend).

Path by rows M: M ≤ 4 the GEMV kernel ``owq_gemv`` (one row per program, fused deterministic split-K, splits
chosen per tile width so every autotuned BLOCK_N fills the SMs; fp16 activations take its fp16x2 path, inline PTX
on a GPU and the same bit operations in plain tl under the interpreter: ``half2_path``); otherwise a tensor-core GEMM with BLOCK_M 16
(M ≤ 64, split-K over K to fill the SMs) or 64 (large M), its split-K partials summed in a fixed order. Tile sizes
are autotuned on a GPU and fixed small under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor
import triton

from wct.format.layout import holds_words3
from wct.kernels.sources import load_module
from wct.kernels.workspace import tile_counters

GEMV_MAX_M = 4
BLOCK_O = 16
_K_ALIGN = 128  # split-K chunks are multiples of the largest BLOCK_K


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# (BLOCK_N, BLOCK_K, warps): the 2-D fp32 path takes BLOCK_N <= 256, the fp16x2 path (one column per thread
# element, its words in registers) BLOCK_N >= 256: 2-8 columns per thread.
_GEMV_CONFIGS = [(bn, bk, w) for bn, bk, w in [(32, 64, 2), (64, 32, 2), (64, 64, 4), (128, 32, 4), (128, 64, 4),
                                                (256, 32, 8), (64, 128, 4), (256, 64, 2), (512, 64, 4),
                                                (1024, 64, 4), (1024, 128, 8)]]
_HALF2_MIN_BLOCK_N = 256


def _gemv_prune(configs, named_args, **kwargs):
    """BLOCK_K must divide the group (grouped layers): a tile never straddles two scales; the block widths of the
    path taken (HALF2 or not)."""
    group, k, half2 = named_args["group_size"], named_args["K"], kwargs.get("HALF2", named_args.get("HALF2"))
    return [c for c in configs if (group >= k or group % c.kwargs["BLOCK_K"] == 0)
            and (c.kwargs["BLOCK_N"] >= _HALF2_MIN_BLOCK_N if half2 else c.kwargs["BLOCK_N"] <= 256)
            and (c.kwargs["BLOCK_N"] != 256 or c.num_warps == (2 if half2 else 8))]


def half2_path(x: Tensor, scales: Tensor, k: int, group: int) -> bool:
    """Whether owq_gemv takes its fp16x2 path (docs/kernels.md): fp16 activations and scales, K and the group a
    multiple of 32 (whole 16- or 32-row steps), x rows 16-byte aligned (128-bit loads of x)."""
    return (x.dtype == torch.float16 and scales.dtype == torch.float16 and k % 32 == 0 and group % 32 == 0
            and x.stride(1) == 1 and x.stride(0) % 8 == 0 and x.data_ptr() % 16 == 0)


@functools.cache
def _gemv_kernel():
    """The GEMV kernel: autotuned on a GPU (keyed on the shape, bits and group), fixed tiles under the interpreter."""
    mod = load_module("owq_triton.py", "wct_kernels_src_owq_triton")
    if interpreting():
        return mod.owq_gemv
    cfg = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=3) for bn, bk, w in _GEMV_CONFIGS]
    even = triton.heuristics({"EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0})(mod.owq_gemv)
    return triton.autotune(cfg, key=["M", "N", "K", "BITS", "group_size", "HALF2", "WORDS"],
                           prune_configs_by={"early_config_prune": _gemv_prune})(even)


def gemv_splits(m: int, n: int, k: int, block_n: int, block_k: int, device: torch.device) -> int:
    """K splits for a GEMV launch with this tile: ≥ 2 programs per SM, at least 2 tiles of K per split."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(k // (2 * block_k), (2 * sms) // (m * triton.cdiv(n, block_n))))


def gemv(x: Tensor, weak_weight: Tensor, planes: list[Tensor], scales: Tensor, zeros: Tensor, weak_idx: Tensor,
         bias: Tensor | None, bits: int, split_k: int | None = None) -> Tensor:
    """y [M, N] for x [M, K], M ≤ GEMV_MAX_M, by ``owq_gemv``; ``split_k`` forces the split count. At 3 bits the
    fp16x2 path reads the 3-bit kernel words (``planes`` = [words], :func:`wct.format.layout.kernel_words3`: the
    layout wct.kernels.dispatch holds a 3-bit layer in on this backend); from the v1 planes 3 bits take the fp32
    path."""
    m, k = x.shape
    n = scales.shape[1]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    most = split_k or max(gemv_splits(m, n, k, bn, bk, x.device) for bn, bk, _ in _GEMV_CONFIGS)
    ws = torch.empty(most if most > 1 else 0, m, n, dtype=torch.float32, device=x.device)
    counters = tile_counters(x.device, m * triton.cdiv(n, 32))
    a, b = _plane_args(planes)
    words = holds_words3(planes, bits)
    group = k // scales.shape[0] if scales.shape[0] > 1 else k
    # the fp16x2 decode is written for 4 bits and for 3 bits in the kernel words
    half2 = (bits == 4 or words) and half2_path(x, scales, k, group)
    meta = dict(BITS=bits, BLOCK_O=BLOCK_O, HAS_BIAS=bias is not None, HALF2=half2, ASM=half2 and not interpreting(),
                WORDS=words)
    if interpreting():  # fixed tiles (_fixed), so EVEN_N is known here
        meta["EVEN_N"] = n % 32 == 0

    def grid(meta):
        splits = split_k or gemv_splits(m, n, k, meta["BLOCK_N"], meta["BLOCK_K"], x.device)
        return triton.cdiv(n, meta["BLOCK_N"]), splits, m

    _gemv_kernel()[grid](
        x, a, b, scales.contiguous(), zeros.contiguous(), weak_idx.contiguous(), weak_weight.contiguous(),
        bias if bias is not None else y, ws, counters, y,
        m, n, k, weak_idx.numel(), group,
        x.stride(0), a.stride(0), b.stride(0), scales.stride(0), n,
        **_fixed(meta),
    )
    return y


@functools.cache
def _kernels():
    """(fwd, dx) jit kernels: autotuned on a GPU, plain under the interpreter (autotuning there is only slow)."""
    mod = load_module("owq_triton.py", "wct_kernels_src_owq_triton")
    if interpreting():
        return mod.owq_fwd, mod.owq_dx
    cfg = [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn, bk, w, s in [(32, 64, 4, 2), (64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 8, 3),
                             (64, 128, 4, 4), (256, 32, 8, 3)]
    ]
    fwd = triton.autotune(cfg, key=["N", "K", "BLOCK_M", "USE_DOT", "BITS", "WORDS"])(mod.owq_fwd)
    # dX walks N as its reduction axis: the same tile shapes with the roles of BLOCK_N and BLOCK_K swapped
    dcfg = [triton.Config({"BLOCK_N": c.kwargs["BLOCK_K"], "BLOCK_K": c.kwargs["BLOCK_N"]}, num_warps=c.num_warps,
                          num_stages=c.num_stages) for c in cfg]
    dx = triton.autotune(dcfg, key=["N", "K", "BLOCK_M", "USE_DOT", "BITS", "WORDS"])(mod.owq_dx)
    return fwd, dx


def _rows(m: int) -> tuple[int, bool]:
    """(BLOCK_M, USE_DOT) for M rows."""
    if m <= GEMV_MAX_M:
        return triton.next_power_of_2(max(m, 1)), False
    return (16 if m <= 64 else 64), True


def _fixed(meta: dict) -> dict:
    return meta if not interpreting() else {"BLOCK_N": 32, "BLOCK_K": 32, **meta}


def _split_k(m_tiles: int, n: int, k: int, device: torch.device) -> int:
    """Split K so that small-M launches still fill the SMs (≥ 2 programs per SM), never below 512 inputs a split."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(k // 512, (2 * sms) // max(1, m_tiles * triton.cdiv(n, 64))))


def _plane_args(planes: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(plane_a, plane_b) of the kernels: the two 3-bit planes, else the one code tensor twice (2/4-bit plane, or
    the 3-bit kernel words, which the kernels read with WORDS)."""
    a = planes[0].contiguous()
    b = planes[1].contiguous() if len(planes) > 1 else a
    return a, b


def forward(
    x: Tensor, weak_weight: Tensor, planes: list[Tensor], scales: Tensor, zeros: Tensor, weak_idx: Tensor,
    bias: Tensor | None, dense: Tensor | None, bits: int, split_k: int | None = None,
) -> Tensor:
    """y [M, N] = x·deq(W_q)ᵀ + x[:, idx]·W_o + b for x [M, K] (``dense`` is unused: the torch backend's cache)."""
    x = x.contiguous()
    m, k = x.shape
    if m <= GEMV_MAX_M:
        return gemv(x, weak_weight, planes, scales, zeros, weak_idx, bias, bits, split_k)
    n = scales.shape[1]
    block_m, use_dot = _rows(m)
    m_tiles = triton.cdiv(m, block_m)
    split = split_k or (_split_k(m_tiles, n, k, x.device) if m <= 64 else 1)
    k_per_split = triton.cdiv(triton.cdiv(k, split), _K_ALIGN) * _K_ALIGN
    split = triton.cdiv(k, k_per_split) if k else 1
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    out = y if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    a, b = _plane_args(planes)
    wo = weak_weight.contiguous()
    fwd, _ = _kernels()
    grid = lambda meta: (m_tiles, triton.cdiv(n, meta["BLOCK_N"]), split)  # noqa: E731
    fwd[grid](
        x, a, b, scales.contiguous(), zeros.contiguous(), weak_idx.contiguous(), wo,
        bias if bias is not None else y, out,
        m, n, k, weak_idx.numel(), k // scales.shape[0], k_per_split,
        x.stride(0), a.stride(0), b.stride(0), scales.stride(0), n, n, m * n if split > 1 else 0,
        **_fixed(dict(BITS=bits, BLOCK_M=block_m, BLOCK_O=BLOCK_O, USE_DOT=use_dot,
                      HAS_BIAS=bias is not None and split == 1, UPCAST=interpreting() and x.dtype == torch.bfloat16,
                      WORDS=holds_words3(planes, bits))),
    )
    if split == 1:
        return y
    y32 = out.sum(0)
    return (y32 if bias is None else y32 + bias.float()).to(x.dtype)


def grad_input(
    dy: Tensor, weak_weight: Tensor, planes: list[Tensor], scales: Tensor, zeros: Tensor, weak_idx: Tensor,
    dense: Tensor | None, bits: int, in_features: int,
) -> Tensor:
    """dX [M, K] = dY·deq(W_q) by the dX kernel, plus dY·W_oᵀ at the weak columns (the dense part is 0 there)."""
    m, n = dy.shape
    k = in_features
    block_m, use_dot = _rows(m)
    dx = torch.empty(m, k, dtype=dy.dtype, device=dy.device)
    a, b = _plane_args(planes)
    _, dx_kernel = _kernels()
    grid = lambda meta: (triton.cdiv(m, block_m), triton.cdiv(k, meta["BLOCK_K"]))  # noqa: E731
    dx_kernel[grid](
        dy, a, b, scales.contiguous(), zeros.contiguous(), dx,
        m, n, k, k // scales.shape[0],
        dy.stride(0), a.stride(0), b.stride(0), scales.stride(0), dx.stride(0),
        **_fixed(dict(BITS=bits, BLOCK_M=block_m, USE_DOT=use_dot,
                      UPCAST=interpreting() and dy.dtype == torch.bfloat16, WORDS=holds_words3(planes, bits))),
    )
    if weak_idx.numel():
        dx.index_add_(1, weak_idx.long(), dy @ weak_weight.to(dy.dtype).t())
    return dx
