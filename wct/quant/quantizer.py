"""Uniform b-bit quantizer fitted per row (or per group of a row's columns): min-max and the tuned MSE search.

docs/algorithm.md §1.7. Codes are unsigned in [0, 2^b - 1] with an integer zero-point z:

    q = clamp(round(w / s) + z, 0, 2^b - 1),        ŵ = s · (q - z)

Symmetric quantization is stored the same way with z = 2^(b-1) (a signed code c in [-2^(b-1), 2^(b-1) - 1] is
stored as c + 2^(b-1)), so one packed format and one dequantizer serve both modes.

Every function works on a [R, C] matrix (R rows fitted independently, C values each) and returns per-row
``scale`` and ``zero`` of shape [R] (zero as integer-valued floats in the dtype of ``w``).
"""

from __future__ import annotations

import torch

NORM = 2.4  # exponent of the MSE search objective: mean |w - ŵ|^2.4 (docs/algorithm.md §1.7)
MIN_STEP = 1e-8  # floor of a candidate step width (docs/algorithm.md §1.7)
CHUNK_ELEMS = 1 << 18  # elements of one [grid chunk, rows, C] temporary in the MSE search
ROW_SLAB_ELEMS = 1 << 22  # rows are searched in slabs of at most this many elements
EXTREMES = 32  # values taken from each end of a row for the MSE search's lower bound


def qmax(bits: int) -> int:
    return 2**bits - 1


def zero_inclusive_range(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """xmin = min(row min, 0), xmax = max(row max, 0); a row of zeros (or no columns) gets [-1, 1]."""
    if w.shape[-1] == 0:
        ones = w.new_ones(w.shape[:-1])
        return -ones, ones
    xmin = w.amin(-1).clamp(max=0)
    xmax = w.amax(-1).clamp(min=0)
    flat = (xmin == 0) & (xmax == 0)
    return torch.where(flat, -1.0, xmin), torch.where(flat, 1.0, xmax)


def params_from_range(
    xmin: torch.Tensor, xmax: torch.Tensor, bits: int, sym: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero-point of the range [xmin, xmax] (docs/algorithm.md §1.7, min-max formulas and the final recompute).

    asymmetric: s = (m+ - m-) / (2^b - 1),  z = clamp(-round(m- / s), 0, 2^b - 1)   with m± the zero-inclusive range
    symmetric:  s = max(|m-|, m+) / 2^(b-1),  z = 2^(b-1)
    """
    lo, hi = xmin.clamp(max=0), xmax.clamp(min=0)
    if sym:
        scale = torch.maximum(-lo, hi) / 2 ** (bits - 1)
        return scale, torch.full_like(scale, 2 ** (bits - 1))
    scale = (hi - lo) / qmax(bits)
    return scale, torch.clamp(-torch.round(lo / scale), 0, qmax(bits))


def fit_minmax(w: torch.Tensor, bits: int, sym: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row min-max fit (the GPTQ baseline)."""
    return params_from_range(*zero_inclusive_range(w), bits, sym)


def _errors(x: torch.Tensor, step: torch.Tensor, zp: int | None, bits: int) -> torch.Tensor:
    """Σ_c |x - ŵ|^2.4 over the last dim of ``x`` [R, C] for the steps ``step`` [I, R] and zero-point ``zp``: [I, R].

    clamp(round(x/Δ) + zp, 0, qmax) - zp = clamp(round(x/Δ), -zp, qmax - zp), so
    ŵ = Δ·clamp(round(x/Δ), -zp, qmax - zp).
    ``zp`` None: no clamp, the pure rounding error.
    """
    st = step.unsqueeze(-1)  # [I, R, 1]
    q = torch.round(x / st)
    if zp is not None:
        q.clamp_(-zp, qmax(bits) - zp)
    return q.mul_(st).sub_(x).abs_().pow_(NORM).sum(-1)


def fit_mse(
    w: torch.Tensor, bits: int, sym: bool = False, grid: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tuned per-row fit: the range minimizing mean |w - ŵ|^2.4 over a grid (docs/algorithm.md §1.7, "quantization
    configuration search including truncation").

    asymmetric: widths w_i = R·i/grid (R = xmax - xmin, i = 1..grid), steps Δ_i = max(w_i / (2^b - 1), 1e-8), and
      every integer zero-point zp in [0, 2^b - 1]; candidate range [-zp·Δ_i, w_i - zp·Δ_i].
    symmetric: clipping max a_i = max(|xmin|, xmax)·i/grid, Δ_i = a_i / 2^(b-1), range [-a_i, a_i].
    The first best candidate (i ascending, then zp ascending) wins; scale and zero are then recomputed from its
    range by :func:`params_from_range`.

    Exact, but pruned by a lower bound of each candidate's error: split a row into its 2·EXTREMES most extreme
    values and the rest. The extremes' error is computed exactly (cheap, they are few); for the rest, a clipped
    value's error r + mΔ (m a nonzero integer, |r| <= Δ/2) is never below its rounding error r, so the rest's
    unclipped rounding error (one pass per step, shared by all zero-points) bounds theirs. A candidate whose bound
    exceeds the best error found so far is skipped. Steps run widest first in chunks, so good ranges come early.
    """
    x = w
    xmin, xmax = zero_inclusive_range(x)
    rows, cols = x.shape
    if sym:
        full, zps, denom = torch.maximum(-xmin, xmax), [2 ** (bits - 1)], 2 ** (bits - 1)
    else:
        full, zps, denom = xmax - xmin, list(range(qmax(bits) + 1)), qmax(bits)
    ii = torch.arange(1, grid + 1, device=x.device, dtype=x.dtype)
    steps = (full.unsqueeze(0) * ii.unsqueeze(1) / grid / denom).clamp(min=MIN_STEP)  # [grid, R]
    if 2 * EXTREMES < cols:
        ext = torch.cat([x.topk(EXTREMES, largest=False).values, x.topk(EXTREMES).values], dim=1)
    else:
        ext = x
    ext_err = torch.stack([_errors(ext, steps, zp, bits) for zp in zps])  # [Z, grid, R]
    ext_round = _errors(ext, steps, None, bits)  # [grid, R]
    slack = 1 + 1e-5  # float sums in another order must not prune a candidate that ties the best

    best = x.new_full((rows,), float("inf"))  # best Σ error per row
    best_key = torch.full((rows,), len(zps) * grid, dtype=torch.long, device=x.device)  # (i-1)·Z + z; ties: lowest
    ichunk = max(1, CHUNK_ELEMS // max(1, rows * cols))
    for i1 in range(grid, 0, -ichunk):
        i0 = max(0, i1 - ichunk)  # grid indices i0+1 .. i1
        live = (ext_err[:, i0:i1] <= best * slack).flatten(0, 1).any(0).nonzero().squeeze(1)
        if not live.numel():
            continue
        xl, sl = x[live], steps[i0:i1, live]
        rest = (_errors(xl, sl, None, bits) - ext_round[i0:i1, live]).clamp(min=0) if len(zps) > 1 else 0
        for z, zp in enumerate(zps):
            need = ((rest + ext_err[z, i0:i1, live]) <= best[live] * slack).any(0).nonzero().squeeze(1)
            if not need.numel():
                continue
            r = live[need]
            err = _errors(xl[need], sl[:, need], zp, bits)  # [I, r]
            val, arg = err.min(0)  # first minimum: lowest i of the chunk
            key = (arg + i0) * len(zps) + z
            better = (val < best[r]) | ((val == best[r]) & (key < best_key[r]))
            best[r] = torch.where(better, val, best[r])
            best_key[r] = torch.where(better, key, best_key[r])
    i_best, z_best = best_key // len(zps) + 1, best_key % len(zps)
    width = full * i_best.to(x.dtype) / grid
    if sym:
        return params_from_range(-width, width, bits, sym)
    step = steps.gather(0, (i_best - 1).unsqueeze(0))[0]
    lo = -torch.as_tensor(zps, device=x.device, dtype=x.dtype)[z_best] * step
    return params_from_range(lo, width + lo, bits, sym)


def fit(w: torch.Tensor, bits: int, sym: bool, tuning: str, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero of ``w`` [R, C] by ``tuning`` ("mse" search with ``grid`` steps, or "minmax")."""
    if tuning == "mse" and w.shape[1]:
        # rows are fitted independently: chunk them so one [rows, C] slab fits the search's memory bound
        per = max(1, ROW_SLAB_ELEMS // w.shape[1])
        parts = [fit_mse(w[r : r + per], bits, sym, grid) for r in range(0, w.shape[0], per)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return fit_minmax(w, bits, sym)


def round_scale(scale: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """The scale as it will be stored (``dtype``, e.g. fp16), back in the compute dtype; an underflow to 0 becomes
    the smallest positive (subnormal) value of ``dtype`` so it stays invertible. ``dtype`` None keeps it exact."""
    if dtype is None:
        return scale
    tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    return scale.to(dtype).to(scale.dtype).clamp(min=tiny)


def rtn(
    w: torch.Tensor,
    bits: int,
    sym: bool,
    tuning: str,
    grid: int,
    group_size: int = -1,
    scale_dtype: torch.dtype | None = torch.float16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest of ``w`` [N, K] per row or per group of ``group_size`` columns (all groups fitted at once).

    Returns the fake-quantized weight [N, K], scales [K/G, N] and integer zeros [K/G, N] (int64).
    """
    n, k = w.shape
    g = k if group_size in (-1, 0) else group_size
    rows = w.reshape(n * (k // g), g)  # row-major: group j of output row i is row i * (K/G) + j
    scale, zero = fit(rows, bits, sym, tuning, grid)
    scale = round_scale(scale, scale_dtype)
    q = fake_quantize(rows, scale, zero, bits).reshape(n, k)
    return q, scale.reshape(n, k // g).t().contiguous(), zero.reshape(n, k // g).t().to(torch.int64).contiguous()


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes q = clamp(round(w / s) + z, 0, 2^b - 1) of ``w`` [R, C] with per-row ``scale``, ``zero`` [R]."""
    return torch.clamp(torch.round(w / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, qmax(bits))


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """ŵ = s · (q - z)."""
    return scale.unsqueeze(-1) * (q - zero.unsqueeze(-1))


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Round-to-nearest onto the grid: dequantize(quantize(w))."""
    return dequantize(quantize(w, scale, zero, bits), scale, zero)
