import pytest
import torch

import wct.quant.quantizer as Q
from wct.quant.quantizer import dequantize, fake_quantize, fit, fit_minmax, fit_mse, quantize, rtn


def brute_force_mse(row: torch.Tensor, bits: int, sym: bool, grid: int) -> tuple[float, float]:
    """docs/algorithm.md §1.7 written out one candidate at a time (float64): first strict minimum of mean |x - x̂|^2.4."""
    maxq = 2**bits - 1
    xmin, xmax = min(float(row.min()), 0.0), max(float(row.max()), 0.0)
    if xmin == 0 and xmax == 0:
        xmin, xmax = -1.0, 1.0
    best, best_range = float("inf"), None
    for i in range(1, grid + 1):
        if sym:
            amax = max(-xmin, xmax) * i / grid
            step = max(amax / 2 ** (bits - 1), 1e-8)
            cands = [(2 ** (bits - 1), (-amax, amax))]
        else:
            width = (xmax - xmin) * i / grid
            step = max(width / maxq, 1e-8)
            cands = [(zp, (-zp * step, width - zp * step)) for zp in range(maxq + 1)]
        for zp, rng in cands:
            q = torch.clamp(torch.round(row / step) + zp, 0, maxq)
            err = (row - step * (q - zp)).abs().pow(2.4).mean().item()
            if err < best:
                best, best_range = err, rng
    lo, hi = min(best_range[0], 0.0), max(best_range[1], 0.0)
    if sym:
        return max(-lo, hi) / 2 ** (bits - 1), 2.0 ** (bits - 1)
    s = (hi - lo) / maxq
    return s, min(max(-round(lo / s), 0), maxq)


def _rows() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 37, generator=g, dtype=torch.float64)
    w[1, 3] = 9.0  # an outlier: clipping should pay off
    w[2] = w[2].abs() + 0.1  # all positive
    w[3] = -w[3].abs()  # all negative
    w[4] = 0.0  # all zero -> range [-1, 1]
    w[5] = torch.tensor([0.3, -0.2] * 18 + [0.3], dtype=torch.float64)  # few distinct values: ties
    return w


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("extremes", [32, 2])  # 32: the bound is the full error; 2: a real extremes/rest split
def test_mse_search_equals_brute_force(bits, sym, extremes, monkeypatch):
    monkeypatch.setattr(Q, "EXTREMES", extremes)
    w = _rows()
    scale, zero = fit_mse(w, bits, sym, grid=25)
    for r in range(w.shape[0]):
        s, z = brute_force_mse(w[r], bits, sym, 25)
        assert scale[r].item() == pytest.approx(s, rel=1e-12), r
        assert zero[r].item() == z, r


def test_mse_search_chunking_does_not_change_result(monkeypatch):
    w = _rows()
    full = fit(w, 3, False, "mse", 30)
    monkeypatch.setattr(Q, "CHUNK_ELEMS", 50)  # one row per slab, one grid point per chunk
    chunked = fit(w, 3, False, "mse", 30)
    assert torch.equal(full[0], chunked[0]) and torch.equal(full[1], chunked[1])


def test_mse_beats_minmax_on_its_objective():
    w = _rows()[1:2]
    s_mse, z_mse = fit_mse(w, 3, False, 100)
    s_mm, z_mm = fit_minmax(w, 3, False)
    err = lambda s, z: (w - fake_quantize(w, s, z, 3)).abs().pow(2.4).mean().item()  # noqa: E731
    assert err(s_mse, z_mse) < err(s_mm, z_mm)
    assert s_mse.item() < s_mm.item()  # the range was clipped


def test_minmax_formulas():
    w = torch.tensor([[-1.0, 0.5, 2.0], [1.0, 2.0, 1.5], [0.0, 0.0, 0.0], [-3.0, -1.0, -2.0]], dtype=torch.float64)
    s, z = fit_minmax(w, 3, sym=False)
    # s = (xmax - xmin)/7, z = round(-xmin/s) with the zero-inclusive range; a zero row uses [-1, 1]
    assert torch.allclose(s, torch.tensor([3 / 7, 2 / 7, 2 / 7, 3 / 7], dtype=torch.float64))
    assert z.tolist() == [2.0, 0.0, 4.0, 7.0]  # round(2.333)=2, 0, round(3.5)=4, round(7)=7
    s, z = fit_minmax(w, 3, sym=True)
    # s = max(|xmin|, xmax)/2^(b-1), stored zero 2^(b-1)
    assert torch.allclose(s, torch.tensor([2 / 4, 2 / 4, 1 / 4, 3 / 4], dtype=torch.float64))
    assert z.tolist() == [4.0] * 4


def test_quantize_dequantize_round_trip():
    w = torch.randn(5, 40, dtype=torch.float64)
    s, z = fit_minmax(w, 4)
    q = quantize(w, s, z, 4)
    assert q.min() >= 0 and q.max() <= 15 and torch.equal(q, q.round())
    wq = dequantize(q, s, z)
    assert (w - wq).abs().max() <= s.max() / 2 + 1e-12  # min-max never clips
    assert torch.equal(fake_quantize(wq, s, z, 4), wq)  # grid points are fixed points


def test_symmetric_codes_are_unsigned_with_midpoint_zero():
    w = torch.tensor([[-2.0, -1.0, 0.0, 1.0, 1.9]], dtype=torch.float64)
    s, z = fit_minmax(w, 3, sym=True)
    q = quantize(w, s, z, 3)
    assert q.tolist() == [[0.0, 2.0, 4.0, 6.0, 7.0]]  # -2 -> code 0, 0 -> code 4, 1.9 clipped to 7
    assert dequantize(q, s, z)[0, 0].item() == -2.0


def test_rtn_groups_equal_per_group_fits():
    w = torch.randn(3, 16, dtype=torch.float64)
    q, scales, zeros = rtn(w, 3, False, "mse", 20, group_size=8, scale_dtype=None)
    assert scales.shape == (2, 3) and zeros.shape == (2, 3) and zeros.dtype == torch.int64
    for g in range(2):
        s, z = fit_mse(w[:, 8 * g : 8 * g + 8], 3, False, 20)
        assert torch.allclose(scales[g], s) and torch.equal(zeros[g], z.long())
        assert torch.allclose(q[:, 8 * g : 8 * g + 8], fake_quantize(w[:, 8 * g : 8 * g + 8], s, z, 3))


def test_rtn_rounds_scales_to_storage_dtype():
    w = torch.randn(4, 32)
    q, scales, zeros = rtn(w, 4, False, "minmax", 10)
    assert torch.equal(scales, scales.half().float())
    codes = torch.round(q / scales[0].unsqueeze(1)) + zeros[0].unsqueeze(1)
    assert torch.allclose(q, scales[0].unsqueeze(1) * (codes - zeros[0].unsqueeze(1)))
