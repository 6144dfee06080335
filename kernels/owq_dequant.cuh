// owq-pack v1 unpack / dequantize helpers shared by the CUDA kernels and the host-run check (owq_host_check.cu).
//
// Codes are packed along K in int32 bit planes [K*w/32, N] (N contiguous): element k of column n sits in row
// k / (32/w) at bit offset (k % (32/w)) * w. A 3-bit code is a 2-bit plane (bits 0-1) plus a 1-bit plane (bit 2);
// 2- and 4-bit codes are one plane. W[n, k] = scale[g, n] * (code[k, n] - zero[g, n]) with g = k / group.
// Everything here is __host__ __device__: the kernels in owq_cuda.cu are thin wrappers around these functions, and
// tests run them on the CPU (owq_host_check.cu) against the Python packer and a float64 product.
#pragma once

#include <cstdint>
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
OWQ_HD uint32_t owq_code(const int32_t* a, const int32_t* b, int64_t n_cols, int64_t k, int64_t n, int bits) {
  if (bits == 3) {
    uint32_t lo = (static_cast<uint32_t>(a[(k >> 4) * n_cols + n]) >> ((k & 15) * 2)) & 3u;
    uint32_t hi = (static_cast<uint32_t>(b[(k >> 5) * n_cols + n]) >> (k & 31)) & 1u;
    return lo | (hi << 2);
  }
  const int per_word = 32 / bits;
  return (static_cast<uint32_t>(a[(k / per_word) * n_cols + n]) >> ((k % per_word) * bits)) & ((1u << bits) - 1u);
}

// The 32 codes of rows k0..k0+31 (k0 % 32 == 0) of column n, from one 1-bit word, two 2-bit words or four
// 4-bit words: the word-at-a-time decode of the GEMV.
OWQ_HD void owq_decode32(const int32_t* a, const int32_t* b, int64_t n_cols, int64_t k0, int64_t n, int bits,
                         uint32_t codes[32]) {
  if (bits == 3) {
    const uint32_t lo0 = a[(k0 >> 4) * n_cols + n], lo1 = a[((k0 >> 4) + 1) * n_cols + n];
    const uint32_t hi = b[(k0 >> 5) * n_cols + n];
#pragma unroll
    for (int j = 0; j < 32; ++j) codes[j] = (((j < 16 ? lo0 : lo1) >> ((j & 15) * 2)) & 3u) | (((hi >> j) & 1u) << 2);
    return;
  }
  const int per_word = 32 / bits;
  const uint32_t mask = (1u << bits) - 1u;
  for (int w = 0; w < bits; ++w) {
    const uint32_t word = a[(k0 / per_word + w) * n_cols + n];
    for (int j = 0; j < per_word; ++j) codes[w * per_word + j] = (word >> (j * bits)) & mask;
  }
}

template <typename S>
OWQ_HD float owq_dequant(uint32_t code, uint8_t zero, S scale) {
  return (static_cast<float>(code) - static_cast<float>(zero)) * owq_to_float(scale);
}

// GEMV body for output column n over inputs [k_lo, k_lo + len) (k_lo % 32 == 0; group % 32 == 0 or one group):
// acc[m] += sum_k W[n, k] * xs[m * ld + k - k_lo] for m < M, accumulated in fp32.
template <typename S>
OWQ_HD void owq_column_dot(const int32_t* a, const int32_t* b, const S* scales, const uint8_t* zeros, int64_t n_cols,
                           int64_t n, int k_lo, int len, int group, int bits, const float* xs, int ld, int M,
                           float acc[OWQ_GEMV_MAX_M]) {
  for (int k0 = 0; k0 < len; k0 += 32) {
    uint32_t codes[32];
    owq_decode32(a, b, n_cols, k_lo + k0, n, bits, codes);
    const int64_t g = (k_lo + k0) / group;
    const S s = scales[g * n_cols + n];
    const uint8_t z = zeros[g * n_cols + n];
    const int rows = len - k0 < 32 ? len - k0 : 32;
    for (int j = 0; j < rows; ++j) {
      const float w = owq_dequant(codes[j], z, s);
#pragma unroll
      for (int m = 0; m < OWQ_GEMV_MAX_M; ++m)
        if (m < M) acc[m] += w * xs[m * ld + k0 + j];
    }
  }
}

// The weak-column tail for column n: acc[m] += sum_o W_o[o, n] * x[m, idx[o]] (any n_o, including 0).
template <typename T>
OWQ_HD void owq_weak_tail(const T* x, int64_t stride_x, const int32_t* idx, const T* wo, int n_o, int64_t n_cols,
                          int64_t n, int M, float acc[OWQ_GEMV_MAX_M]) {
  for (int o = 0; o < n_o; ++o) {
    const float w = owq_to_float(wo[o * n_cols + n]);
    const int64_t col = idx[o];
#pragma unroll
    for (int m = 0; m < OWQ_GEMV_MAX_M; ++m)
      if (m < M) acc[m] += w * owq_to_float(x[m * stride_x + col]);
  }
}

// Dequantize rows k0..k0+31 (k0 % 32 == 0, clipped at K) of column n into out [K, N] (the GEMM scratch).
template <typename T, typename S>
OWQ_HD void owq_dequant_block(const int32_t* a, const int32_t* b, const S* scales, const uint8_t* zeros,
                              int64_t n_cols, int64_t n, int k0, int K, int group, int bits, T* out) {
  uint32_t codes[32];
  owq_decode32(a, b, n_cols, k0, n, bits, codes);
  const int64_t g = k0 / group;
  const S s = scales[g * n_cols + n];
  const uint8_t z = zeros[g * n_cols + n];
  const int rows = K - k0 < 32 ? K - k0 : 32;
  for (int j = 0; j < rows; ++j) out[(k0 + j) * n_cols + n] = owq_from_float<T>(owq_dequant(codes[j], z, s));
}
