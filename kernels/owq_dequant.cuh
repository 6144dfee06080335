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
//   3 bits (k, k+8) in each 2-bit word with the 1-bit plane aligned by one PRMT per word.
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
// or two 2-bit words plus one 1-bit word (32 rows, 3 bits). PAIRS = fp16x2 pairs per 32-bit code word; once per
// step (8 products per lane at 2 and 4 bits, 16 at 3 bits) the fp16x2 partial is converted and added to the fp32
// accumulator (error bound: docs/kernels.md).
template <int BITS> struct OwqStep {
  static constexpr int ROWS = BITS == 3 ? 32 : 16;
  static constexpr int PAIRS = BITS == 3 ? 8 : 16 / BITS;
};

// Slot of row r (0 <= r < ROWS) of a step in the staged half array: pairs (i, i + PAIRS) of each code word sit in
// slots (2i, 2i + 1), words one after the other (3 bits: two 2-bit words of 16 rows).
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

// 3 bits: pair i (rows i, i+8 of a 2-bit word) is assembled at mantissa bits q..q+2 of each half: the word shifted
// right by s puts its 2-bit codes at bits q, q+1, the aligned 1-bit word shifted left by t puts the high bits at
// q + 2, with (s, t, q) = owq_pair3(i): two shifts of the 2-bit word (4, 8) and three of the 1-bit word (1, 2, 3)
// serve the eight pairs (the Triton kernel's pair3, kernels/owq_triton.py). With exponent field 25 - q the half
// reads 2^(10-q) + code: owq_zero3_h2 builds the four 2^(10-q) + z (q = 0, 2, 4, 6) once per group, one HSUB2
// removes them. On the device the values are pinned by a volatile asm: otherwise nvcc rebuilds them in the K loop.
__host__ __device__ constexpr int owq_pair3_s(int i) { return i < 2 ? 0 : i < 6 ? 4 : 8; }
__host__ __device__ constexpr int owq_pair3_t(int i) { return i + 2 - owq_pair3_s(i); }
__host__ __device__ constexpr int owq_pair3_q(int i) { return 2 * i - owq_pair3_s(i); }

template <int C>
OWQ_HD void owq_zero3_h2(uint32_t zw, __half2 zc[4]) {
  const uint32_t zl = owq_prmt(zw, 0u, 0x4040u | C | (C << 8));  // z in both lanes
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    uint32_t v = (zl << (2 * j)) | ((25u - 2 * j) << 10) * 0x00010001u;
#ifdef __CUDA_ARCH__
    asm volatile("" : "+r"(v));
#endif
    zc[j] = owq_bits_h2(v);
  }
}

// Pairs I..7 of owq_decode_word3 (a template recursion, so every mask and magic number is an immediate).
template <int I>
OWQ_HD void owq_decode3_pairs(uint32_t a, uint32_t hb, const __half2 zc[4], __half2 out[8]) {
  if constexpr (I < 8) {
    constexpr int S = owq_pair3_s(I), T = owq_pair3_t(I), Q = owq_pair3_q(I);
    const uint32_t lo = owq_lop3i<OWQ_AND_OR, (0x00030003u << Q), ((25u - Q) << 10) * 0x00010001u>(a >> S);
    out[I] = owq_hsub2(owq_bits_h2(owq_lop3i<OWQ_OR_AND, (0x00040004u << Q)>(lo, hb << T)), zc[Q / 2]);
    owq_decode3_pairs<I + 1>(a, hb, zc, out);
  }
}

// The 8 fp16x2 values (code - z) of rows 16h .. 16h + 15 of a 3-bit step (h = 0, 1): 2-bit word a holds those rows'
// low bits, 1-bit word b the high bits of all 32 rows; one PRMT moves b's bytes 2h, 2h + 1 to lanes 0 and 1 (rows
// 16h + i at bit i of lane 0, 16h + 8 + i at bit i of lane 1).
template <int H>
OWQ_HD void owq_decode_word3(uint32_t a, uint32_t b, const __half2 zc[4], __half2 out[8]) {
  owq_decode3_pairs<0>(a, owq_prmt(b, 0u, H ? 0x4342u : 0x4140u), zc, out);
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

// Code j (0 <= j < 32) of a 32-row block from its words (a0, a1: the 2-bit or 4-bit words in order; b: 1-bit).
template <int BITS>
OWQ_HD uint32_t owq_code32(const uint32_t (&w)[BITS == 3 ? 3 : BITS], int j) {
  if constexpr (BITS == 3) {
    return ((w[j >> 4] >> ((j & 15) * 2)) & 3u) | (((w[2] >> j) & 1u) << 2);
  } else {
    constexpr int P = 32 / BITS;
    return (w[j / P] >> ((j % P) * BITS)) & ((1u << BITS) - 1u);
  }
}

// The words holding rows k0 .. k0 + 31 (k0 % 32 == 0) of column n.
template <int BITS>
OWQ_HD void owq_load32(const int32_t* a, const int32_t* b, int64_t n_cols, int64_t k0, int64_t n,
                       uint32_t (&w)[BITS == 3 ? 3 : BITS]) {
  constexpr int A = BITS == 3 ? 2 : BITS;
  constexpr int P = BITS == 3 ? 16 : 32 / BITS;
#pragma unroll
  for (int i = 0; i < A; ++i) w[i] = static_cast<uint32_t>(a[(k0 / P + i) * n_cols + n]);
  if constexpr (BITS == 3) w[2] = static_cast<uint32_t>(b[(k0 >> 5) * n_cols + n]);
}

// Dequantize rows k0..k0+31 (k0 % 32 == 0, clipped at K) of column n into out [K, N] (the GEMM scratch).
template <int BITS, typename T, typename S>
OWQ_HD void owq_dequant_block(const int32_t* a, const int32_t* b, const S* scales, const uint8_t* zeros,
                              int64_t n_cols, int64_t n, int k0, int K, int group, T* out) {
  uint32_t w[BITS == 3 ? 3 : BITS];
  owq_load32<BITS>(a, b, n_cols, k0, n, w);
  const int64_t g = k0 / group;
  const float s = owq_to_float(scales[g * n_cols + n]);
  const float mz = owq_magic_zero(zeros[g * n_cols + n]);
#pragma unroll
  for (int j = 0; j < 32; ++j)
    if (k0 + j < K) out[(k0 + j) * n_cols + n] = owq_from_float<T>(owq_code_minus_zero(owq_code32<BITS>(w, j), mz) * s);
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
template <int BITS, int M, typename S, typename X>
OWQ_HD void owq_general_column(const int32_t* a, const int32_t* b, const S* scales, const uint8_t* zeros, int64_t N,
                               int64_t n, int k_lo, int k_hi, int group, const X& xs, float acc[1][M]) {
  for (int k0 = k_lo; k0 < k_hi; k0 += 32) {
    uint32_t w[BITS == 3 ? 3 : BITS];
    owq_load32<BITS>(a, b, N, k0, n, w);
    const int64_t g = k0 / group;
    const float s = owq_to_float(scales[g * N + n]);
    const float mz = owq_magic_zero(zeros[g * N + n]);
    float part[M] = {};
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const float v = owq_code_minus_zero(owq_code32<BITS>(w, j), mz);
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
// A step whose fp16x2 partial overflows (|partial| > 65504: |x| in the hundreds on quantized columns) leaves inf or
// NaN in acc, and inf/NaN absorb every later fma: so one test per output after the loop finds every overflow, and
// only those outputs are recomputed with the general path's fp32 arithmetic (rare; the others keep their bits).
template <int BITS, int M>
OWQ_HD void owq_fast_columns(const int32_t* a, const int32_t* b, const __half* scales, const uint8_t* zeros,
                             int64_t N, int64_t n0, int k_lo, int k_hi, int group, const __half* xs, int ld,
                             float acc[OWQ_COLS][M]) {
  constexpr int R = OwqStep<BITS>::ROWS, P = OwqStep<BITS>::PAIRS;
  constexpr int A_ROWS = BITS == 3 ? 16 : 32 / BITS;  // rows of K per word of plane a
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
    __half2 zh[OWQ_COLS][BITS == 3 ? 4 : 1];  // 1024 + z (2, 4 bits) or the four 2^(10-q) + z (3 bits)
    if constexpr (BITS == 3) {
      owq_zero3_h2<0>(zw, zh[0]), owq_zero3_h2<1>(zw, zh[1]), owq_zero3_h2<2>(zw, zh[2]), owq_zero3_h2<3>(zw, zh[3]);
    } else {
      zh[0][0] = owq_zero_h2<0>(zw), zh[1][0] = owq_zero_h2<1>(zw), zh[2][0] = owq_zero_h2<2>(zw);
      zh[3][0] = owq_zero_h2<3>(zw);
    }
    const int32_t* pa = a + (g0 / A_ROWS) * N + n0;
    const int32_t* pb = b + (g0 / 32) * N + n0;
    const __half2* xk = xs2 + (g0 - k_lo) / 2;
    for (int k = g0; k < g_end; k += R, pa += (R / A_ROWS) * N, pb += N, xk += R / 2) {
      if constexpr (BITS == 3) {  // one fp16x2 partial per 32 rows (16 products per lane), as the Triton GEMV
        __half2 t[16];
        const uint4 a0 = owq_ld128(pa), a1 = owq_ld128(pa + N), hb = owq_ld128(pb);
#pragma unroll
        for (int c = 0; c < OWQ_COLS; ++c) {
          owq_decode_word3<0>(owq_lane(a0, c), owq_lane(hb, c), zh[c], t);
          owq_decode_word3<1>(owq_lane(a1, c), owq_lane(hb, c), zh[c], t + 8);
          owq_dot_word<M, 16>(t, xk, ld / 2, s[c], acc[c]);
        }
      } else {
        __half2 t[8];
        uint4 w[R / A_ROWS];
#pragma unroll
        for (int i = 0; i < R / A_ROWS; ++i) w[i] = owq_ld128(pa + i * N);
#pragma unroll
        for (int c = 0; c < OWQ_COLS; ++c) {
#pragma unroll
          for (int i = 0; i < R / A_ROWS; ++i) owq_decode_word<BITS>(owq_lane(w[i], c), zh[c][0], t + i * P);
          owq_dot_word<M, 8>(t, xk, ld / 2, s[c], acc[c]);
        }
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
      owq_general_column<BITS, M>(a, b, scales, zeros, N, n0 + c, k_lo, k_lo + (k_hi - k_lo + 31) / 32 * 32, group,
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
