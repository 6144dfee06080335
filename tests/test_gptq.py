import pytest
import torch

from wct.errors import WCTError
from wct.quant.gptq import GPTQ
from wct.format.layout import dequantize_full, pack_linear
from wct.quant.quantizer import fake_quantize, fit, fit_minmax

F64 = torch.float64


def damped(h: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    h = h.clone()
    return h + percdamp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)


def reference_gptq(w, h, order, quant_cols, params, bits, refit=None):
    """Sequential OBS with explicit inverses (no Cholesky, no lazy blocks): quantize the columns ``quant_cols``
    in ``order`` (a prefix of it); every not-yet-quantized column of ``order`` absorbs
    δ_F = -(w_c - q_c) [H_F⁻¹]_{c,F} / [H_F⁻¹]_cc. ``params(c)`` gives (scale, zero) of column c; ``refit(c, w)``
    (optional) is called first so it may fit a group on the current weight."""
    w = w.clone()
    remaining = list(order)
    for c in quant_cols:
        if refit is not None:
            refit(c, w)
        hinv = torch.linalg.inv(h[remaining][:, remaining])
        s, z = params(c)
        q = fake_quantize(w[:, c : c + 1], s, z, bits).squeeze(1)
        delta = (w[:, c] - q) / hinv[0, 0]
        w[:, remaining[1:]] -= delta.unsqueeze(1) * hinv[0, 1:].unsqueeze(0)
        w[:, c] = q
        remaining.pop(0)
    return w


def layer(n=12, k=20, tokens=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g, dtype=F64)
    x = torch.randn(tokens, k, generator=g, dtype=F64) @ torch.randn(k, k, generator=g, dtype=F64) * 0.5
    x[:, 3] *= 8.0  # an outlier input channel
    gq = GPTQ(w, dtype=F64)
    gq.add_batch(x.view(2, tokens // 2, k))
    return w, x, gq


def test_hessian_is_running_mean_over_sequences():
    w = torch.randn(3, 5, dtype=F64)
    gq = GPTQ(w, dtype=F64)
    xs = [torch.randn(2, 7, 5, dtype=F64), torch.randn(1, 4, 5, dtype=F64), torch.randn(6, 5, dtype=F64)]
    for x in xs:
        gq.add_batch(x)
    assert gq.nsamples == 4  # 2 + 1 sequences + one 2-D call
    allx = torch.cat([x.reshape(-1, 5) for x in xs])
    assert torch.allclose(gq.H, 2 / 4 * allx.t() @ allx, atol=1e-12)  # H = (2/N_seq) Σ x xᵀ


@pytest.mark.parametrize("blocksize", [128, 3])
@pytest.mark.parametrize("act_order", [False, True])
def test_no_weak_columns_equals_plain_gptq(blocksize, act_order):
    w, _, gq = layer()
    H = gq.H.clone()  # the solve consumes its own Hessian
    q, scales, zeros = gq.solve(
        torch.zeros(0, dtype=torch.int32), 3, tuning="minmax", blocksize=blocksize, act_order=act_order,
        scale_dtype=None,
    )
    s, z = fit_minmax(w, 3)
    assert torch.allclose(scales[0], s) and torch.equal(zeros[0], z.long())
    order = torch.argsort(torch.diagonal(H), descending=True).tolist() if act_order else list(range(20))
    ref = reference_gptq(w, damped(H), order, order, lambda c: (s, z), 3)
    assert torch.allclose(q, ref, atol=1e-9)
    assert not torch.allclose(q, fake_quantize(w, s, z, 3))  # the error feedback did something


@pytest.mark.parametrize("act_order", [False, True])
def test_weak_columns_absorb_the_error_compensation(act_order):
    # Quantizing N with the weak set O free is GPTQ on the Schur complement S = H_NN - H_NO H_OO⁻¹ H_ON, and the
    # optimal free columns are W_O + (W_N - Q_N) H_NO H_OO⁻¹ (minimize tr(ΔW H ΔWᵀ) over Δ_O).
    w, _, gq = layer()
    sens = gq.sensitivity(3, tuning="mse", grid=40)
    weak = GPTQ.weak_columns(sens, 4)
    H = gq.H.clone()
    q, scales, zeros = gq.solve(weak, 3, tuning="mse", grid=30, act_order=act_order, order_key=sens, scale_dtype=None)

    o = weak.long()
    n = torch.tensor([c for c in range(20) if c not in o.tolist()])
    s, z = fit(w[:, n], 3, False, "mse", 30)  # fitted on the non-weak columns only (docs/algorithm.md §1.7)
    assert torch.allclose(scales[0], s) and torch.equal(zeros[0], z.long())
    h = damped(H)
    schur = h[n][:, n] - h[n][:, o] @ torch.linalg.solve(h[o][:, o], h[o][:, n])
    order = torch.argsort(sens[n], descending=True, stable=True).tolist() if act_order else list(range(len(n)))
    ref_n = reference_gptq(w[:, n], schur, order, order, lambda c: (s, z), 3)
    assert torch.allclose(q[:, n], ref_n, atol=1e-9)
    ref_o = w[:, o] + (w[:, n] - q[:, n]) @ h[n][:, o] @ torch.linalg.inv(h[o][:, o])
    assert torch.allclose(q[:, o], ref_o, atol=1e-9)
    assert not torch.allclose(q[:, o], w[:, o], atol=1e-3)  # weak columns moved away from their start


def test_weak_set_is_top_sensitivity_sorted():
    w, _, gq = layer()
    start = gq.weight.clone()
    sens = gq.sensitivity(3, tuning="minmax")
    assert torch.equal(gq.weight, start)  # the round-trip error is built in a copy of the (fp32) weight
    s, z = fit_minmax(w, 3)
    expect = torch.diagonal(gq.H) * (w - fake_quantize(w, s, z, 3)).pow(2).sum(0)
    assert torch.allclose(sens, expect)
    assert torch.equal(gq.sensitivity(3, frob_norm=False), torch.diagonal(gq.H))
    weak = GPTQ.weak_columns(sens, 5)
    assert weak.dtype == torch.int32 and weak.tolist() == sorted(weak.tolist())
    assert set(weak.tolist()) == set(torch.topk(sens, 5).indices.tolist())
    assert 3 in weak.tolist()  # the outlier input channel is the most sensitive


def test_groups_refit_on_entry_and_pack_exactly():
    # blocksize 1 makes "W as of the last block boundary" the current W, so the reference refits on it
    w, _, gq = layer(k=24)
    weak = torch.tensor([2, 9, 10], dtype=torch.int32)
    H = gq.H.clone()
    q, scales, zeros = gq.solve(weak, 3, tuning="mse", group_size=8, group_grid=20, blocksize=1, scale_dtype=None)
    assert scales.shape == (3, 12) and zeros.shape == (3, 12)
    n = [c for c in range(24) if c not in weak.tolist()]
    fitted = {}

    def refit(c, cur):
        g = c // 8
        if g not in fitted:
            cols = [j for j in n if j // 8 == g]
            fitted[g] = fit(cur[:, cols], 3, False, "mse", 20)

    ref = reference_gptq(w, damped(H), n + weak.tolist(), n, lambda c: fitted[c // 8], 3, refit)
    assert torch.allclose(q, ref, atol=1e-9)
    for g in range(3):
        assert torch.allclose(scales[g], fitted[g][0]) and torch.equal(zeros[g], fitted[g][1].long())
    packed = pack_linear(q, scales, zeros, weak, 3, weak_dtype=F64, scale_dtype=F64)
    planes = {k: packed[k] for k in ("qweight_lo", "qweight_hi")}
    full = dequantize_full(
        planes, packed["scales"], packed["zeros"], packed["weak_idx"], packed["weak_weight"], 3, 24, F64
    )
    assert torch.allclose(full, q, atol=1e-12)


def test_act_order_static_groups_pack_exactly():
    w, _, gq = layer(k=24)
    weak = torch.tensor([3, 17], dtype=torch.int32)
    q, scales, zeros = gq.solve(weak, 4, group_size=8, act_order=True, scale_dtype=None)
    n = [c for c in range(24) if c not in weak.tolist()]
    for g in range(3):  # fitted up front on the starting weight of each original group
        s, z = fit(w[:, [c for c in n if c // 8 == g]], 4, False, "mse", 40)
        assert torch.allclose(scales[g], s) and torch.equal(zeros[g], z.long())
    packed = pack_linear(q, scales, zeros, weak, 4, weak_dtype=F64, scale_dtype=F64)
    full = dequantize_full({"qweight": packed["qweight"]}, packed["scales"], packed["zeros"], packed["weak_idx"],
                           packed["weak_weight"], 4, 24, F64)
    assert torch.allclose(full, q, atol=1e-12)


def test_dead_inputs_are_zeroed():
    w, x, _ = layer()
    x[:, 5] = 0.0
    gq = GPTQ(w, dtype=F64)
    gq.add_batch(x)
    q, _, _ = gq.solve(torch.zeros(0, dtype=torch.int32), 4, tuning="minmax")
    assert torch.isfinite(q).all()
    assert torch.all(q[:, 5] == 0)


def test_owq_reconstructs_layer_output_better_than_rtn():
    w, x, gq = layer(n=32, k=40, tokens=256)
    sens = gq.sensitivity(3)
    plain = gq.share(w)  # the same Hessian
    q_owq, _, _ = gq.solve(GPTQ.weak_columns(sens, 2), 3, scale_dtype=None)
    q_gptq, _, _ = plain.solve(torch.zeros(0, dtype=torch.int32), 3, scale_dtype=None)
    s, z = fit(w, 3, False, "mse", 100)
    q_rtn = fake_quantize(w, s, z, 3)
    err = lambda q: ((w - q) @ x.t()).pow(2).sum().item()  # noqa: E731
    assert err(q_owq) < err(q_gptq) < err(q_rtn)
    assert err(q_owq) < 0.5 * err(q_rtn)


def test_solve_leaves_a_shared_hessian_and_consumes_its_own():
    """Layers reading one input share its Hessian (wct.quant.owq): no solve may write into a shared matrix, and
    each drops its reference so the memory goes once the last sharer is solved. A Hessian nobody shares is
    permuted and factored in its own storage (docs/scale.md), with the bits of the copying solve."""
    w, _, gq = layer()
    other = gq.share(w.flip(0))
    H = gq.H
    before = H.clone()
    weak = GPTQ.weak_columns(gq.sensitivity(3), 3)
    q_shared = gq.solve(weak, 3, act_order=True, scale_dtype=None)
    other.solve(weak, 3, act_order=True, scale_dtype=None)
    assert gq.H is None and other.H is None
    assert torch.equal(H, before)

    own = GPTQ(w, dtype=F64, H=before.clone(), nsamples=gq.nsamples)
    own.owns_H = True  # as if it had accumulated the matrix itself
    H_own = own.H
    q_own = own.solve(weak, 3, act_order=True, scale_dtype=None)
    assert not torch.equal(H_own, before)  # consumed
    for a, b in zip(q_shared, q_own):
        assert torch.equal(a, b)


def test_not_positive_definite_hessian_is_a_clear_error():
    w, _, gq = layer()
    gq.H = -torch.eye(w.shape[1], dtype=F64)  # damping by 1% of a negative mean diagonal cannot rescue it
    with pytest.raises(WCTError, match="not positive definite even after damping"):
        gq.solve(torch.zeros(0, dtype=torch.int32), 4)


def test_fp32_solve_with_fp16_scales_matches_float64():
    """The production setting (fp32 weights and Hessian, scales rounded to fp16 storage) lands on the stored
    grid and reconstructs the layer output as well as the float64 solve of the same problem."""
    w, x, gq64 = layer(n=16, k=32, tokens=128, seed=3)
    weak = GPTQ.weak_columns(gq64.sensitivity(3, False, "mse", 20, True), 2)
    gq32 = GPTQ(w.float())
    gq32.add_batch(x.float().view(2, 64, 32))
    q32, s32, z32 = gq32.solve(weak, 3, grid=30, scale_dtype=torch.float16)
    q64, _, _ = gq64.solve(weak, 3, grid=30, scale_dtype=torch.float16)
    assert q32.dtype == torch.float32 and torch.equal(s32.half().float(), s32.float())  # fp16-representable
    keep = torch.ones(32, dtype=torch.bool)
    keep[weak.long()] = False
    codes = q32[:, keep].double() / s32.double().t() + z32.double().t()
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.round().min() >= 0 and codes.round().max() <= 7
    err = lambda q: ((w - q.double()) @ x.t()).norm()  # noqa: E731
    assert err(q32) <= 1.01 * err(q64)


def test_slabbed_lazy_updates_have_the_bits_of_one_product(monkeypatch):
    """GPTQ.solve updates the later columns a slab at a time through one buffer (docs/scale.md); each column's
    sum runs over the block's rows only, and slabs of a multiple of 16 columns give the unslabbed result bit for
    bit (fp32, as in production, with weak columns and a ragged last slab)."""
    import wct.quant.gptq as gptq

    g = torch.Generator().manual_seed(5)
    w = torch.randn(24, 300, generator=g)
    x = torch.randn(2, 400, 300, generator=g)

    acc = GPTQ(w)
    acc.add_batch(x)
    sens = acc.sensitivity(4)

    def solve() -> tuple[torch.Tensor, ...]:
        gq = GPTQ(w, H=acc.H.clone())
        return gq.solve(GPTQ.weak_columns(sens, 5), 4, blocksize=32, act_order=True, order_key=sens)

    whole = solve()
    for cols in (16, 48):  # slabs of 16 and 48 columns, the last ones ragged
        monkeypatch.setattr(gptq, "SLAB_ELEMS", 24 * cols)
        for a, b in zip(whole, solve()):
            assert torch.equal(a, b)
