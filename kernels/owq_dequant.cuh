// owq-pack v1 decode helpers shared by the CUDA kernels (owq_cuda.cu) and the host-run check (owq_host_check.cu).
//
// Codes are packed along K in int32 bit planes [Kp*w/32, N] (N contiguous, Kp = K rounded up to 32): element k of
// column n sits in row k / (32/w) at bit offset (k % (32/w)) * w. A 3-bit code is a 2-bit plane (bits 0-1) plus a
// 1-bit plane (bit 2); 2- and 4-bit codes are one plane. W[n, k] = scale[g, n] * (code[k, n] - zero[g, n]),
// g = k / group (docs/owq-pack.md). Everything here is __host__ __device__ so the CPU runs the kernels' own decode
// (docs/kernels.md):
//
// - fast path (fp16 activations and scales): a word's codes are decoded in pairs into fp16x2 by one LOP3 with the
//   0x6400 magic number ((code | 0x6400) is the half 1024 + code), the zero point (as 1024 + z, built the same
//   way once per group) is removed by one exact HSUB2, and HFMA2 multiplies by x staged in shared memory as half2
//   in the same pair order (owq_slot), so the stored format is unchanged. Pairs: 4 bits (k, k+4), 2 bits (k, k+8),
//   3 bits (k, k+16) from the kernels' 3-bit words (3 per 32 rows, codes contiguous in each 16-bit half): the
//   layout a 3-bit layer holds, in place of the v1 planes, on the cuda backend (wct.format.layout.kernel_words3,
//   wct.kernels.dispatch.hold_kernel_layout; a save writes the planes). Every path here also reads it (W3).
// - general path (any dtype, any width): codes to fp32 by the exponent trick, (code | 0x4B000000) as a float is
//   2^23 + code, minus (2^23 + z): exact, with no int→float conversion.
#pragma once

#include <cfloat>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define OWQ_HD __host__ __device__ __forceinline__
#define OWQ_GEMV_MAX_M 8

OWQ_HD float owq_to_float(float v) { return v; }
OWQ_HD float owq_to_float(__half v) { return __half2float(v); }
OWQ_HD float owq_to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> OWQ_HD T owq_from_float(float v);
template <> OWQ_HD float owq_from_float<float>(float v) { return v; }
template <> OWQ_HD __half owq_from_float<__half>(float v) { return __float2half_rn(v); }
template <> OWQ_HD __nv_bfloat16 owq_from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Code of element k of column n read from the planes (a: 2-, 3-bit low or 4-bit plane; b: the 3-bit high plane).
// The scalar reference the word decoders below are checked against.
OWQ_HD uint32_t owq_code(const int32_t* a, const int32_t* b, int64_t n_cols, int64_t k, int64_t n, int bits) {
  if (bits == 3) {
    uint32_t lo = (static_cast<uint32_t>(a[(k >> 4) * n_cols + n]) >> ((k & 15) * 2)) & 3u;
    uint32_t hi = (static_cast<uint32_t>(b[(k >> 5) * n_cols + n]) >> (k & 31)) & 1u;
    return lo | (hi << 2);
  }
  const int per_word = 32 / bits;
  return (static_cast<uint32_t>(a[(k / per_word) * n_cols + n]) >> ((k % per_word) * bits)) & ((1u << bits) - 1u);
}

// ---------------------------------------------------------------------------------------------------------------
// Bit operations: LOP3 and PRMT (PTX instructions on the device, their definitions on the host).

// lop3.b32 with lookup table LUT: bit i of the result is LUT[(a_i << 2) | (b_i << 1) | c_i].
template <int LUT>
OWQ_HD uint32_t owq_lop3(uint32_t a, uint32_t b, uint32_t c) {
#ifdef __CUDA_ARCH__
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, %4;" : "=r"(d) : "r"(a), "r"(b), "r"(c), "n"(LUT));
  return d;
#else
  uint32_t d = 0;
  for (int t = 0; t < 8; ++t)
    if (LUT >> t & 1) d |= ((t & 4) ? a : ~a) & ((t & 2) ? b : ~b) & ((t & 1) ? c : ~c);
  return d;
#endif
}
// lop3 with b and c compile-time immediates (no register holds the masks), and with only c immediate.
template <int LUT, uint32_t B, uint32_t C>
OWQ_HD uint32_t owq_lop3i(uint32_t a) {
#ifdef __CUDA_ARCH__
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, %4;" : "=r"(d) : "r"(a), "n"(B), "n"(C), "n"(LUT));
  return d;
#else
  return owq_lop3<LUT>(a, B, C);
#endif
}
template <int LUT, uint32_t C>
OWQ_HD uint32_t owq_lop3i(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, %4;" : "=r"(d) : "r"(a), "r"(b), "n"(C), "n"(LUT));
  return d;
#else
  return owq_lop3<LUT>(a, b, C);
#endif
}
constexpr int OWQ_AND_OR = 0xEA;  // (a & b) | c
constexpr int OWQ_OR_AND = 0xF8;  // a | (b & c)

// prmt.b32 (byte permute of {b, a}, selector nibbles 0-7; __byte_perm).
OWQ_HD uint32_t owq_prmt(uint32_t a, uint32_t b, uint32_t sel) {
#ifdef __CUDA_ARCH__
  return __byte_perm(a, b, sel);
#else
  const uint64_t v = (static_cast<uint64_t>(b) << 32) | a;
  uint32_t d = 0;
  for (int i = 0; i < 4; ++i) d |= static_cast<uint32_t>((v >> (8 * ((sel >> (4 * i)) & 7))) & 0xff) << (8 * i);
  return d;
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// fp16x2 arithmetic (the HSUB2/HMUL2/HFMA2 instructions on the device; per lane in fp32, rounded once, on the host).

OWQ_HD __half2 owq_bits_h2(uint32_t u) {
  __half2 h;
  memcpy(&h, &u, 4);
  return h;
}
OWQ_HD __half2 owq_hsub2(__half2 a, __half2 b) {
#ifdef __CUDA_ARCH__
  return __hsub2(a, b);
#else
  const float2 x = __half22float2(a), y = __half22float2(b);
  return __floats2half2_rn(x.x - y.x, x.y - y.y);
#endif
}
OWQ_HD __half2 owq_hmul2(__half2 a, __half2 b) {
#ifdef __CUDA_ARCH__
  return __hmul2(a, b);
#else
  const float2 x = __half22float2(a), y = __half22float2(b);
  return __floats2half2_rn(x.x * y.x, x.y * y.y);
#endif
}
OWQ_HD __half2 owq_hfma2(__half2 a, __half2 b, __half2 c) {
#ifdef __CUDA_ARCH__
  return __hfma2(a, b, c);
#else
  const float2 x = __half22float2(a), y = __half22float2(b), z = __half22float2(c);
  return __floats2half2_rn(static_cast<float>(static_cast<double>(x.x) * y.x + z.x),
                           static_cast<float>(static_cast<double>(x.y) * y.y + z.y));
#endif
}

// BYTES (2, 4, 8 or 16) from src to dst, both BYTES-aligned: one load on the device.
template <int BYTES>
OWQ_HD void owq_copy(void* dst, const void* src) {
#ifdef __CUDA_ARCH__
  using V = typename std::conditional<BYTES == 16, uint4, typename std::conditional<BYTES == 8, uint2,
            typename std::conditional<BYTES == 4, uint32_t, uint16_t>::type>::type>::type;
  *static_cast<V*>(dst) = *static_cast<const V*>(src);
#else
  memcpy(dst, src, BYTES);
#endif
}
OWQ_HD void owq_copy16(void* dst, const void* src) { owq_copy<16>(dst, src); }

// ---------------------------------------------------------------------------------------------------------------
// Fast path: pair order, staged x, word decoders.

// A step is the rows of K one iteration decodes per column: two 4-bit words (16 rows), one 2-bit word (16 rows),
// or three 3-bit words (32 rows). PAIRS = fp16x2 pairs per code word (3 bits: per step); once per
// step (8 products per lane at 2 and 4 bits, 16 at 3 bits) the fp16x2 partial is converted and added to the fp32
// accumulator (error bound: docs/kernels.md).
template <int BITS> struct OwqStep {
  static constexpr int ROWS = BITS == 3 ? 32 : 16;
  static constexpr int PAIRS = BITS == 3 ? 16 : 16 / BITS;
};

// Slot of row r (0 <= r < ROWS) of a step in the staged half array: pairs (i, i + PAIRS) of each code word sit in
// slots (2i, 2i + 1), words one after the other (3 bits: the step's pairs (p, p + 16), p < 16).
template <int BITS>
OWQ_HD int owq_slot(int r) {
  constexpr int P = OwqStep<BITS>::PAIRS;
  return (r / (2 * P)) * 2 * P + 2 * (r % P) + (r / P) % 2;
}

// Stage x[m, k_lo + kk] (m < M, kk < len; zero up to rows MT and len_pad) as half in pair order into
// xs[m * ld + slot]; threads tid, tid + nthreads, ... share the work. len_pad and ld are multiples of ROWS.
template <int BITS, typename T>
OWQ_HD void owq_stage_x_pairs(const T* x, int64_t stride_x, int M, int MT, int k_lo, int len, int len_pad, int ld,
                              __half* xs, int tid, int nthreads) {
  constexpr int R = OwqStep<BITS>::ROWS;
  for (int i = tid; i < MT * len_pad; i += nthreads) {
    const int m = i / len_pad, kk = i % len_pad;
    const float v = kk < len && m < M ? owq_to_float(x[m * stride_x + k_lo + kk]) : 0.f;
    xs[m * ld + (kk / R) * R + owq_slot<BITS>(kk % R)] = __float2half_rn(v);
  }
}

// 1024 + z in both lanes of a half2 from byte c of the four packed zero points zw (one PRMT, one LOP3; no I2F).
template <int C>
OWQ_HD __half2 owq_zero_h2(uint32_t zw) {
  return owq_bits_h2(owq_lop3<OWQ_AND_OR>(owq_prmt(zw, 0u, 0x4040u | C | (C << 8)), 0x00ff00ffu, 0x64006400u));
}

// The PAIRS fp16x2 values (code - z) of one 2- or 4-bit word, in slot order (lane 0: row i, lane 1: row i + PAIRS).
template <int BITS>
OWQ_HD void owq_decode_word(uint32_t w, __half2 zh, __half2 out[OwqStep<BITS>::PAIRS]) {
  constexpr uint32_t mask = ((1u << BITS) - 1u) * 0x00010001u;
#pragma unroll
  for (int i = 0; i < OwqStep<BITS>::PAIRS; ++i)
    out[i] = owq_hsub2(owq_bits_h2(owq_lop3i<OWQ_AND_OR, mask, 0x64006400u>(w >> (i * BITS))), zh);
}

// 3 bits: the kernels' 3-bit words (wct.format.layout.kernel_words3, converted from the v1 planes once per layer by the
// backend; docs/kernels.md "3-bit words"). Per 32 rows and column three words; lane l of word j holds the codes of
// rows 16l + 5j + i at bits 3i (i < 5) and bit j of the code of row 16l + 15 at bit 15, so every pair of rows
// (p, p + 16) sits at the same bits of both lanes. A code at mantissa bits q..q+2 under exponent field 25 - q reads
// 2^(10-q) + code: slots 0-2 of a word are decoded in place (q = 0, 3, 6), slots 3-4 from the word shifted right
// by 9 (q = 0, 3), one LOP3 each; the spare bits of pair 15 sit at bit 6 of word 0 >> 9, bit 7 of word 1 >> 8 and
// bit 8 of word 2 >> 7 (q = 6). owq_zero3_h2 builds the three 2^(10-q) + z once per group, one HSUB2 removes them.
// On the device the values are pinned by a volatile asm: otherwise nvcc rebuilds them in the K loop.
__host__ __device__ constexpr uint32_t owq_exp3(int q) { return ((25u - q) << 10) * 0x00010001u; }

template <int C>
OWQ_HD void owq_zero3_h2(uint32_t zw, __half2 zc[3]) {
  const uint32_t zl = owq_prmt(zw, 0u, 0x4040u | C | (C << 8));  // z in both lanes
#pragma unroll
  for (int j = 0; j < 3; ++j) {
    uint32_t v = (zl << (3 * j)) | owq_exp3(3 * j);
#ifdef __CUDA_ARCH__
    asm volatile("" : "+r"(v));
#endif
    zc[j] = owq_bits_h2(v);
  }
}

// The code pair at mantissa bits Q..Q+2 of both lanes of w (already shifted) minus its zero constant.
template <int Q>
OWQ_HD __half2 owq_pair3(uint32_t w, const __half2 zc[3]) {
  return owq_hsub2(owq_bits_h2(owq_lop3i<OWQ_AND_OR, (0x00070007u << Q), owq_exp3(Q)>(w)), zc[Q / 3]);
}

// The 16 fp16x2 values (code - z) of a 32-row step from its three words: out[p] = (row p, row p + 16).
OWQ_HD void owq_decode_words3(uint32_t w0, uint32_t w1, uint32_t w2, const __half2 zc[3], __half2 out[16]) {
  const uint32_t w[3] = {w0, w1, w2};
#pragma unroll
  for (int j = 0; j < 3; ++j) {
    const uint32_t s = w[j] >> 9;
    out[5 * j] = owq_pair3<0>(w[j], zc), out[5 * j + 1] = owq_pair3<3>(w[j], zc);
    out[5 * j + 2] = owq_pair3<6>(w[j], zc), out[5 * j + 3] = owq_pair3<0>(s, zc);
    out[5 * j + 4] = owq_pair3<3>(s, zc);
  }
  uint32_t v = owq_lop3i<OWQ_AND_OR, 0x00400040u, owq_exp3(6)>(w0 >> 9);
  v = owq_lop3i<OWQ_OR_AND, 0x00800080u>(v, w1 >> 8);
  v = owq_lop3i<OWQ_OR_AND, 0x01000100u>(v, w2 >> 7);
  out[15] = owq_hsub2(owq_bits_h2(v), zc[2]);
}

// acc[m] += sum over PAIRS pairs (a step) of (code - z) * x, with x the step's staged pairs for row m: one
// HMUL2/HFMA2 per pair in fp16, then the half2 partial goes to fp32 scaled by the column's scale (fp32 accumulate).
template <int M, int PAIRS>
OWQ_HD void owq_dot_word(const __half2 t[PAIRS], const __half2* xs2, int ld2, float s, float acc[M]) {
#pragma unroll
  for (int m = 0; m < M; ++m) {
    __half2 xv[PAIRS];  // 128-bit reads of the staged pairs (xs2 + m * ld2 is 16-byte aligned)
#pragma unroll
    for (int i = 0; i < PAIRS; i += 4) owq_copy16(xv + i, xs2 + m * ld2 + i);
    __half2 p = owq_hmul2(t[0], xv[0]);
#pragma unroll
    for (int i = 1; i < PAIRS; ++i) p = owq_hfma2(t[i], xv[i], p);
    const float2 f = __half22float2(p);
    acc[m] = fmaf(s, f.x, fmaf(s, f.y, acc[m]));
  }
}

// ---------------------------------------------------------------------------------------------------------------
// General path: fp32 weights by the exponent trick.

// code - z as an exact float: (code | 0x4B000000) reads as 2^23 + code.
OWQ_HD float owq_code_minus_zero(uint32_t code, float magic_z) {
  uint32_t u = code | 0x4B000000u;
  float f;
  memcpy(&f, &u, 4);
  return f - magic_z;
}
OWQ_HD float owq_magic_zero(uint32_t z) {  // 2^23 + z, the same trick
  return owq_code_minus_zero(z, 0.f);
}

// Code j (0 <= j < 32) of a 32-row block from its words (a0, a1: the 2-bit or 4-bit words in order; b: 1-bit). W3:
// the block's three 3-bit kernel words (wct.format.layout.kernel_words3): lane l = j / 16 of word p / 5 holds row
// p = j % 16 < 15 at bit 16l + 3(p % 5); row 15's bit i sits in word i at bit 16l + 15.
template <int BITS, bool W3 = false>
OWQ_HD uint32_t owq_code32(const uint32_t (&w)[BITS == 3 ? 3 : BITS], int j) {
  if constexpr (W3) {
    static_assert(BITS == 3, "the kernel words hold 3-bit codes");
    const int l = 16 * (j >> 4), p = j & 15;
    if (p < 15) return (w[p / 5] >> (l + 3 * (p % 5))) & 7u;
    return ((w[0] >> (l + 15)) & 1u) | (((w[1] >> (l + 15)) & 1u) << 1) | (((w[2] >> (l + 15)) & 1u) << 2);
  } else if constexpr (BITS == 3) {
    return ((w[j >> 4] >> ((j & 15) * 2)) & 3u) | (((w[2] >> j) & 1u) << 2);
  } else {
    constexpr int P = 32 / BITS;
    return (w[j / P] >> ((j % P) * BITS)) & ((1u << BITS) - 1u);
  }
}

// The words holding rows k0 .. k0 + 31 (k0 % 32 == 0) of column n; W3: a is the 3-bit kernel words (b unused).
template <int BITS, bool W3 = false>
OWQ_HD void owq_load32(const int32_t* a, const int32_t* b, int64_t n_cols, int64_t k0, int64_t n,
                       uint32_t (&w)[BITS == 3 ? 3 : BITS]) {
  if constexpr (W3) {
#pragma unroll
    for (int i = 0; i < 3; ++i) w[i] = static_cast<uint32_t>(a[((k0 >> 5) * 3 + i) * n_cols + n]);
  } else {
    constexpr int A = BITS == 3 ? 2 : BITS;
    constexpr int P = BITS == 3 ? 16 : 32 / BITS;
#pragma unroll
    for (int i = 0; i < A; ++i) w[i] = static_cast<uint32_t>(a[(k0 / P + i) * n_cols + n]);
    if constexpr (BITS == 3) w[2] = static_cast<uint32_t>(b[(k0 >> 5) * n_cols + n]);
  }
}

// Dequantize rows k0..k0+31 (k0 % 32 == 0, clipped at K) of column n into out [K, N] (the GEMM scratch); W3: from
// the 3-bit kernel words in a.
template <int BITS, bool W3 = false, typename T, typename S>
OWQ_HD void owq_dequant_block(const int32_t* a, const int32_t* b, const S* scales, const uint8_t* zeros,
                              int64_t n_cols, int64_t n, int k0, int K, int group, T* out) {
  uint32_t w[BITS == 3 ? 3 : BITS];
  owq_load32<BITS, W3>(a, b, n_cols, k0, n, w);
  const int64_t g = k0 / group;
  const float s = owq_to_float(scales[g * n_cols + n]);
  const float mz = owq_magic_zero(zeros[g * n_cols + n]);
#pragma unroll
  for (int j = 0; j < 32; ++j)
    if (k0 + j < K)
      out[(k0 + j) * n_cols + n] = owq_from_float<T>(owq_code_minus_zero(owq_code32<BITS, W3>(w, j), mz) * s);
}

// ---------------------------------------------------------------------------------------------------------------
// Per-thread GEMV bodies (the kernels in owq_cuda.cu call these; owq_host_check.cu runs them on the CPU).

constexpr int OWQ_COLS = 4;  // output columns per thread on the fast path: one 128-bit load per plane row

// Row kk of the split's x for row m: the general kernel's fp32 copy in natural order, xs [M][ld].
struct OwqStagedF32 {
  const float* xs;
  int ld;
  OWQ_HD float operator()(int m, int kk) const { return xs[m * ld + kk]; }
};
// The same from the fast path's half copy in pair order (owq_stage_x_pairs), zero from row len on.
template <int BITS> struct OwqStagedPairs {
  const __half* xs;
  int ld, len;
  OWQ_HD float operator()(int m, int kk) const {
    constexpr int R = OwqStep<BITS>::ROWS;
    return kk < len ? __half2float(xs[m * ld + (kk / R) * R + owq_slot<BITS>(kk % R)]) : 0.f;
  }
};

OWQ_HD uint4 owq_ld128(const int32_t* p) {
#ifdef __CUDA_ARCH__
  return __ldg(reinterpret_cast<const uint4*>(p));
#else
  uint4 v;
  memcpy(&v, p, 16);
  return v;
#endif
}
OWQ_HD uint32_t owq_lane(const uint4& v, int c) { return c == 0 ? v.x : c == 1 ? v.y : c == 2 ? v.z : v.w; }

// General path: acc[0][m] += sum_k W[n, k] * xs(m, k - k_lo) over rows [k_lo, k_hi) (multiples of 32, groups
// a multiple of 32 or group >= k_hi); 32 rows per iteration, fully unrolled. xs reads the split's staged x:
// OwqStagedF32 (the general kernel's fp32 copy) or OwqStagedPairs (the fast path's half2 copy, for its fallback).
// W3: the codes are the 3-bit kernel words in a.
template <int BITS, int M, bool W3 = false, typename S, typename X>
OWQ_HD void owq_general_column(const int32_t* a, const int32_t* b, const S* scales, const uint8_t* zeros, int64_t N,
                               int64_t n, int k_lo, int k_hi, int group, const X& xs, float acc[1][M]) {
  for (int k0 = k_lo; k0 < k_hi; k0 += 32) {
    uint32_t w[BITS == 3 ? 3 : BITS];
    owq_load32<BITS, W3>(a, b, N, k0, n, w);
    const int64_t g = k0 / group;
    const float s = owq_to_float(scales[g * N + n]);
    const float mz = owq_magic_zero(zeros[g * N + n]);
    float part[M] = {};
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const float v = owq_code_minus_zero(owq_code32<BITS, W3>(w, j), mz);
#pragma unroll
      for (int m = 0; m < M; ++m) part[m] = fmaf(v, xs(m, k0 - k_lo + j), part[m]);
    }
#pragma unroll
    for (int m = 0; m < M; ++m) acc[0][m] = fmaf(s, part[m], acc[0][m]);
  }
}

// Fast path: acc[c][m] = sum_k W[n0 + c, k] * x[m, k] for the OWQ_COLS columns n0.. (n0 % 4 == 0, N % 4 == 0) over
// rows [k_lo, k_hi) (k_lo % 32 == 0, k_hi - k_lo a multiple of the step; groups multiples of 32, or group >= k_hi
// for one group). x is staged in xs [M][ld] in pair order from k_lo. Scales and 1024 + z are read once per group.
// The loop reads plane a (2, 4 bits) or the 3-bit kernel words w3 (3 bits, for the fallback too; a, b unused).
// A step whose fp16x2 partial overflows (|partial| > 65504: |x| in the hundreds on quantized columns) leaves inf or
// NaN in acc, and inf/NaN absorb every later fma: so one test per output after the loop finds every overflow, and
// only those outputs are recomputed with the general path's fp32 arithmetic (rare; the others keep their bits).
template <int BITS, int M>
OWQ_HD void owq_fast_columns(const int32_t* a, const int32_t* b, const int32_t* w3, const __half* scales,
                             const uint8_t* zeros, int64_t N, int64_t n0, int k_lo, int k_hi, int group,
                             const __half* xs, int ld, float acc[OWQ_COLS][M]) {
  constexpr int R = OwqStep<BITS>::ROWS, P = OwqStep<BITS>::PAIRS;
  constexpr int WORDS = BITS == 3 ? 3 : R * BITS / 32;  // code words per column and step
  const __half2* xs2 = reinterpret_cast<const __half2*>(xs);
#pragma unroll
  for (int c = 0; c < OWQ_COLS; ++c)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[c][m] = 0.f;
  for (int g0 = k_lo; g0 < k_hi;) {
    const int64_t g = g0 / group;
    const int g_end = static_cast<int>((g + 1) * group < k_hi ? (g + 1) * group : k_hi);
    __half sh[OWQ_COLS];
    owq_copy<sizeof(sh)>(sh, scales + g * N + n0);
    uint32_t zw;
    owq_copy<4>(&zw, zeros + g * N + n0);
    const float s[OWQ_COLS] = {__half2float(sh[0]), __half2float(sh[1]), __half2float(sh[2]), __half2float(sh[3])};
    __half2 zh[OWQ_COLS][BITS == 3 ? 3 : 1];  // 1024 + z (2, 4 bits) or the three 2^(10-q) + z (3 bits)
    if constexpr (BITS == 3) {
      owq_zero3_h2<0>(zw, zh[0]), owq_zero3_h2<1>(zw, zh[1]), owq_zero3_h2<2>(zw, zh[2]), owq_zero3_h2<3>(zw, zh[3]);
    } else {
      zh[0][0] = owq_zero_h2<0>(zw), zh[1][0] = owq_zero_h2<1>(zw), zh[2][0] = owq_zero_h2<2>(zw);
      zh[3][0] = owq_zero_h2<3>(zw);
    }
    const int32_t* pw = (BITS == 3 ? w3 : a) + (g0 / R) * WORDS * N + n0;
    const __half2* xk = xs2 + (g0 - k_lo) / 2;
    for (int k = g0; k < g_end; k += R, pw += WORDS * N, xk += R / 2) {
      __half2 t[R / 2];  // one fp16x2 partial per step: 8 products per lane (2, 4 bits), 16 (3 bits)
      uint4 w[WORDS];
#pragma unroll
      for (int i = 0; i < WORDS; ++i) w[i] = owq_ld128(pw + i * N);
#pragma unroll
      for (int c = 0; c < OWQ_COLS; ++c) {
        if constexpr (BITS == 3) {
          owq_decode_words3(owq_lane(w[0], c), owq_lane(w[1], c), owq_lane(w[2], c), zh[c], t);
        } else {
#pragma unroll
          for (int i = 0; i < WORDS; ++i) owq_decode_word<BITS>(owq_lane(w[i], c), zh[c][0], t + i * P);
        }
        owq_dot_word<M, R / 2>(t, xk, ld / 2, s[c], acc[c]);
      }
    }
    g0 = g_end;
  }
#pragma unroll
  for (int c = 0; c < OWQ_COLS; ++c) {
    bool finite = true;
#pragma unroll
    for (int m = 0; m < M; ++m) finite &= fabsf(acc[c][m]) <= FLT_MAX;  // NaN compares false
    if (!finite) {
      float f[1][M] = {};
      owq_general_column<BITS, M, BITS == 3>(BITS == 3 ? w3 : a, b, scales, zeros, N, n0 + c, k_lo,
                                             k_lo + (k_hi - k_lo + 31) / 32 * 32, group,
                                             OwqStagedPairs<BITS>{xs, ld, k_hi - k_lo}, f);
#pragma unroll
      for (int m = 0; m < M; ++m) acc[c][m] = fabsf(acc[c][m]) <= FLT_MAX ? acc[c][m] : f[0][m];
    }
  }
}

// Weak columns o_lo..o_hi-1 of this split: acc[c][m] += W_o[o, n0 + c] * xo[m * ldo + o - o_lo] (x[m, idx[o]]
// staged as fp32).
template <int M, int COLS, typename T>
OWQ_HD void owq_weak_columns(const T* wo, int64_t N, int64_t n0, int o_lo, int o_hi, const float* xo, int ldo,
                             float acc[COLS][M]) {
  for (int o = o_lo; o < o_hi; ++o) {
    T wv[COLS];
    owq_copy<sizeof(wv)>(wv, wo + static_cast<int64_t>(o) * N + n0);
#pragma unroll
    for (int c = 0; c < COLS; ++c)
#pragma unroll
      for (int m = 0; m < M; ++m) acc[c][m] = fmaf(owq_to_float(wv[c]), xo[m * ldo + o - o_lo], acc[c][m]);
  }
}

// The weak columns split s of `splits` handles: [s * n_o / splits, (s + 1) * n_o / splits).
OWQ_HD int owq_weak_bound(int n_o, int s, int splits) {
  return static_cast<int>(static_cast<int64_t>(n_o) * s / splits);
}
