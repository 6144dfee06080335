import pytest
import torch
from hypothesis import given, settings, strategies as st

from wct.format.layout import (
    dequantize_full,
    pack_codes,
    pack_linear,
    plane_layout,
    stored_bits,
    unpack_codes,
)


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 3, 4]), k=st.integers(1, 200), n=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_pack_round_trip(bits, k, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (k, n), generator=g)
    planes = pack_codes(codes, bits)
    assert set(planes) == {name for name, _, _ in plane_layout(bits)}
    for name, width, _ in plane_layout(bits):
        assert planes[name].dtype == torch.int32
        assert planes[name].shape == ((k + 31) // 32 * width, n)
    assert torch.equal(unpack_codes(planes, bits, k), codes.to(torch.int32))


def test_4bit_plane_is_gptq_layout():
    # element k of column n sits in row k // 8 at bit offset (k % 8) * 4
    codes = torch.zeros(32, 2, dtype=torch.int64)
    codes[9, 1] = 0xF
    planes = pack_codes(codes, 4)
    assert planes["qweight"][1, 1].item() == 0xF << 4
    assert planes["qweight"].abs().sum().item() == 0xF << 4


def test_3bit_planes_split_low_and_high_bits():
    codes = torch.zeros(32, 1, dtype=torch.int64)
    codes[31, 0] = 0b110  # low plane: 0b10 in row 1 at offset 30; high plane: 1 at bit 31 of word 0
    planes = pack_codes(codes, 3)
    assert planes["qweight_lo"][1, 0].item() == -(2**31)  # 0b10 << 30 as int32
    assert planes["qweight_hi"][0, 0].item() == -(2**31)  # bit 31 of the single 1-bit word


def test_bad_bits_message():
    with pytest.raises(ValueError, match="bits=5 is not supported"):
        plane_layout(5)


def test_pack_linear_weak_columns_exact_and_dense_zero():
    n, k, bits, group = 12, 64, 3, 32
    scales = torch.rand(k // group, n) * 0.1 + 0.01
    zeros = torch.randint(0, 2**bits, (k // group, n))
    codes = torch.randint(0, 2**bits, (k, n))
    s = scales.half().float().repeat_interleave(group, 0)
    z = zeros.float().repeat_interleave(group, 0)
    w = (s * (codes - z)).t().clone()  # on-grid weight [N, K]
    idx = torch.tensor([40, 3, 17])
    w[:, idx] = torch.randn(n, 3)  # free FP values on weak columns
    packed = pack_linear(w, scales, zeros, idx, bits)
    assert packed["weak_idx"].tolist() == [3, 17, 40]
    full = dequantize_full({k_: packed[k_] for k_ in ("qweight_lo", "qweight_hi")}, packed["scales"], packed["zeros"],
                           packed["weak_idx"], packed["weak_weight"], bits, k)
    off = torch.ones(k, dtype=torch.bool)
    off[idx] = False
    torch.testing.assert_close(full[:, off], w[:, off], rtol=0, atol=1e-6)
    torch.testing.assert_close(full[:, idx], w[:, idx].half().float())
    dense = dequantize_full({k_: packed[k_] for k_ in ("qweight_lo", "qweight_hi")}, packed["scales"], packed["zeros"],
                            torch.zeros(0, dtype=torch.int32), packed["weak_weight"][:0], bits, k)
    assert torch.count_nonzero(dense[:, idx]) == 0


def test_stored_bits_llama7b_301():
    # docs/owq-pack.md §2.1: LLaMA-7B "3.01" packs at about 3.017 bits per linear weight (16-bit scale + 4-bit zero there;
    # we store an 8-bit zero, which adds ~0.001 bits at d=4096)
    d, ff = 4096, 11008
    layers = [(d, d, 6)] * 4 + [(ff, d, 2)] * 2 + [(d, ff, 6)]
    total = sum(stored_bits(n, k, 3, 1, no) * n * k for n, k, no in layers)
    weights = sum(n * k for n, k, _ in layers)
    assert 3.015 < total / weights < 3.02


@pytest.mark.parametrize("bits,groups", [(3, 1), (4, 4), (2, 2)])
def test_pack_linear_in_slabs_equals_one_piece(bits, groups, monkeypatch):
    """Packing works on slabs of output columns to bound its memory (docs/scale.md); the result must not depend on
    the slab size, ragged last slab and weak columns included."""
    import wct.format.layout as pack

    g = torch.Generator().manual_seed(bits)
    n, k = 37, 64
    scales = torch.rand(groups, n, generator=g) + 0.1
    zeros = torch.randint(0, 2**bits, (groups, n), generator=g)
    codes = torch.randint(0, 2**bits, (k, n), generator=g)
    grid = scales.repeat_interleave(k // groups, 0).half().float()
    weight = ((codes - zeros.repeat_interleave(k // groups, 0)) * grid).t()
    weak = torch.tensor([5, 40], dtype=torch.int32)
    weight[:, weak.long()] = torch.randn(n, 2, generator=g)
    whole = pack.pack_linear(weight, scales, zeros, weak, bits)
    monkeypatch.setattr(pack, "PACK_CHUNK_ELEMS", 5 * k)  # slabs of 5 output columns, the last one of 2
    slabs = pack.pack_linear(weight, scales, zeros, weak, bits)
    assert whole.keys() == slabs.keys()
    for name in whole:
        assert torch.equal(whole[name], slabs[name]), name


def test_sensitivity_in_slabs_equals_one_piece(monkeypatch):
    import wct.quant.gptq as gptq

    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 50, generator=g)
    gq = gptq.GPTQ(w)
    gq.add_batch(torch.randn(2, 30, 50, generator=g))
    whole = gq.sensitivity(3, tuning="mse", grid=20)
    monkeypatch.setattr(gptq, "SLAB_ELEMS", 50 * 5)  # slabs of 5 rows, the last one of 4
    assert torch.equal(gq.sensitivity(3, tuning="mse", grid=20), whole)


@pytest.mark.parametrize("bits,groups,dtype", [(3, 1, torch.float32), (4, 4, torch.float16), (2, 2, torch.bfloat16)])
def test_dequantize_in_slabs_equals_formula(bits, groups, dtype, monkeypatch):
    """dequantize_dense builds W a slab of output columns at a time (docs/scale.md): every slab size, ragged last
    slab included, gives s·(code − z) rounded once from the exact value, as a contiguous [N, K]."""
    import wct.format.layout as pack

    g = torch.Generator().manual_seed(bits)
    n, k = 37, 64
    scales = (torch.rand(groups, n, generator=g) + 0.1).to(dtype)
    zeros = torch.randint(0, 2**bits, (groups, n), generator=g)
    codes = torch.randint(0, 2**bits, (k, n), generator=g)
    planes = pack.pack_codes(codes, bits)
    # float64 oracle: code − z is exact in every dtype here, so the result is s·(code − z) rounded once
    want = (scales.double().repeat_interleave(k // groups, 0) * (codes - zeros.repeat_interleave(k // groups, 0))
            ).t().to(dtype)
    for slab in (k * n, 5 * k, k):  # one piece, slabs of 5 columns (the last of 2), one column each
        monkeypatch.setattr(pack, "DEQUANT_CHUNK_ELEMS", slab)
        got = pack.dequantize_dense(planes, scales, zeros.to(torch.uint8), bits, k, dtype)
        assert got.shape == (n, k) and got.dtype == dtype and got.is_contiguous()
        assert torch.equal(got, want), slab


def test_hessian_in_slabs_equals_one_piece(monkeypatch):
    """add_batch folds XᵀX into H a slab of rows at a time (no K x K temporary): the same bits as one product."""
    import wct.quant.gptq as gptq

    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 300, generator=g)
    xs = [torch.randn(1, 40, 300, generator=g) for _ in range(3)]
    whole = gptq.GPTQ(w)
    for x in xs:
        whole.add_batch(x)
    monkeypatch.setattr(gptq, "SLAB_ELEMS", 300 * 40)  # slabs of 32 rows, the last one of 12
    slabs = gptq.GPTQ(w)
    for x in xs:
        slabs.add_batch(x)
    assert torch.equal(slabs.H, whole.H)
    x = torch.cat(xs, 0).reshape(-1, 300).double()
    torch.testing.assert_close(slabs.H.double(), 2 / 3 * x.t() @ x, rtol=1e-5, atol=1e-4)
