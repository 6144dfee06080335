"""Triton kernels for owq-pack v1 layers (imported by path from wct.kernels.triton_backend).

Layout (docs/owq-pack.md §3): codes packed along K in int32 bit planes [K*w/32, N], N contiguous;
a 3-bit code is a 2-bit plane (bits 0-1) and a 1-bit plane (bit 2); 2- and 4-bit codes are one plane.
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
owq_dx: dX = dY·deq(W_q), tiles (BLOCK_M, BLOCK_K) walking N; the caller adds dY·W_oᵀ at the weak columns.
UPCAST casts tl.dot operands to fp32; the caller sets it for bf16 under TRITON_INTERPRET (docs/kernels.md).
"""

import triton
import triton.language as tl


@triton.jit
def _codes(plane_a, plane_b, k, n, stride_a, stride_b, mask, BITS: tl.constexpr):
    """Integer codes at (k, n) (broadcastable index tensors)."""
    if BITS == 3:
        lo = tl.load(plane_a + (k // 16) * stride_a + n, mask=mask, other=0)
        hi = tl.load(plane_b + (k // 32) * stride_b + n, mask=mask, other=0)
        return ((lo >> ((k % 16) * 2)) & 0x3) | (((hi >> (k % 32)) & 0x1) << 2)
    else:
        w = tl.load(plane_a + (k // (32 // BITS)) * stride_a + n, mask=mask, other=0)
        return (w >> ((k % (32 // BITS)) * BITS)) & ((1 << BITS) - 1)


@triton.jit
def _dequant(plane_a, plane_b, scales, zeros, k, n, stride_a, stride_b, stride_g, group_size, mask, BITS: tl.constexpr):
    """fp32 weights W[n, k] at (k, n)."""
    code = _codes(plane_a, plane_b, k, n, stride_a, stride_b, mask, BITS)
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
                     group_size, mk[:, None] & mn[None, :], BITS)
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
    USE_DOT: tl.constexpr, UPCAST: tl.constexpr,
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
                     group_size, mn[:, None] & mk[None, :], BITS)  # [BLOCK_N, BLOCK_K] = W[n, k]
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
        hi = tl.load(plane_b + ((k0 // 32 + rw // 2).to(tl.int64) * stride_b)[:, None] + rn64[None, :], mask=mask,
                     other=0)
        hi = hi >> ((rw % 2) * 16)[:, None]
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
def owq_gemv(
    x, plane_a, plane_b, scales, zeros, idx, wo, bias, ws, counters, y,
    M, N, K, n_o, group_size,
    stride_xm, stride_a, stride_b, stride_g, stride_wo,
    BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr,
    HAS_BIAS: tl.constexpr,
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
    C: tl.constexpr = 16 if BITS == 3 else 32 // BITS
    acc = tl.zeros((BLOCK_K // C, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        g = (k0 // group_size).to(tl.int64) * stride_g
        s = tl.load(scales + g + rn64, mask=mn, other=0).to(tl.float32)
        z = tl.load(zeros + g + rn64, mask=mn, other=0)
        mz = (z.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True)  # 2^23 + z
        acc += _gemv_tile(x_row, plane_a, plane_b, k0, k_hi, rn64, mn, mz, stride_a, stride_b, BITS,
                          BLOCK_K) * s[None, :]
    out = tl.sum(acc, axis=0)
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
