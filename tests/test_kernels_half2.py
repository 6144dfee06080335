"""The Triton GEMV's fp16x2 path (issue 13, docs/kernels.md "fp16x2 path").

Its inline PTX cannot run without a GPU, so: the assembly text runs through a numpy PTX emulator
(tests/ptx_emulator.py) and must decode every code exactly (code - z, against the codes packed here from the
owq-pack v1 bit layout at 4 bits and the kernels' 3-bit words at 3, each written from its definition) and pair x in
the documented order; the converter from the v1 planes to the 3-bit words matches that definition; the tl form that TRITON_INTERPRET runs must give
bit-identical partials to the emulated assembly; and the whole kernel (tl form) must stay within the documented
fp16x2 error bound of a float64 reference, with forced splits and weak columns.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

import wct.format.layout
from ptx_emulator import run as run_ptx
from kernel_helpers import ROWS, U, half2_bound, make_layer, overflowing_x, pair_rows
from wct.kernels import triton_backend
from wct.kernels.sources import load_module
from wct.format.layout import kernel_words3, pack_codes, padded_k, planes_from_words3, words3_codes

SRC = load_module("owq_triton.py", "wct_kernels_src_owq_triton")
_step3, _step4, _zero_consts = SRC._step3, SRC._step4, SRC._zero_consts


def words3_from_spec(codes: np.ndarray) -> np.ndarray:
    """The 3-bit words [3, n] of 32 rows of codes, from their definition (docs/kernels.md "3-bit words"): lane l
    (bits 16l..16l+15) of word j holds row 16l + 5j + i at bits 3i (i < 5) and bit j of row 16l + 15 at bit 15."""
    words = np.zeros((3, codes.shape[1]), dtype=np.uint32)
    for j in range(3):
        for lane in range(2):
            for i in range(5):
                words[j] |= codes[16 * lane + 5 * j + i] << np.uint32(16 * lane + 3 * i)
            words[j] |= ((codes[16 * lane + 15] >> np.uint32(j)) & 1) << np.uint32(16 * lane + 15)
    return words


def random_step(bits: int, n: int, seed: int):
    """Codes [rows, n], zero points [n] and the words of one step (packed here from the spec): the two 4-bit words
    (v1 plane), or the three 3-bit words."""
    g = np.random.default_rng(seed)
    codes = g.integers(0, 2**bits, (ROWS[bits], n)).astype(np.uint32)
    z = g.integers(0, 2**bits, n).astype(np.uint32)
    if bits == 4:  # row r of word r // 8 at bits 4 (r % 8)
        a = np.stack([sum(codes[8 * w + c] << np.uint32(4 * c) for c in range(8)) for w in range(2)])
        return codes, z, a.astype(np.uint32)
    return codes, z, words3_from_spec(codes)


@pytest.mark.parametrize("k,n", [(32, 5), (200, 7), (11008, 3)])  # 200: ragged K (padded to 224)
@pytest.mark.parametrize("chunk", [None, 64])  # 64: one column per conversion chunk
def test_kernel_words3_converter_follows_the_layout(k, n, chunk, monkeypatch):
    """wct.format.layout.kernel_words3 from the owq-pack v1 planes gives the words of the definition for every 32-row
    block, and every code reads back from them (at the documented bits) as the code that was packed; the inverse
    converters give the codes and the v1 planes back bit for bit."""
    if chunk:
        monkeypatch.setattr(wct.format.layout, "KERNEL3_CHUNK", chunk)
    codes = torch.randint(0, 8, (k, n), generator=torch.Generator().manual_seed(k + n))
    planes = pack_codes(codes, 3)
    words = kernel_words3(planes["qweight_lo"], planes["qweight_hi"])
    kp = padded_k(k)
    assert words.dtype == torch.int32 and words.shape == (kp // 32 * 3, n)
    c = np.zeros((kp, n), dtype=np.uint32)
    c[:k] = codes.numpy()
    got = words.numpy().view(np.uint32)
    want = np.concatenate([words3_from_spec(c[b:b + 32]) for b in range(0, kp, 32)])
    np.testing.assert_array_equal(got, want)
    back = np.zeros_like(c)  # read back: slot codes and the spare-bit pair
    for b in range(kp // 32):
        w = got[3 * b:3 * b + 3]
        for lane in range(2):
            for j in range(3):
                for i in range(5):
                    back[32 * b + 16 * lane + 5 * j + i] = (w[j] >> np.uint32(16 * lane + 3 * i)) & 7
                back[32 * b + 16 * lane + 15] |= ((w[j] >> np.uint32(16 * lane + 15)) & 1) << np.uint32(j)
    np.testing.assert_array_equal(back, c)
    assert torch.equal(words3_codes(words, k), codes.to(torch.int32))
    again = planes_from_words3(words)
    assert again.keys() == planes.keys() and all(torch.equal(again[name], planes[name]) for name in planes)


def zero_args(bits: int, z: np.ndarray) -> list[np.ndarray]:
    """The asm's zero-point operands, from their definitions in docs/kernels.md: fp16 bit patterns of 1024 + z,
    -(64 + z), 1/16 (4 bits) or 2^(10-q) + z, q = 0, 3, 6 (3 bits), in both lanes."""
    def h2(values: np.ndarray) -> np.ndarray:
        bits16 = values.astype(np.float16).view(np.uint16).astype(np.uint32)
        return bits16 | (bits16 << np.uint32(16))
    zf = z.astype(np.float64)
    if bits == 4:
        return [h2(1024 + zf), h2(-(64 + zf)), h2(np.full_like(zf, 1 / 16))]
    return [h2(2.0 ** (10 - q) + zf) for q in (0, 3, 6)]


def emulate_step(bits: int, words: np.ndarray, z: np.ndarray, xpairs: list[np.ndarray]):
    """The two fp32 lanes of the step partial per column, from the assembly text."""
    ins = list(words) + zero_args(bits, z) + xpairs
    out = run_ptx(SRC.asm_gemv4() if bits == 4 else SRC.asm_gemv3(), {i + 2: v for i, v in enumerate(ins)})
    return out[0], out[1]


def h2_of(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return lo.astype(np.float16).view(np.uint16).astype(np.uint32) | (
        hi.astype(np.float16).view(np.uint16).astype(np.uint32) << np.uint32(16))


@pytest.mark.parametrize("bits", [3, 4])
def test_asm_decodes_every_code_exactly(bits):
    """One-hot x pairs read the decoded value of each pair and lane out of the partial: code - z, exactly."""
    n = 64
    codes, z, words = random_step(bits, n, seed=bits)
    rows = pair_rows(bits)
    for i, (r0, r1) in enumerate(rows):
        for lane, row in ((0, r0), (1, r1)):
            one = np.float16(1.0)
            xp = [h2_of(np.full(n, one if (j == i and lane == 0) else 0), np.full(n, one if (j == i and lane == 1)
                                                                                  else 0)) for j in range(len(rows))]
            lo, hi = emulate_step(bits, words, z, xp)
            got = (lo, hi)[lane].astype(np.float64)
            np.testing.assert_array_equal(got, codes[row].astype(np.float64) - z, err_msg=f"pair {i} lane {lane}")


@pytest.mark.parametrize("bits", [3, 4])
def test_asm_x_pairs_follow_the_decode_order(bits):
    """asm_x_pairs reads the step's x halves (128-bit loads) and pairs them as pair_rows says."""
    x = np.random.default_rng(1).standard_normal(ROWS[bits]).astype(np.float16)
    memory = x.view(np.uint32)
    out = run_ptx(SRC.asm_x_pairs(4 if bits == 4 else 16, ROWS[bits]), {ROWS[bits] // 2: np.zeros(1, dtype=np.uint64)},
                  memory)
    for i, (r0, r1) in enumerate(pair_rows(bits)):
        assert out[i][0] == h2_of(x[[r0]], x[[r1]])[0], f"pair {i}"


@triton.jit
def _step_kernel(pa, xw, zeros, lo_ptr, hi_ptr, stride, BITS: tl.constexpr, N: tl.constexpr):
    rn = tl.arange(0, N)
    zc = _zero_consts(tl.load(zeros + rn), BITS)
    if BITS == 3:
        lo, hi = _step3(pa + rn, stride, xw, None, zc, False)
    else:
        lo, hi = _step4(pa + rn, stride, xw, None, zc[0], zc[1], zc[2], False)
    tl.store(lo_ptr + rn, lo)
    tl.store(hi_ptr + rn, hi)


@pytest.mark.parametrize("bits", [3, 4])
def test_tl_form_is_bit_identical_to_the_assembly(bits):
    """The interpreter's tl decode (ASM=False) and the emulated PTX give the same fp32 bits for random x."""
    if not triton_backend.interpreting():
        pytest.skip("the tl form runs here under TRITON_INTERPRET; on a GPU the parity tests cover the asm")
    n = 64
    t = lambda v: torch.from_numpy(v.astype(np.int64)).to(torch.int32)  # noqa: E731 (bit patterns)
    for seed in range(4):
        _, z, words = random_step(bits, n, seed=10 * seed + bits)
        x = (np.random.default_rng(seed).standard_normal(ROWS[bits]) * 3).astype(np.float16)
        xpairs = [np.full(n, h2_of(x[[r0]], x[[r1]])[0], dtype=np.uint32) for r0, r1 in pair_rows(bits)]
        want_lo, want_hi = emulate_step(bits, words, z, xpairs)
        lo, hi = torch.empty(n), torch.empty(n)
        _step_kernel[(1,)](t(words), torch.from_numpy(x.view(np.int32).copy()),
                           torch.from_numpy(z.astype(np.uint8)), lo, hi, n, BITS=bits, N=n)
        np.testing.assert_array_equal(lo.numpy().view(np.uint32), want_lo.view(np.uint32))
        np.testing.assert_array_equal(hi.numpy().view(np.uint32), want_hi.view(np.uint32))


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group", [None, 64])
@pytest.mark.parametrize("n_o,splits,n", [(0, 1, 64), (1, 3, 40), (40, 7, 40), (40, 2, 64)])
def test_half2_gemv_within_its_error_bound(bits, group, n_o, splits, n):
    """owq_gemv's fp16x2 path (forced splits, weak columns, N on and off the tile grid) against float64."""
    layer, w64 = make_layer(bits, group, n_o, torch.float16, n=n, k=256)
    layer.to_layout("words3" if bits == 3 else "v1")  # 3 bits: the kernel words, which the fp16x2 path reads
    planes = list(layer.planes.values())
    assert len(planes) == 1
    args = (layer.weak_weight, planes, layer.scales, layer.zeros, layer.weak_idx, layer.bias, bits)
    x = (torch.randn(2, 256) * 2).half()
    assert triton_backend.half2_path(x, layer.scales, 256, group or 256)
    y = triton_backend.gemv(x, *args, split_k=splits)
    ref = x.double() @ w64.t() + layer.bias.double()
    bound = half2_bound(bits, w64, layer.weak_idx, x, ref)
    assert ((y.double() - ref).abs() <= bound).all(), ((y.double() - ref).abs() / bound).max()


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group,splits", [(None, 1), (64, 3)])
def test_half2_gemv_overflowing_step_falls_back_to_fp32(bits, group, splits):
    """|x| ≈ 5000 on quantized columns overflows fp16x2 step partials (inf without the fallback): the outputs stay
    finite and within the documented bound, and the overflowed ones within the fp32 path's (docs/kernels.md)."""
    k = 256
    layer, w64 = make_layer(bits, group, 40, torch.float16, n=64, k=k)
    layer.to_layout("words3" if bits == 3 else "v1")
    args = (layer.weak_weight, list(layer.planes.values()), layer.scales, layer.zeros, layer.weak_idx, layer.bias,
            bits)
    x, over = overflowing_x(bits, layer, w64, k)
    assert over.any() and not over.all()  # some steps overflow in fp16, some outputs do not
    assert (x.double() @ w64.t() + layer.bias.double()).abs().max() < 60000  # while y fits fp16
    assert triton_backend.half2_path(x, layer.scales, k, group or k)
    y = triton_backend.gemv(x, *args, split_k=splits)
    ref = x.double() @ w64.t() + layer.bias.double()
    assert torch.isfinite(y).all()
    err = (y.double() - ref).abs()
    assert (err <= half2_bound(bits, w64, layer.weak_idx, x, ref)).all()
    terms = (w64.unsqueeze(0) * x.double().unsqueeze(1)).abs().sum(-1)
    assert (err[over] <= (2.0**-20 * terms + U * ref.abs())[over]).all()  # recomputed in fp32


@pytest.mark.parametrize("bits", [2, 3])
def test_fp16_gemv_without_its_fp16x2_decode_takes_the_fp32_path(bits):
    """The fp16x2 decode exists for 4 bits and for 3 bits in the 3-bit words: a 2-bit fp16 layer, and a 3-bit one
    given only the v1 planes (as under torch.compile or a CUDA graph captured before the words were built), take
    the fp32 path, within its bound (2 bits ran the 4-bit decode on 2-bit words once: errors larger than the
    outputs; the fp16x2 bound here would be 2^-7 Σ|W x|, this one is 2^-20)."""
    layer, w64 = make_layer(bits, None, 5, torch.float16, n=64, k=256, sym=True)
    args = (layer.weak_weight, list(layer.planes.values()), layer.scales, layer.zeros, layer.weak_idx, layer.bias,
            bits)
    x = (torch.randn(2, 256) * 2).half()
    y = triton_backend.gemv(x, *args, split_k=3)
    ref = x.double() @ w64.t() + layer.bias.double()
    terms = (w64.unsqueeze(0) * x.double().unsqueeze(1)).abs().sum(-1)
    assert ((y.double() - ref).abs() <= 2.0**-20 * terms + U * ref.abs()).all()


def test_half2_path_needs_fp16_and_aligned_rows():
    """Activations the fp16x2 path cannot take go to the fp32 path (same results, tested in test_kernels.py)."""
    s16 = torch.ones(1, 8, dtype=torch.float16)
    x = torch.zeros(3, 264, dtype=torch.float16)
    assert triton_backend.half2_path(x[:, :256], s16, 256, 256)
    assert not triton_backend.half2_path(x[:, :256].float(), s16, 256, 256)  # fp32 activations
    assert not triton_backend.half2_path(x[:, :256], s16.float(), 256, 256)  # fp32 scales
    assert not triton_backend.half2_path(x[:, 1:257], s16, 256, 256)  # rows not 16-byte aligned
    assert not triton_backend.half2_path(x[:, :200], s16, 200, 200)  # K not a multiple of 32
    assert not triton_backend.half2_path(x[:, :256], s16, 256, 16)  # groups of 16 rows
