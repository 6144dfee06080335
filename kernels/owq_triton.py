"""Triton kernels for owq-pack v1 layers (imported by path from wct.kernels.triton_backend).

Layout (ARCHITECTURE.md, owq-pack v1): codes packed along K in int32 bit planes [K*w/32, N], N contiguous;
a 3-bit code is a 2-bit plane (bits 0-1) and a 1-bit plane (bit 2); 2- and 4-bit codes are one plane.
Dequantization W[n, k] = s[g, n] * (code[k, n] - z[g, n]), g = k // group_size; it is exactly 0 at the weak columns.

owq_fwd: y = x·deq(W_q)ᵀ + x[:, idx]·W_o (+ b). Tiles (BLOCK_M, BLOCK_N), split-K over grid axis 2 into a fp32
workspace (reduced by the caller in a fixed order: deterministic). The weak columns are a K-tail of the last split:
BLOCK_O gathered activations x[:, idx] times W_o rows, looped so any n_o (including 0) works.
USE_DOT=False is the GEMV form (M ≤ 4: broadcast-multiply and tl.sum on CUDA cores, BLOCK_M may be 1).
owq_dx: dX = dY·deq(W_q), tiles (BLOCK_M, BLOCK_K) walking N; the caller adds dY·W_oᵀ at the weak columns.
UPCAST casts tl.dot operands to fp32; the caller sets it for bf16 under TRITON_INTERPRET (kernels.md §4).
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
