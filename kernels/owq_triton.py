"""Triton kernels for owq-pack v1 layers (imported by path from wct.kernels.triton_backend).

Layout (docs/owq-pack.md §3): codes packed along K in int32 bit planes [K*w/32, N], N contiguous;
a 3-bit code is a 2-bit plane (bits 0-1) and a 1-bit plane (bit 2); 2- and 4-bit codes are one plane. WORDS (3 bits):
plane_a is instead the layer's 3-bit kernel words [K/32*3, N] (wct.format.layout.kernel_words3, docs/kernels.md
"3-bit words"), the one layout a 3-bit layer holds on the triton backend; every kernel here reads it.
Dequantization W[n, k] = s[g, n] * (code[k, n] - z[g, n]), g = k // group_size; it is exactly 0 at the weak columns.

owq_fwd: y = x·deq(W_q)ᵀ + x[:, idx]·W_o (+ b). Tiles (BLOCK_M, BLOCK_N), split-K over grid axis 2 into a fp32
workspace (reduced by the caller in a fixed order: deterministic). The weak columns are a K-tail of the last split:
BLOCK_O gathered activations x[:, idx] times W_o rows, looped so any n_o (including 0) works.
USE_DOT=False is the GEMV form (M ≤ 4: broadcast-multiply and tl.sum on CUDA cores, BLOCK_M may be 1).
owq_gemv: the decode GEMV (M ≤ 4, one row per program on grid axis 2), its own kernel: each packed word loaded once
as a [BLOCK_K / codes-per-word, BLOCK_N] tile and unpacked code by code with a shift;
codes dequantized by the exponent trick ((code | 0x4B000000) read as fp32 is 2^23 + code; minus 2^23 + z: exact, no
int→float conversion); scale and zero once per BLOCK_K tile (BLOCK_K divides the group), the scale applied once per
word; a 2-D fp32 accumulator [words, BLOCK_N] reduced once after the loop. Split-K over grid axis 1 is fused and deterministic: partials go to ws [splits, M, N],
an atomic ticket per (row, column tile) elects the last program, which sums the partials in split order, adds the
bias and casts. The weak columns are spread over the splits. Offsets that can pass 2^31 are int64.
HALF2 (fp16 activations and scales, K and the group multiples of 32, x rows 16-byte aligned) is owq_gemv's fp16x2
path, the CUDA fast path's arithmetic: one column per tensor element, a loop over groups (scale and zero constants
once per group) around a loop over steps of 16 (4 bits) or 32 (3 bits: from plane_a, the 3-bit kernel words of
wct.format.layout.kernel_words3 that a 3-bit layer holds on this backend) rows; per step and column one asm call
decodes code pairs into fp16x2 by LOP3 with the 0x6400 magic number, removes the zero exactly (HSUB2, or HFMA2 by
1/16 for the high nibbles), HFMA2s them against x read as half2 pairs in the same order, and the step's fp16x2
partial is flushed into the fp32 accumulator with the scale (error bound: docs/kernels.md); columns whose sum is
not finite after the loop (an overflowed step) are recomputed by the fp32 path (_split_fp32). EVEN_N (N a multiple of
BLOCK_N) drops the column mask of the plane loads. ASM selects the PTX inline assembly (asm_gemv4 / asm_gemv3 /
asm_x_pairs below); without it the same bit operations and roundings run as plain tl code (fp16x2 lanes computed in
fp64 and rounded once, as .rn), which is what TRITON_INTERPRET can execute.
owq_dx: dX = dY·deq(W_q), tiles (BLOCK_M, BLOCK_K) walking N; the caller adds dY·W_oᵀ at the weak columns.
UPCAST casts tl.dot operands to fp32; the caller sets it for bf16 under TRITON_INTERPRET (docs/kernels.md).
"""

import triton
import triton.language as tl


@triton.jit
def _codes(plane_a, plane_b, k, n, stride_a, stride_b, mask, BITS: tl.constexpr, WORDS: tl.constexpr):
    """Integer codes at (k, n) (broadcastable index tensors). WORDS: plane_a holds the 3-bit kernel words
    (wct.format.layout.kernel_words3): row p = k % 16 of lane l = (k % 32) // 16 of 32-row block b sits in word
    3b + p // 5 at bit 16l + 3(p % 5) for p < 15; row 15's bit j in word 3b + j at bit 16l + 15."""
    if WORDS:
        base = plane_a + (k // 32) * 3 * stride_a + n
        p = k % 16
        sh = (k % 32) // 16 * 16
        last = p == 15
        w = tl.load(base + tl.where(last, 0, p // 5) * stride_a, mask=mask, other=0)
        w1 = tl.load(base + stride_a, mask=mask & last, other=0)
        w2 = tl.load(base + 2 * stride_a, mask=mask & last, other=0)
        spare = ((w >> (sh + 15)) & 1) | (((w1 >> (sh + 15)) & 1) << 1) | (((w2 >> (sh + 15)) & 1) << 2)
        return tl.where(last, spare, (w >> (sh + (p % 5) * 3)) & 0x7)
    elif BITS == 3:
        lo = tl.load(plane_a + (k // 16) * stride_a + n, mask=mask, other=0)
        hi = tl.load(plane_b + (k // 32) * stride_b + n, mask=mask, other=0)
        return ((lo >> ((k % 16) * 2)) & 0x3) | (((hi >> (k % 32)) & 0x1) << 2)
    else:
        w = tl.load(plane_a + (k // (32 // BITS)) * stride_a + n, mask=mask, other=0)
        return (w >> ((k % (32 // BITS)) * BITS)) & ((1 << BITS) - 1)


@triton.jit
def _dequant(plane_a, plane_b, scales, zeros, k, n, stride_a, stride_b, stride_g, group_size, mask, BITS: tl.constexpr,
             WORDS: tl.constexpr):
    """fp32 weights W[n, k] at (k, n)."""
    code = _codes(plane_a, plane_b, k, n, stride_a, stride_b, mask, BITS, WORDS)
    g = k // group_size
    s = tl.load(scales + g * stride_g + n, mask=mask, other=0).to(tl.float32)
    z = tl.load(zeros + g * stride_g + n, mask=mask, other=0).to(tl.float32)
    return (code.to(tl.float32) - z) * s


@triton.jit
def _mac(acc, a, b, USE_DOT: tl.constexpr, UPCAST: tl.constexpr):
    """acc += a·b in fp32 (a [P, Q] activations, b [Q, R] fp32 weights)."""
    if USE_DOT:
        if UPCAST or a.dtype == tl.float32:
            acc += tl.dot(a.to(tl.float32), b, input_precision="ieee")
        else:
            acc += tl.dot(a, b.to(a.dtype))
    else:
        acc += tl.sum(a.to(tl.float32)[:, :, None] * b[None, :, :], axis=1)
    return acc


@triton.jit
def owq_fwd(
    x, plane_a, plane_b, scales, zeros, idx, wo, bias, out,
    M, N, K, n_o, group_size, k_per_split,
    stride_xm, stride_a, stride_b, stride_g, stride_wo, stride_om, stride_os,
    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_O: tl.constexpr, USE_DOT: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    WORDS: tl.constexpr = False,
):
    pid_m, pid_n, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mm, mn = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mk = rk < k_hi
        a = tl.load(x + rm[:, None] * stride_xm + rk[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
        w = _dequant(plane_a, plane_b, scales, zeros, rk[:, None], rn[None, :], stride_a, stride_b, stride_g,
                     group_size, mk[:, None] & mn[None, :], BITS, WORDS)
        acc = _mac(acc, a, w, USE_DOT, UPCAST)
    if pid_s == tl.num_programs(2) - 1:  # the weak columns: a K-tail over gathered activations
        for o0 in range(0, n_o, BLOCK_O):
            ro = o0 + tl.arange(0, BLOCK_O)
            mo = ro < n_o
            col = tl.load(idx + ro, mask=mo, other=0)
            a = tl.load(x + rm[:, None] * stride_xm + col[None, :], mask=mm[:, None] & mo[None, :], other=0.0)
            w = tl.load(wo + ro[:, None] * stride_wo + rn[None, :], mask=mo[:, None] & mn[None, :], other=0.0)
            acc = _mac(acc, a, w.to(tl.float32), USE_DOT, UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
    ptr = out + pid_s * stride_os + rm[:, None] * stride_om + rn[None, :]
    tl.store(ptr, acc.to(out.dtype.element_ty), mask=mm[:, None] & mn[None, :])


@triton.jit
def owq_dx(
    dy, plane_a, plane_b, scales, zeros, dx,
    M, N, K, group_size,
    stride_dym, stride_a, stride_b, stride_g, stride_dxm,
    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr, UPCAST: tl.constexpr, WORDS: tl.constexpr = False,
):
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mm, mk = rm < M, rk < K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        mn = rn < N
        g = tl.load(dy + rm[:, None] * stride_dym + rn[None, :], mask=mm[:, None] & mn[None, :], other=0.0)
        w = _dequant(plane_a, plane_b, scales, zeros, rk[None, :], rn[:, None], stride_a, stride_b, stride_g,
                     group_size, mn[:, None] & mk[None, :], BITS, WORDS)  # [BLOCK_N, BLOCK_K] = W[n, k]
        acc = _mac(acc, g, w, USE_DOT, UPCAST)
    tl.store(dx + rm[:, None] * stride_dxm + rk[None, :], acc.to(dx.dtype.element_ty), mask=mm[:, None] & mk[None, :])


@triton.jit
def _gemv_tile(x_row, plane_a, plane_b, k0, k_hi, rn64, mn, mz, stride_a, stride_b, BITS: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """sum over the BLOCK_K rows from k0 of (code - z) · x, as a [W, BLOCK_N] tile (W words per column, C codes per
    word, W·C = BLOCK_K). The words of each plane are loaded once as [W, BLOCK_N] tiles and stay in registers; code c
    of every word is unpacked by a shift (statically unrolled over c), so no word is loaded twice."""
    C: tl.constexpr = 16 if BITS == 3 else 32 // BITS
    W: tl.constexpr = BLOCK_K // C
    rw = tl.arange(0, W)
    mask = ((k0 + rw * C) < k_hi)[:, None] & mn[None, :]  # a word is needed when its first row is (planes: 32 rows)
    w = tl.load(plane_a + ((k0 // C + rw).to(tl.int64) * stride_a)[:, None] + rn64[None, :], mask=mask, other=0)
    if BITS == 3:  # each 1-bit word serves two 2-bit words: rows 0-15 in its low half, 16-31 in its high half
        rw2 = k0 // 16 + rw  # the 2-bit words' indices (k0 is a multiple of 16)
        hi = tl.load(plane_b + ((rw2 // 2).to(tl.int64) * stride_b)[:, None] + rn64[None, :], mask=mask, other=0)
        hi = hi >> ((rw2 % 2) * 16)[:, None]
    t = tl.zeros((W, rn64.shape[0]), dtype=tl.float32)
    for c in tl.static_range(C):
        if BITS == 3:
            code = ((w >> (2 * c)) & 0x3) | (((hi >> c) & 0x1) << 2)
        else:
            code = (w >> (c * BITS)) & ((1 << BITS) - 1)
        xv = tl.load(x_row + k0 + rw * C + c, mask=(k0 + rw * C + c) < k_hi, other=0.0).to(tl.float32)
        t += ((code | 0x4B000000).to(tl.float32, bitcast=True) - mz[None, :]) * xv[:, None]
    return t


@triton.jit
def _gemv_tile_words(x_row, words, k0, k_hi, rn64, mn, mz, stride_w, BLOCK_K: tl.constexpr):
    """_gemv_tile from the 3-bit kernel words: a [W, BLOCK_N] tile over W = BLOCK_K / 32 blocks of 32 rows (k0 % 32
    == 0), each block's three words loaded once as [W, BLOCK_N] tiles. Lane l of word j holds rows 16l + 5j + i at
    bits 16l + 3i (i < 5), and bit j of row 16l + 15 at bit 16l + 15."""
    W: tl.constexpr = BLOCK_K // 32
    rw = tl.arange(0, W)
    mask = ((k0 + rw * 32) < k_hi)[:, None] & mn[None, :]
    row3 = ((k0 // 32 + rw) * 3).to(tl.int64)
    w0 = tl.load(words + (row3 * stride_w)[:, None] + rn64[None, :], mask=mask, other=0)
    w1 = tl.load(words + ((row3 + 1) * stride_w)[:, None] + rn64[None, :], mask=mask, other=0)
    w2 = tl.load(words + ((row3 + 2) * stride_w)[:, None] + rn64[None, :], mask=mask, other=0)
    t = tl.zeros((W, rn64.shape[0]), dtype=tl.float32)
    for lane in tl.static_range(2):
        for r in tl.static_range(16):
            if r < 5:
                code = (w0 >> (16 * lane + 3 * r)) & 0x7
            elif r < 10:
                code = (w1 >> (16 * lane + 3 * (r - 5))) & 0x7
            elif r < 15:
                code = (w2 >> (16 * lane + 3 * (r - 10))) & 0x7
            else:
                code = (((w0 >> (16 * lane + 15)) & 1) | (((w1 >> (16 * lane + 15)) & 1) << 1)
                        | (((w2 >> (16 * lane + 15)) & 1) << 2))
            row = k0 + rw * 32 + 16 * lane + r
            xv = tl.load(x_row + row, mask=row < k_hi, other=0.0).to(tl.float32)
            t += ((code | 0x4B000000).to(tl.float32, bitcast=True) - mz[None, :]) * xv[:, None]
    return t


@triton.jit
def _split_fp32(x_row, plane_a, plane_b, scales, zeros, k_lo, k_hi, rn64, mn, group_size, stride_a, stride_b,
                stride_g, BITS: tl.constexpr, BLOCK_K: tl.constexpr, WORDS: tl.constexpr):
    """sum over rows [k_lo, k_hi) of W[n, k]·x_k for the columns rn64 in fp32 (owq_gemv's fp32 path, and the fp16x2
    path's fallback): BLOCK_K-row tiles (_gemv_tile, or _gemv_tile_words with WORDS), the scale applied once per
    word, a [words, BLOCK_N] accumulator reduced once at the end."""
    C: tl.constexpr = 32 if WORDS else (16 if BITS == 3 else 32 // BITS)
    acc = tl.zeros((BLOCK_K // C, rn64.shape[0]), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        g = (k0 // group_size).to(tl.int64) * stride_g
        s = tl.load(scales + g + rn64, mask=mn, other=0).to(tl.float32)
        z = tl.load(zeros + g + rn64, mask=mn, other=0)
        mz = (z.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True)  # 2^23 + z
        if WORDS:
            acc += _gemv_tile_words(x_row, plane_a, k0, k_hi, rn64, mn, mz, stride_a, BLOCK_K) * s[None, :]
        else:
            acc += _gemv_tile(x_row, plane_a, plane_b, k0, k_hi, rn64, mn, mz, stride_a, stride_b, BITS,
                              BLOCK_K) * s[None, :]
    return tl.sum(acc, axis=0)


# ---------------------------------------------------------------------------------------------------------------
# fp16x2 decode (HALF2). The PTX text is built here so tests can run it through an emulator (tests/ptx_emulator.py).

_AND_OR = 0xEA  # lop3: (a & b) | c
_OR_AND = 0xF8  # lop3: a | (b & c)


def _dot_lines(pairs: list[str], x0: int) -> list[str]:
    """The dot of the decoded pairs with the x pairs $x0, $x0+1, ...: p = sum_i pairs[i] · x_i in fp16x2 (a MUL,
    then FMAs, each lane rounded once per instruction); its two lanes go to $0 and $1 as fp32."""
    out = []
    for i, (decode, v) in enumerate(pairs):
        out += decode + [f"mul.rn.f16x2 p, {v}, ${x0};" if i == 0 else f"fma.rn.f16x2 p, {v}, ${x0 + i}, p;"]
    return out + ["mov.b32 {l, h}, p;", "cvt.f32.f16 $0, l;", "cvt.f32.f16 $1, h;"]


def _asm(lines: list[str], weights: int = 0) -> str:
    """An asm block; a decode block names the weights it decodes in a PTX comment (read by wct/kernels/budget.py)."""
    return "{\n" + (f"// owq-decode {weights} weights\n" if weights else "") + "\n".join(lines) + "\n}"


def asm_gemv4() -> str:
    """16 rows of one column at 4 bits. In: $2, $3 the two words (rows 0-7, 8-15), $4 = 1024 + z, $5 = -(64 + z),
    $6 = 1/16 (fp16x2, both lanes), $7..$14 the x pairs (x_r, x_{r+4}) of rows r = 0-3, 8-11. Out: $0, $1 the two
    lanes of the fp16x2 partial as fp32. A word's nibble c sits at bits 4c: lop3 with 0x000f000f | 0x6400 gives
    (1024 + code_c, 1024 + code_{c+4}) for c = 0 (2 after >> 8), with 0x00f000f0 the same times 16 for c = 1 (3):
    HSUB2 of 1024 + z, or HFMA2 by 1/16 plus -(64 + z), gives code - z exactly."""
    pairs = []
    for w in range(2):
        src = f"${2 + w}"
        for c in range(4):
            decode = [f"shr.u32 u, {src}, 8;"] if c == 2 else []
            mask = "0x00f000f0" if c % 2 else "0x000f000f"
            decode.append(f"lop3.b32 v, {src if c < 2 else 'u'}, {mask}, 0x64006400, {_AND_OR:#x};")
            decode.append("fma.rn.f16x2 v, v, $6, $5;" if c % 2 else "sub.rn.f16x2 v, v, $4;")
            pairs.append((decode, "v"))
    return _asm([".reg .b32 v, u, p;", ".reg .b16 l, h;"] + _dot_lines(pairs, 7), 16)


def _exp3(q: int) -> int:
    """Exponent field 25 - q in both lanes: a code at mantissa bits q..q+2 then reads 2^(10-q) + code."""
    return ((25 - q) << 10) * 0x00010001


def asm_gemv3() -> str:
    """32 rows of one column at 3 bits from the kernels' 3-bit words (wct.format.layout.kernel_words3: lane l of word j holds
    rows 16l + 5j + i at bits 3i, i < 5, and bit j of row 16l + 15 at bit 15). In: $2..$4 the three words, $5..$7 the
    zero constants 2^(10-q) + z for q = 0, 3, 6 (fp16x2), $8..$23 the x pairs (x_p, x_{p+16}), p = 0..15. Out: $0, $1
    the two lanes of the fp16x2 partial as fp32. Pair 5j + i: slots 0-2 in place (q = 0, 3, 6), slots 3-4 from the
    word shifted right by 9 (q = 0, 3), one lop3 each that also writes the exponent field 25 - q, so each lane reads
    2^(10-q) + code and one HSUB2 leaves code - z exactly; pair 15 gathers its spare bits at q = 6 from word 0 >> 9,
    word 1 >> 8 and word 2 >> 7 (three lop3)."""
    pairs = []
    for j in range(3):
        w, s = f"${2 + j}", f"s{j}"
        for i in range(5):
            q = 3 * i if i < 3 else 3 * (i - 3)
            decode = [f"shr.u32 {s}, {w}, 9;"] if i == 3 else []
            decode += [f"lop3.b32 v, {w if i < 3 else s}, {0x00070007 << q:#010x}, {_exp3(q):#010x}, {_AND_OR:#x};",
                       f"sub.rn.f16x2 v, v, ${5 + q // 3};"]
            pairs.append((decode, "v"))
    pairs.append((["shr.u32 e, $3, 8;", "shr.u32 f, $4, 7;",
                   f"lop3.b32 v, s0, 0x00400040, {_exp3(6):#010x}, {_AND_OR:#x};",
                   f"lop3.b32 v, v, e, 0x00800080, {_OR_AND:#x};",
                   f"lop3.b32 v, v, f, 0x01000100, {_OR_AND:#x};",
                   "sub.rn.f16x2 v, v, $7;"], "v"))
    return _asm([".reg .b32 s<3>, e, f, v, p;", ".reg .b16 l, h;"] + _dot_lines(pairs, 8), 32)


ASM_GEMV4 = tl.constexpr(asm_gemv4())
ASM_GEMV3 = tl.constexpr(asm_gemv3())
_CONSTRAINTS4 = tl.constexpr("=f,=f," + ",".join(["r"] * 13))
_CONSTRAINTS3 = tl.constexpr("=f,=f," + ",".join(["r"] * 22))


@triton.jit
def _h2(u):
    """The fp16x2 bits u (int32) as its two lanes in fp64 (exact)."""
    lo = (u & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float64)
    hi = ((u >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float64)
    return lo, hi


@triton.jit
def _pack_h2(lo, hi):
    """fp16x2 bits of two exact fp64 lanes, each rounded once to fp16 (round to nearest even, as .rn)."""
    a = lo.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.int32)
    b = hi.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.int32)
    return a | (b << 16)


@triton.jit
def _fma_h2(a, b, c):
    """fma.rn.f16x2 on int32 bit patterns: each lane a·b + c exact in fp64 (for the operands here: at most 44
    significant bits, docs/kernels.md), rounded once."""
    a0, a1 = _h2(a)
    b0, b1 = _h2(b)
    c0, c1 = _h2(c)
    return _pack_h2(a0 * b0 + c0, a1 * b1 + c1)


@triton.jit
def _sub_h2(a, b):
    """sub.rn.f16x2 on int32 bit patterns (exact here: both lanes hold small integers)."""
    a0, a1 = _h2(a)
    b0, b1 = _h2(b)
    return _pack_h2(a0 - b0, a1 - b1)


@triton.jit
def _dot_h2(t, xp):
    """The tl form of _dot_lines: t and xp are tuples of fp16x2 int32 tensors; the two lanes of the partial as fp32."""
    a0, a1 = _h2(t[0])
    x0, x1 = _h2(xp[0])
    p = _pack_h2(a0 * x0, a1 * x1)
    for i in tl.static_range(1, len(t)):
        p = _fma_h2(t[i], xp[i], p)
    lo, hi = _h2(p)
    return lo.to(tl.float32), hi.to(tl.float32)


def asm_x_pairs(d: int, rows: int) -> str:
    """The x pairs (x_r, x_{r+D}) of one step of ``rows`` rows, blocks of 2D rows one after the other: D = 4 (4 bits,
    16 rows: r in [0, 4) then [8, 12)) or 16 (3 bits, 32 rows: r in [0, 16)). In: $(rows/2) the address of the
    step's first x half (16-byte aligned). Out: $0..$(rows/2 - 1) the fp16x2 pairs. Loaded by 128-bit loads and
    paired by PRMT 0x5410 (low halves) / 0x7632 (high halves)."""
    words = rows // 2  # x halves of the step / 2
    lines = [f".reg .b32 q<{words}>;"]
    lines += [f"ld.global.nc.v4.b32 {{q{4 * i}, q{4 * i + 1}, q{4 * i + 2}, q{4 * i + 3}}}, [${words} + {16 * i}];"
              for i in range(words // 4)]
    out = 0
    for base in range(0, words, d):  # the word of rows 2j, 2j+1 pairs with the word D rows later
        for j in range(d // 2):
            for sel in ("0x5410", "0x7632"):
                lines.append(f"prmt.b32 ${out}, q{base + j}, q{base + j + d // 2}, {sel};")
                out += 1
    return _asm(lines)


ASM_X4 = tl.constexpr(asm_x_pairs(4, 16))
ASM_X3 = tl.constexpr(asm_x_pairs(16, 32))


@triton.jit
def _x_pairs(xw, D: tl.constexpr, ASM: tl.constexpr):
    """The fp16x2 x pairs of a step (asm_x_pairs) from the int32 words (halves 2j, 2j+1) of the x row at xw."""
    if ASM:
        addr = xw.to(tl.int64, bitcast=True)
        if D == 4:
            out = tl.inline_asm_elementwise(ASM_X4, "=r,=r,=r,=r,=r,=r,=r,=r,l", [addr], dtype=(tl.int32,) * 8,
                                            is_pure=True, pack=1)
        else:
            out = tl.inline_asm_elementwise(ASM_X3, ",".join(["=r"] * 16) + ",l", [addr], dtype=(tl.int32,) * 16,
                                            is_pure=True, pack=1)
    else:
        out = ()
        BLOCKS: tl.constexpr = 2 if D == 4 else 1  # blocks of 2D rows per step (16 or 32 rows)
        for base in tl.static_range(BLOCKS):
            for j in tl.static_range(D // 2):
                qa = tl.load(xw + base * D + j)
                qb = tl.load(xw + base * D + j + D // 2)
                out = out + ((qa & 0xFFFF) | (qb << 16), ((qa >> 16) & 0xFFFF) | (qb & -65536))
    return out


@triton.jit
def _step4(pa, stride_a, xw, mn, z0, z1, sixteenth, ASM: tl.constexpr):
    """16 rows of the columns at 4 bits (words at pa, pa + stride_a; x words at xw): the two fp32 lanes of each
    column's fp16x2 partial (asm_gemv4)."""
    w0 = tl.load(pa, mask=mn)
    w1 = tl.load(pa + stride_a, mask=mn)
    xp = _x_pairs(xw, 4, ASM)
    if ASM:
        lo, hi = tl.inline_asm_elementwise(ASM_GEMV4, _CONSTRAINTS4,
                                           [w0, w1, z0, z1, sixteenth, xp[0], xp[1], xp[2], xp[3], xp[4], xp[5],
                                            xp[6], xp[7]], dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
    else:
        t = ()
        for w in tl.static_range(2):
            word = w0 if w == 0 else w1
            for c in tl.static_range(4):
                u = word if c < 2 else word >> 8
                v = (u & (0x00F000F0 if c % 2 else 0x000F000F)) | 0x64006400
                t = t + ((_fma_h2(v, sixteenth, z1) if c % 2 else _sub_h2(v, z0)),)
        lo, hi = _dot_h2(t, xp)
    return lo, hi


@triton.jit
def _step3(pw, stride_w, xw, mn, zc, ASM: tl.constexpr):
    """32 rows of the columns at 3 bits (the three 3-bit words at pw, pw + stride_w, pw + 2 stride_w): the two fp32
    lanes of each column's fp16x2 partial (asm_gemv3)."""
    w0 = tl.load(pw, mask=mn)
    w1 = tl.load(pw + stride_w, mask=mn)
    w2 = tl.load(pw + 2 * stride_w, mask=mn)
    xp = _x_pairs(xw, 16, ASM)
    if ASM:
        lo, hi = tl.inline_asm_elementwise(ASM_GEMV3, _CONSTRAINTS3,
                                           [w0, w1, w2, zc[0], zc[1], zc[2], xp[0], xp[1], xp[2], xp[3], xp[4],
                                            xp[5], xp[6], xp[7], xp[8], xp[9], xp[10], xp[11], xp[12], xp[13], xp[14],
                                            xp[15]], dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
    else:  # >> is arithmetic on int32, but every mask below keeps only bits the word itself supplies
        t = ()
        for j in tl.static_range(3):
            w = w0 if j == 0 else (w1 if j == 1 else w2)
            for i in tl.static_range(5):
                Q: tl.constexpr = 3 * i if i < 3 else 3 * (i - 3)
                src = w if i < 3 else w >> 9
                v = (src & (0x00070007 << Q)) | (((25 - Q) << 10) * 0x00010001)
                t = t + (_sub_h2(v, zc[Q // 3]),)
        v = ((w0 >> 9) & 0x00400040) | (19 << 10) * 0x00010001 | ((w1 >> 8) & 0x00800080) | ((w2 >> 7) & 0x01000100)
        t = t + (_sub_h2(v, zc[2]),)
        lo, hi = _dot_h2(t, xp)
    return lo, hi


@triton.jit
def _zero_consts(z, BITS: tl.constexpr):
    """The fp16x2 constants (int32 bits, both lanes) a group's zero points give the decode, built by integer ops:
    3 bits: 2^(10-q) + z for q = 0, 3, 6 (exponent field 25 - q, z at mantissa bit q); 4 bits: 1024 + z,
    -(64 + z) and 1/16."""
    zi = z.to(tl.int32)
    if BITS == 3:
        return ((zi | (25 << 10)) * 0x00010001, ((zi << 3) | (22 << 10)) * 0x00010001,
                ((zi << 6) | (19 << 10)) * 0x00010001)
    else:
        return ((zi | 0x6400) * 0x00010001, (0xD400 | (zi << 4)) * 0x00010001,
                tl.full(zi.shape, 0x2C002C00, tl.int32))


@triton.jit
def owq_gemv(
    x, plane_a, plane_b, scales, zeros, idx, wo, bias, ws, counters, y,
    M, N, K, n_o, group_size,
    stride_xm, stride_a, stride_b, stride_g, stride_wo,
    BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr,
    HAS_BIAS: tl.constexpr, HALF2: tl.constexpr = False, ASM: tl.constexpr = False, EVEN_N: tl.constexpr = False,
    WORDS: tl.constexpr = False,
):
    pid_n, pid_s, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    splits = tl.num_programs(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = rn < N
    rn64 = rn.to(tl.int64)
    x_row = x + m.to(tl.int64) * stride_xm
    k_per_split = tl.cdiv(tl.cdiv(K, splits), BLOCK_K) * BLOCK_K
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    if HALF2:  # K % 32 == 0: every step lies wholly below or above k_hi
        STEP: tl.constexpr = 32 if BITS == 3 else 16  # rows per fp16x2 partial (one asm call per column)
        sa = stride_a.to(tl.int64)
        pa0 = plane_a + rn64
        xw0 = x_row.to(tl.pointer_type(tl.int32), bitcast=True)
        mask = None if EVEN_N else mn  # EVEN_N: no column of the tile is past N, the plane loads need no mask
        out = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for g in range(k_lo // group_size, tl.cdiv(k_hi, group_size)):  # scale and zero constants once per group
            g_off = stride_g.to(tl.int64) * g
            s = tl.load(scales + g_off + rn64, mask=mn, other=0).to(tl.float32)
            zc = _zero_consts(tl.load(zeros + g_off + rn64, mask=mn, other=0), BITS)
            g_hi = tl.minimum((g + 1) * group_size, k_hi)
            for i in range(tl.maximum(g * group_size, k_lo) // STEP, g_hi // STEP):  # K % 32 == 0: whole steps
                if BITS == 3:
                    lo, hi = _step3(pa0 + i * (3 * sa), sa, xw0 + i * 16, mask, zc, ASM)  # WORDS: the kernel words
                else:
                    lo, hi = _step4(pa0 + i * (2 * sa), sa, xw0 + i * 8, mask, zc[0], zc[1], zc[2], ASM)
                out = tl.fma(s, hi, tl.fma(s, lo, out))  # the step's fp16x2 partial flushed into fp32
        # An overflowed step (|partial| > 65504) left an inf or NaN in its column's fp32 sum, and inf/NaN absorb
        # every later fma: one test per column after the loop finds every overflow. Those columns (rare: |x| in the
        # hundreds on quantized columns) take this split again in fp32; the others keep their bits.
        ok = tl.abs(out) <= 3.4028234663852886e38  # finite (NaN compares false)
        if tl.min(ok.to(tl.int32)) == 0:
            C: tl.constexpr = 32 if WORDS else (16 if BITS == 3 else 32 // BITS)  # one word per column per step
            out = tl.where(ok, out, _split_fp32(x_row, plane_a, plane_b, scales, zeros, k_lo, k_hi, rn64, mn,
                                                group_size, stride_a, stride_b, stride_g, BITS, C, WORDS))
    else:
        out = _split_fp32(x_row, plane_a, plane_b, scales, zeros, k_lo, k_hi, rn64, mn, group_size, stride_a,
                          stride_b, stride_g, BITS, BLOCK_K, WORDS)
    o_lo = (n_o * pid_s) // splits
    o_hi = (n_o * (pid_s + 1)) // splits
    for o0 in range(o_lo, o_hi, BLOCK_O):  # this split's share of the weak columns
        ro = o0 + tl.arange(0, BLOCK_O)
        mo = ro < o_hi
        xo = tl.load(x_row + tl.load(idx + ro, mask=mo, other=0), mask=mo, other=0.0).to(tl.float32)
        wt = tl.load(wo + (ro.to(tl.int64) * stride_wo)[:, None] + rn64[None, :], mask=mo[:, None] & mn[None, :],
                     other=0.0)
        out += tl.sum(wt.to(tl.float32) * xo[:, None], axis=0)
    mn_off = m.to(tl.int64) * N + rn64
    if splits > 1:
        tl.store(ws + pid_s.to(tl.int64) * M * N + mn_off, out, mask=mn)
        tile = m * tl.num_programs(0) + pid_n
        ticket = tl.atomic_add(counters + tile, 1, sem="acq_rel")
        if ticket == splits - 1:  # the last split of this tile: sum the partials in split order
            out = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for p in range(0, splits):
                out += tl.load(ws + p * M.to(tl.int64) * N + mn_off, mask=mn, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                out += tl.load(bias + rn, mask=mn, other=0.0).to(tl.float32)
            tl.store(y + mn_off, out.to(y.dtype.element_ty), mask=mn)
            tl.atomic_xchg(counters + tile, 0)  # ready for the next launch (and CUDA-graph replays)
    else:
        if HAS_BIAS:
            out += tl.load(bias + rn, mask=mn, other=0.0).to(tl.float32)
        tl.store(y + mn_off, out.to(y.dtype.element_ty), mask=mn)
