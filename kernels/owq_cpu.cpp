// wct CPU kernels (docs/kernels.md "CPU backend"): the decode GEMV y[M, N] = x[M, K] · deq(W_q)ᵀ read straight from
// the owq-pack v1 planes, and the slab dequantization deq(W_q)ᵀ[:, n0:n1] that larger batches and dX multiply with
// the BLAS. Built by torch.utils.cpp_extension on first use (wct/kernels/cpu_backend.py) with -O3
// -march=native; the inner loops run over N, contiguous in every plane, so the compiler vectorises them (AVX-512 or
// AVX2 where the CPU has them). Threads: torch's intra-op pool (at::parallel_for over column blocks).
//
// Plane layout (wct/format/layout.py): a plane of width w is int32 [Kp * w / 32, N]; code bits of row k sit in word row
// k / (32 / w) at offset (k % (32 / w)) * w. 4-bit: one plane; 3-bit: a 2-bit plane (bits 0-1) and a 1-bit plane
// (bit 2). Dequantisation per group g = k / G: w[k, n] = s[g, n] * (code[k, n] - z[g, n]); the product of the
// small integer (code - z) with x is accumulated per group, then scaled: y = Σ_g s_g · Σ_{k∈g} x_k (q - z).
//
// Two GEMVs (WCT_CPU_GEMV, read per call): "int16" (the default on AVX-512) rounds x to 15 bits per row and takes
// exact int32 dot products with the codes (block64_int16, run_ksplit); "fp32" (block64_avx512, and the portable `block`
// everywhere else) multiplies the codes with x in fp32.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

constexpr int64_t NB = 64;  // output columns per block (4 AVX-512 vectors)

// W output columns from n0 (W is a compile-time width so the accumulators stay in registers; the ragged tail of N
// runs with W = 1).
template <int BITS, int MB, int W, typename scale_t>
void block(const float* x, int64_t ldx, const int32_t* p0, const int32_t* p1, const scale_t* scales,
           const uint8_t* zeros, float* y, int64_t K, int64_t N, int64_t G, int64_t n0) {
  constexpr int64_t nb = W;
  float out[MB][W] = {};
  for (int64_t g0 = 0; g0 < K; g0 += G) {
    const int64_t gi = g0 / G;
    float zf[W];
    for (int64_t j = 0; j < nb; ++j) zf[j] = static_cast<float>(zeros[gi * N + n0 + j]);
    float acc[MB][W] = {};
    for (int64_t k = g0; k < g0 + G; ++k) {
      float xv[MB];
      for (int m = 0; m < MB; ++m) xv[m] = x[m * ldx + k];
      if (BITS == 4) {
        const int32_t* row = p0 + (k >> 3) * N + n0;
        const int sh = (k & 7) * 4;
        for (int64_t j = 0; j < nb; ++j) {
          const float q = static_cast<float>((row[j] >> sh) & 15) - zf[j];
          for (int m = 0; m < MB; ++m) acc[m][j] += xv[m] * q;
        }
      } else {
        const int32_t* lo = p0 + (k >> 4) * N + n0;
        const int32_t* hi = p1 + (k >> 5) * N + n0;
        const int sl = (k & 15) * 2, shh = k & 31;
        for (int64_t j = 0; j < nb; ++j) {
          const int32_t c = ((lo[j] >> sl) & 3) | (((hi[j] >> shh) & 1) << 2);
          const float q = static_cast<float>(c) - zf[j];
          for (int m = 0; m < MB; ++m) acc[m][j] += xv[m] * q;
        }
      }
    }
    for (int64_t j = 0; j < nb; ++j) {
      const float s = static_cast<float>(scales[gi * N + n0 + j]);
      for (int m = 0; m < MB; ++m) out[m][j] += s * acc[m][j];
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int64_t j = 0; j < nb; ++j) y[m * N + n0 + j] = out[m][j];
}

#ifdef __AVX512F__
// The same block for W = 64 with AVX-512 intrinsics: 4 vectors of 16 columns, the MB × 4 accumulators and the
// zero-points in registers; per row k and 16 weights: load, shift, mask, int→float, − z, FMA per row of x.
template <int BITS, int MB, typename scale_t>
void block64_avx512(const float* x, int64_t ldx, const int32_t* p0, const int32_t* p1, const scale_t* scales,
                    const uint8_t* zeros, float* y, int64_t K, int64_t N, int64_t G, int64_t n0) {
  __m512 out[MB][4];
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < 4; ++v) out[m][v] = _mm512_setzero_ps();
  const __m512i m4 = _mm512_set1_epi32(15), m2 = _mm512_set1_epi32(3), m1 = _mm512_set1_epi32(1);
  const __m512i magic = _mm512_set1_epi32(0x4B000000);  // the float 2^23
  for (int64_t g0 = 0; g0 < K; g0 += G) {
    const int64_t gi = g0 / G;
    __m512 zf[4], acc[MB][4];
    for (int v = 0; v < 4; ++v) {
      const __m128i zb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(zeros + gi * N + n0 + 16 * v));
      zf[v] = _mm512_add_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(zb)), _mm512_set1_ps(8388608.0f));  // 2^23 + z
      for (int m = 0; m < MB; ++m) acc[m][v] = _mm512_setzero_ps();
    }
    // codes become floats without a conversion: (c & mask) | 0x4B000000 is the float 2^23 + c, and subtracting
    // 2^23 + z (exact) gives c - z; one ternary-logic op does the mask and the or.
    int64_t k = g0;
    if (BITS == 4) {
      for (; k + 8 <= g0 + G && (k & 7) == 0; k += 8) {  // a whole word row: 8 codes per lane, shifts by constants
        __m512i w[4];
        for (int v = 0; v < 4; ++v) w[v] = _mm512_loadu_si512(p0 + (k >> 3) * N + n0 + 16 * v);
        for (int i = 0; i < 8; ++i) {
          __m512 xb[MB];
          for (int m = 0; m < MB; ++m) xb[m] = _mm512_set1_ps(x[m * ldx + k + i]);
          for (int v = 0; v < 4; ++v) {
            const __m512i c = _mm512_ternarylogic_epi32(_mm512_srl_epi32(w[v], _mm_cvtsi32_si128(4 * i)), m4, magic, 0xEA);
            const __m512 q = _mm512_sub_ps(_mm512_castsi512_ps(c), zf[v]);
            for (int m = 0; m < MB; ++m) acc[m][v] = _mm512_fmadd_ps(xb[m], q, acc[m][v]);
          }
        }
      }
    }
    for (; k < g0 + G; ++k) {
      __m512 xb[MB];
      for (int m = 0; m < MB; ++m) xb[m] = _mm512_set1_ps(x[m * ldx + k]);
      for (int v = 0; v < 4; ++v) {
        __m512i c;
        if (BITS == 4) {
          const __m512i w = _mm512_loadu_si512(p0 + (k >> 3) * N + n0 + 16 * v);
          c = _mm512_and_si512(_mm512_srl_epi32(w, _mm_cvtsi32_si128(static_cast<int>((k & 7) * 4))), m4);
        } else {
          const __m512i lo = _mm512_loadu_si512(p0 + (k >> 4) * N + n0 + 16 * v);
          const __m512i hi = _mm512_loadu_si512(p1 + (k >> 5) * N + n0 + 16 * v);
          const __m512i cl = _mm512_and_si512(_mm512_srl_epi32(lo, _mm_cvtsi32_si128(static_cast<int>((k & 15) * 2))), m2);
          const __m512i ch = _mm512_and_si512(_mm512_srl_epi32(hi, _mm_cvtsi32_si128(static_cast<int>(k & 31))), m1);
          c = _mm512_or_si512(cl, _mm512_slli_epi32(ch, 2));
        }
        const __m512 q = _mm512_sub_ps(_mm512_castsi512_ps(_mm512_or_si512(c, magic)), zf[v]);
        for (int m = 0; m < MB; ++m) acc[m][v] = _mm512_fmadd_ps(xb[m], q, acc[m][v]);
      }
    }
    for (int v = 0; v < 4; ++v) {
      float sv[16];
      for (int j = 0; j < 16; ++j) sv[j] = static_cast<float>(scales[gi * N + n0 + 16 * v + j]);
      const __m512 s = _mm512_loadu_ps(sv);
      for (int m = 0; m < MB; ++m) out[m][v] = _mm512_fmadd_ps(s, acc[m][v], out[m][v]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < 4; ++v) _mm512_storeu_ps(y + m * N + n0 + 16 * v, out[m][v]);
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define OWQ_INT16 1
#define OWQ_UNROLL _Pragma("GCC unroll 16")  // constant shifts and register accumulators need the small loops unrolled
// The int16 GEMV (docs/kernels.md "CPU backend"). Per row m of x: xs = max_{k∉weak} |x_k| / XQ_MAX and
// xq_k = round(x_k / xs) (15-bit; x at the weak columns is set to 0 first: their codes equal z, so they add exactly 0
// either way, and they are the outliers that would waste the range). Per group g and column n, in int32 (exact):
// dot_g = Σ_{k∈g} xq_k·c_k, sx_g = Σ_{k∈g} xq_k; then y_n = xs·Σ_g s_g·(float)(dot_g − z_g·sx_g) in fp32.
// Error against the fp32 x: |Δy_n| ≤ (xs/2)·Σ_g |s_g|·Σ_{k∈g} |c_k − z_g| plus fp32 rounding (the rounding of x is
// 2^-15 of the row's largest non-weak |x|, against bf16's 2^-9).
// The products are byte dot products (VNNI vpdpbusd: 4 unsigned bytes × 4 signed bytes into an int32 lane): xq is
// split as xq = 128·xh + xl with xh ∈ [−127, 127] and xl ∈ [−64, 63] (XQ_MAX = 127·128 + 63), each code set of a
// plane word is masked into the bytes of its lane (4-bit: the low, then the high nibble of each byte; 3-bit: the
// 2-bit plane's 4 sets, and the 1-bit plane's 8 sets moved to bit 2 of the byte, weight 4, c = lo + 4·hi in one
// accumulator), and dot = 128·Σ c·xh + Σ c·xl. A 4-bit word row of 16 lanes (128 weights) costs 3 + 4·MB vector
// ops. |c| ≤ 15, so the int32 sums of KCHUNK = 2048 rows are exact (128·15·127·2048 < 2^31; also dot − z·sx, whose
// exact value is Σ xq·(c − z), |·| ≤ 15·16319·2048): longer groups (per-row K = 11008) are flushed to fp32 every
// 2048 rows.
constexpr float XQ_MAX = 127.f * 128.f + 63.f;
constexpr int64_t KCHUNK = 2048;
// Rows of K per step and byte quads (int32 broadcasts of 4 bytes of xh or xl) per step: 4-bit one word row (2 sets ×
// xh, xl), 3-bit the two 2-bit word rows (4 sets × 2 each) and the 1-bit word row (8 sets × 2) of 32 rows.
template <int BITS> constexpr int64_t STEP = BITS == 4 ? 8 : 32;
template <int BITS> constexpr int QUADS = BITS == 4 ? 4 : 32;
// The row (within a step) of byte b of quad Q, and whether the quad holds xl (else xh). Quad Q = 2·set + part.
template <int BITS> std::pair<int, bool> quad_row(int Q, int b) {
  const bool low = Q % 2;
  if (BITS == 4) return {Q / 2 + 2 * b, low};           // set j: nibble j of byte b = code 2b + j
  if (Q < 16) return {16 * (Q / 8) + (Q % 8) / 2 + 4 * b, low};  // 2-bit word Q / 8, set j: code 4b + j
  return {(Q - 16) / 2 + 8 * b, low};                   // 1-bit word, set j: code 8b + j
}

struct Seg { int64_t g, t0, t1, off; };  // group g, steps [t0, t1) (≤ KCHUNK rows), offset of its quads
struct XQ {                              // x as the kernel reads it, built once per call
  std::vector<Seg> segs;
  std::vector<int32_t> quads, sx;        // [M, P] broadcast byte quads, [M, P / QUADS] Σ xq of a segment's steps
  std::vector<float> xs;                 // [M]                             from its first through each step
  int64_t P = 0, T = 0;                  // quads per row of x, steps of K
  template <int BITS> int32_t sum(int64_t m, const Seg& s, int64_t a, int64_t b) const {  // Σ xq over steps [a, b)
    const int32_t* p = sx.data() + m * (P / QUADS<BITS>) + s.off / QUADS<BITS> - s.t0;
    return p[b - 1] - (a > s.t0 ? p[a - 1] : 0);
  }
};

// Segments: the steps covering each group, cut every KCHUNK rows; a step that straddles two groups (G not a multiple
// of STEP) belongs to both, each with the other group's rows of xq set to 0. Vectorised: 32 rows of xq at a time
// (masked to the segment's rows), split into xh and xl and reordered into quads by one vpermt2w per 32 bytes. False
// when a row of x is not finite (the fp32 GEMV then runs, propagating inf/nan).
template <int BITS>
bool quantize_x(const torch::Tensor& x, const torch::Tensor& weak, int64_t G, XQ& q) {
  constexpr int64_t R = STEP<BITS>;
  constexpr int NG = BITS == 4 ? 2 : 4;  // 32-byte groups of quads per 32 rows
  const int64_t M = x.size(0), K = x.size(1), Kv = (K + 31) / 32 * 32;
  for (int64_t g0 = 0; g0 < K; g0 += G)
    for (int64_t t = g0 / R, t1 = (g0 + G + R - 1) / R; t < t1; t += KCHUNK / R) {
      q.segs.push_back({g0 / G, t, std::min(t + KCHUNK / R, t1), q.P});
      q.P += (q.segs.back().t1 - t) * QUADS<BITS>;
      q.T = q.segs.back().t1;
    }
  const int64_t S = q.segs.size();
  q.quads.resize(M * q.P), q.sx.resize(M * q.P / QUADS<BITS>), q.xs.resize(M);
  __m512i perm[NG];  // perm[ng][e]: byte 32·ng + e of the 32 rows' quads, as an index into (xh | xl << 5)
  for (int ng = 0; ng < NG; ++ng) {
    alignas(64) int16_t idx[32];
    for (int e = 0; e < 32; ++e) {
      const int byte = 32 * ng + e, Q = byte / 4;
      const auto [row, low] = quad_row<BITS>(Q % QUADS<BITS>, byte % 4);
      idx[e] = static_cast<int16_t>((low ? 32 : 0) + Q / QUADS<BITS> * R + row);
    }
    perm[ng] = _mm512_load_si512(idx);
  }
  const int32_t* wi = weak.data_ptr<int32_t>();
  std::vector<float> xr(Kv);
  std::vector<int16_t> xq(Kv + 32);
  for (int64_t m = 0; m < M; ++m) {
    std::copy_n(x.data_ptr<float>() + m * x.stride(0), K, xr.begin());
    for (int64_t i = 0; i < weak.numel(); ++i) xr[wi[i]] = 0.f;
    __m512 amax = _mm512_setzero_ps();
    __mmask16 bad = 0;
    for (int64_t k = 0; k < Kv; k += 16) {
      const __m512 v = _mm512_abs_ps(_mm512_loadu_ps(xr.data() + k));
      amax = _mm512_max_ps(amax, v);
      bad |= _mm512_cmp_ps_mask(v, _mm512_set1_ps(INFINITY), _CMP_NLT_UQ);  // inf or nan
    }
    if (bad) return false;
    const float xs = _mm512_reduce_max_ps(amax) / XQ_MAX;
    const __m512 d = _mm512_set1_ps(xs > 0.f ? xs : 1.f);
    q.xs[m] = xs;
    for (int64_t k = 0; k < Kv; k += 16)  // round to nearest even (MXCSR default)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq.data() + k),
                          _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_div_ps(_mm512_loadu_ps(xr.data() + k), d))));
    for (int64_t si = 0; si < S; ++si) {
      const Seg& s = q.segs[si];
      const int64_t lo = std::max(s.g * G, s.t0 * R), hi = std::min(s.g * G + G, s.t1 * R), end = s.t1 * R;
      int8_t* p = reinterpret_cast<int8_t*>(q.quads.data() + m * q.P + s.off);
      int32_t* cum = q.sx.data() + m * (q.P / QUADS<BITS>) + s.off / QUADS<BITS>;
      for (int64_t t = s.t0, run = 0; t < s.t1; ++t)  // Σ xq of the segment's rows through step t (≤ 16319·2048)
        cum[t - s.t0] = static_cast<int32_t>(
            run = std::accumulate(xq.begin() + std::max(lo, t * R), xq.begin() + std::min(hi, t * R + R), run));
      for (int64_t r = s.t0 * R; r < end; r += 32, p += 32 * NG) {
        const int64_t a = std::clamp<int64_t>(lo - r, 0, 32), b = std::clamp<int64_t>(hi - r, 0, 32);
        const __m512i v = _mm512_maskz_loadu_epi16(static_cast<__mmask32>(((1ull << b) - 1) & ~((1ull << a) - 1)),
                                                   xq.data() + r);
        const __m512i xh = _mm512_srai_epi16(_mm512_add_epi16(v, _mm512_set1_epi16(64)), 7);
        const __m512i xl = _mm512_sub_epi16(v, _mm512_slli_epi16(xh, 7));
        const int64_t bytes = std::min<int64_t>(32 * NG, 4 * (end - r) / R * QUADS<BITS>);  // quads of rows r .. end
        for (int ng = 0; ng < NG; ++ng) {
          const int64_t n = std::clamp<int64_t>(bytes - 32 * ng, 0, 32);
          _mm256_mask_storeu_epi8(p + 32 * ng, static_cast<__mmask32>((1ull << n) - 1),
                                  _mm512_cvtepi16_epi8(_mm512_permutex2var_epi16(xh, perm[ng], xl)));
        }
      }
    }
  }
  return true;
}

// acc += Σ_4 bytes u·s per int32 lane (c: unsigned codes, x: signed bytes), exact (no saturation: |c·x| ≤ 15·128).
inline __m512i dot_bytes(__m512i acc, __m512i c, __m512i x) {
#ifdef __AVX512VNNI__
  return _mm512_dpbusd_epi32(acc, c, x);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(c, x), _mm512_set1_epi16(1)));
#endif
}

// One 16-lane word w (16 columns) into the MB accumulators of xh (ah) and xl (al): code set j is w shifted by
// SH0 + DSH·j (negative: left) and masked to one field per byte; its quads are xp[m·P + 2j] (xh) and + 1 (xl).
template <int MB, int NSETS, int SH0, int DSH>
inline void word16(__m512i* ah, __m512i* al, __m512i w, const int32_t* xp, int64_t P, int32_t mask) {
  OWQ_UNROLL for (int j = 0; j < NSETS; ++j) {
    const int sh = SH0 + DSH * j;
    const __m512i c = _mm512_and_si512(sh < 0 ? _mm512_slli_epi32(w, -sh) : _mm512_srli_epi32(w, sh), _mm512_set1_epi32(mask));
    OWQ_UNROLL for (int m = 0; m < MB; ++m) {
      ah[m] = dot_bytes(ah[m], c, _mm512_set1_epi32(xp[m * P + 2 * j]));
      al[m] = dot_bytes(al[m], c, _mm512_set1_epi32(xp[m * P + 2 * j + 1]));
    }
  }
}

// Step t of K for the 16 columns from c (lanes in k): 4-bit, word row t (nibbles: codes 2b and 2b + 1 of byte b);
// 3-bit, the 2-bit word rows 2t and 2t + 1 (codes 4b + j) and the 1-bit word row t (codes 8b + j, moved to bit 2 of
// the byte: weight 4). xp: the step's quads of the first row of x.
template <int BITS, int MB>
inline void step16(__m512i* ah, __m512i* al, const int32_t* p0, const int32_t* p1, int64_t N, int64_t t, int64_t c,
                   __mmask16 k, const int32_t* xp, int64_t P) {
  if (BITS == 4) {
    word16<MB, 2, 0, 4>(ah, al, _mm512_maskz_loadu_epi32(k, p0 + t * N + c), xp, P, 0x0F0F0F0F);
  } else {
    word16<MB, 4, 0, 2>(ah, al, _mm512_maskz_loadu_epi32(k, p0 + 2 * t * N + c), xp, P, 0x03030303);
    word16<MB, 4, 0, 2>(ah, al, _mm512_maskz_loadu_epi32(k, p0 + (2 * t + 1) * N + c), xp + 8, P, 0x03030303);
    word16<MB, 8, -2, 1>(ah, al, _mm512_maskz_loadu_epi32(k, p1 + t * N + c), xp + 16, P, 0x04040404);
  }
}

// s_g·(float)(dot − z_g·sx) for 16 columns, dot = 128·ah + al: the int32 difference is Σ xq·(c − z), exact.
inline __m512 group_term(__m512i ah, __m512i al, __m512i z, __m512 s, int32_t sx) {
  const __m512i dot = _mm512_add_epi32(_mm512_slli_epi32(ah, 7), al);
  return _mm512_mul_ps(s, _mm512_cvtepi32_ps(_mm512_sub_epi32(dot, _mm512_mullo_epi32(z, _mm512_set1_epi32(sx)))));
}

template <typename T>
__m512 load_scales(const T* p, __mmask16 k) {  // 16 scales as fp32, lanes outside k are 0
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(k, p);
  } else if constexpr (std::is_same_v<T, at::Half>) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p));
  } else if constexpr (std::is_same_v<T, at::BFloat16>) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16));
  } else {
    alignas(64) float f[16] = {};
    for (int j = 0; j < 16; ++j) f[j] = (k >> j & 1) ? static_cast<float>(p[j]) : 0.f;
    return _mm512_load_ps(f);
  }
}

// The 64-column block's word rows are N·4 bytes apart, a new page each, where the hardware prefetchers stop: the block
// fetches its words PF_ROWS rows of K ahead itself (docs/kernels.md "CPU backend": on the 1.5B model's layers from
// DRAM, 2 threads, the int16 GEMV read 11.4 GB/s at 64 rows ahead, 14.5 at 128 and 13.6 at 256).
constexpr int64_t PF_ROWS = 128;
inline void prefetch64(const int32_t* p) {
  OWQ_UNROLL for (int v = 0; v < 4; ++v) _mm_prefetch(reinterpret_cast<const char*>(p + 16 * v), _MM_HINT_T0);
}

// Rows m0 .. m0 + MB − 1 of x, columns n0 .. n0 + 63 (masked past N): 4 vectors of 16 columns, MB int32
// accumulators each for xh and xl per vector (MB ≤ 2: 16 of the 32 vector registers).
template <int BITS, int MB, typename scale_t>
void block64_int16(const XQ& q, int64_t m0, const int32_t* p0, const int32_t* p1, const scale_t* scales,
                   const uint8_t* zeros, float* y, int64_t N, int64_t n0) {
  const int64_t P = q.P;
  __mmask16 km[4];
  OWQ_UNROLL for (int v = 0; v < 4; ++v) km[v] = static_cast<__mmask16>((1u << std::clamp<int64_t>(N - n0 - 16 * v, 0, 16)) - 1);
  __m512 out[4][MB];
  OWQ_UNROLL for (int v = 0; v < 4; ++v)
    OWQ_UNROLL for (int m = 0; m < MB; ++m) out[v][m] = _mm512_setzero_ps();
  for (const Seg& s : q.segs) {
    __m512i ah[4][MB], al[4][MB];
    OWQ_UNROLL for (int v = 0; v < 4; ++v)
      OWQ_UNROLL for (int m = 0; m < MB; ++m) ah[v][m] = al[v][m] = _mm512_setzero_si512();
    const int32_t* xp = q.quads.data() + m0 * P + s.off;
    for (int64_t t = s.t0, t1 = s.t1; t < t1; ++t, xp += QUADS<BITS>) {
      if (const int64_t tp = t + PF_ROWS / STEP<BITS>; tp < t1) {
        if (BITS == 4) prefetch64(p0 + tp * N + n0);
        else prefetch64(p0 + 2 * tp * N + n0), prefetch64(p0 + (2 * tp + 1) * N + n0), prefetch64(p1 + tp * N + n0);
      }
      OWQ_UNROLL for (int v = 0; v < 4; ++v) step16<BITS, MB>(ah[v], al[v], p0, p1, N, t, n0 + 16 * v, km[v], xp, P);
    }
    OWQ_UNROLL for (int v = 0; v < 4; ++v) {
      const int64_t o = s.g * N + n0 + 16 * v;
      const __m512i z = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(km[v], zeros + o));
      const __m512 sc = load_scales(scales + o, km[v]);
      OWQ_UNROLL for (int m = 0; m < MB; ++m)
        out[v][m] = _mm512_add_ps(out[v][m], group_term(ah[v][m], al[v][m], z, sc, q.sum<BITS>(m0 + m, s, s.t0, s.t1)));
    }
  }
  OWQ_UNROLL for (int v = 0; v < 4; ++v)
    OWQ_UNROLL for (int m = 0; m < MB; ++m)
      _mm512_mask_storeu_ps(y + (m0 + m) * N + n0 + 16 * v, km[v], _mm512_mul_ps(_mm512_set1_ps(q.xs[m0 + m]), out[v][m]));
}

// Parallel over blocks of 64 columns; every row block of x runs inside the column block, so the block's words are
// read from memory once and from L1/L2 for the next rows (MB = 2, 1).
template <int BITS, typename scale_t>
void run_int16(const XQ& q, const int32_t* p0, const int32_t* p1, const scale_t* s, const uint8_t* z, float* y,
               int64_t M, int64_t N) {
  at::parallel_for(0, (N + NB - 1) / NB, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t m = 0;
      for (; m + 2 <= M; m += 2) block64_int16<BITS, 2, scale_t>(q, m, p0, p1, s, z, y, N, b * NB);
      for (; m < M; ++m) block64_int16<BITS, 1, scale_t>(q, m, p0, p1, s, z, y, N, b * NB);
    }
  });
}

// The decode GEMV (M ≤ KSPLIT_MAX_M rows, groups of ≥ KSPLIT_MIN_G rows): the threads split K, not N. Each streams
// its own range of word rows, every row read from its first column to its last (as the hardware prefetchers like;
// a 64-column block of run_int16 reads 256 bytes per row, then jumps N·4 bytes), TILE_ROWS rows of K at a time,
// into int32 accumulators for all N columns (2·M·N·4 bytes, L1/L2), flushed at the end of each segment into the
// thread's fp32 partial y; the partials are summed at the end (docs/kernels.md "CPU backend": the 1.5B model's
// layers from DRAM, 2 threads, 14.9 -> 21 GB/s).
// Smaller layers (codes within a core's 2 MiB L2, e.g. all of SmolLM2's) are read from cache, where the column-blocked
// GEMV measured faster in a model's order of layers (SmolLM2: 3.4 against 5.2 ms for its 210 GEMVs); the threshold is
// read per call from WCT_CPU_KSPLIT_MIN (weights, K·N; default 2^22).
constexpr int64_t KSPLIT_MAX_M = 4, KSPLIT_MIN_G = 256, TILE_ROWS = 64;
int64_t ksplit_min_weights() {
  const char* env = std::getenv("WCT_CPU_KSPLIT_MIN");
  return env && *env ? std::atoll(env) : int64_t{1} << 22;
}

template <int BITS, int MB, int TS>
void tile16(const XQ& q, int64_t m0, const Seg& s, int64_t t, const int32_t* p0, const int32_t* p1, int64_t N,
            int32_t* acc, int64_t ld) {  // acc [M][2][ld]: steps t .. t + TS − 1 of segment s, rows m0 .. m0 + MB − 1
  const int32_t* xp = q.quads.data() + m0 * q.P + s.off + (t - s.t0) * QUADS<BITS>;
  for (int64_t c = 0; c < N; c += 16) {
    const __mmask16 k = static_cast<__mmask16>((1u << std::min<int64_t>(16, N - c)) - 1);
    __m512i ah[MB], al[MB];
    OWQ_UNROLL for (int m = 0; m < MB; ++m) {
      ah[m] = _mm512_loadu_si512(acc + (2 * (m0 + m)) * ld + c);
      al[m] = _mm512_loadu_si512(acc + (2 * (m0 + m) + 1) * ld + c);
    }
    OWQ_UNROLL for (int r = 0; r < TS; ++r) step16<BITS, MB>(ah, al, p0, p1, N, t + r, c, k, xp + r * QUADS<BITS>, q.P);
    OWQ_UNROLL for (int m = 0; m < MB; ++m) {
      _mm512_storeu_si512(acc + (2 * (m0 + m)) * ld + c, ah[m]);
      _mm512_storeu_si512(acc + (2 * (m0 + m) + 1) * ld + c, al[m]);
    }
  }
}

template <int BITS, int TS>
void tiles(const XQ& q, const Seg& s, int64_t t, const int32_t* p0, const int32_t* p1, int64_t M, int64_t N,
           int32_t* acc, int64_t ld) {  // every row of x through steps t .. t + TS − 1 (the words stay in L2)
  int64_t m = 0;
  for (; m + 2 <= M; m += 2) tile16<BITS, 2, TS>(q, m, s, t, p0, p1, N, acc, ld);
  for (; m < M; ++m) tile16<BITS, 1, TS>(q, m, s, t, p0, p1, N, acc, ld);
}

template <int BITS, typename scale_t>
void run_ksplit(const XQ& q, const int32_t* p0, const int32_t* p1, const scale_t* scales, const uint8_t* zeros,
                float* y, int64_t M, int64_t N) {
  constexpr int64_t TS = TILE_ROWS / STEP<BITS>;
  const int64_t nt = at::get_num_threads(), ld = (N + 15) / 16 * 16;
  static thread_local std::vector<float> partials;
  partials.assign(nt * M * N, 0.f);
  float* part = partials.data();  // the caller's buffer (a thread_local named in the lambda is each worker's own)
  at::parallel_for(0, nt, 1, [&](int64_t i0, int64_t i1) {
    static thread_local std::vector<int32_t> acc;
    acc.resize(2 * M * ld);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t ta = q.T * i / nt, tb = q.T * (i + 1) / nt;
      float* out = part + i * M * N;
      for (const Seg& s : q.segs) {
        const int64_t a = std::max(s.t0, ta), b = std::min(s.t1, tb);
        if (a >= b) continue;
        std::fill(acc.begin(), acc.end(), 0);
        int64_t t = a;
        for (; t + TS <= b; t += TS) tiles<BITS, TS>(q, s, t, p0, p1, M, N, acc.data(), ld);
        for (; t < b; ++t) tiles<BITS, 1>(q, s, t, p0, p1, M, N, acc.data(), ld);
        for (int64_t c = 0; c < N; c += 16) {  // out += s_g·(dot − z_g·sx) over the piece's rows
          const __mmask16 k = static_cast<__mmask16>((1u << std::min<int64_t>(16, N - c)) - 1);
          const __m512i z = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, zeros + s.g * N + c));
          const __m512 sc = load_scales(scales + s.g * N + c, k);
          for (int64_t m = 0; m < M; ++m) {
            const __m512 term = group_term(_mm512_loadu_si512(acc.data() + 2 * m * ld + c),
                                           _mm512_loadu_si512(acc.data() + (2 * m + 1) * ld + c), z, sc, q.sum<BITS>(m, s, a, b));
            _mm512_mask_storeu_ps(out + m * N + c, k, _mm512_add_ps(_mm512_maskz_loadu_ps(k, out + m * N + c), term));
          }
        }
      }
    }
  });
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      float v = 0.f;
      for (int64_t i = 0; i < nt; ++i) v += part[(i * M + m) * N + n];
      y[m * N + n] = q.xs[m] * v;
    }
}
#endif

template <int BITS, int MB, typename scale_t>
void rows(const torch::Tensor& x, const int32_t* p0, const int32_t* p1, const scale_t* s, const uint8_t* z,
          float* y, int64_t K, int64_t N, int64_t G, int64_t m0) {
  const float* xp = x.data_ptr<float>() + m0 * x.stride(0);
  const int64_t ldx = x.stride(0);
  at::parallel_for(0, (N + NB - 1) / NB, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * NB;
      if (n0 + NB <= N) {
#ifdef __AVX512F__
        block64_avx512<BITS, MB, scale_t>(xp, ldx, p0, p1, s, z, y + m0 * N, K, N, G, n0);
#else
        block<BITS, MB, NB, scale_t>(xp, ldx, p0, p1, s, z, y + m0 * N, K, N, G, n0);
#endif
      } else {
        for (int64_t n = n0; n < N; ++n) block<BITS, MB, 1, scale_t>(xp, ldx, p0, p1, s, z, y + m0 * N, K, N, G, n);
      }
    }
  });
}

template <int BITS, typename scale_t>
void run(const torch::Tensor& x, const int32_t* p0, const int32_t* p1, const scale_t* s, const uint8_t* z, float* y,
         int64_t K, int64_t N, int64_t G) {
  int64_t m = 0;
  const int64_t M = x.size(0);
  for (; m + 4 <= M; m += 4) rows<BITS, 4, scale_t>(x, p0, p1, s, z, y, K, N, G, m);
  for (; m + 2 <= M; m += 2) rows<BITS, 2, scale_t>(x, p0, p1, s, z, y, K, N, G, m);
  for (; m < M; ++m) rows<BITS, 1, scale_t>(x, p0, p1, s, z, y, K, N, G, m);
}

// Columns [c0, c1) of the slab: out[k, c - n0] = s[g, c]·(code[k, c] − z[g, c]) for k < K, with ld = n1 − n0. The
// same two roundings as wct.format.layout.dequantize_dense in fp32 (int→float and z→float are exact, c − z is exact, one
// rounding in the product), so the slab is bit-identical to it. The inner loop runs over ≤ NB contiguous columns of
// one code row (a shift by a per-row constant, a mask, a convert, a subtract and a multiply: the compiler
// vectorises it).
template <int BITS, typename scale_t>
void dequant_cols(const int32_t* p0, const int32_t* p1, const scale_t* scales, const uint8_t* zeros, float* out,
                  int64_t K, int64_t N, int64_t G, int64_t n0, int64_t ld, int64_t c0, int64_t c1) {
  const int64_t nb = c1 - c0;
  float zf[NB], sf[NB];
  for (int64_t g0 = 0; g0 < K; g0 += G) {
    const int64_t gi = g0 / G;
    for (int64_t j = 0; j < nb; ++j) {
      zf[j] = static_cast<float>(zeros[gi * N + c0 + j]);
      sf[j] = static_cast<float>(scales[gi * N + c0 + j]);
    }
    const int64_t g1 = g0 + G < K ? g0 + G : K;
    for (int64_t k = g0; k < g1; ++k) {
      float* o = out + k * ld + (c0 - n0);
      if (BITS == 4) {
        const int32_t* row = p0 + (k >> 3) * N + c0;
        const int sh = static_cast<int>(k & 7) * 4;
        for (int64_t j = 0; j < nb; ++j) o[j] = (static_cast<float>((row[j] >> sh) & 15) - zf[j]) * sf[j];
      } else {
        const int32_t* lo = p0 + (k >> 4) * N + c0;
        const int32_t* hi = p1 + (k >> 5) * N + c0;
        const int sl = static_cast<int>(k & 15) * 2, shh = static_cast<int>(k & 31);
        for (int64_t j = 0; j < nb; ++j) {
          const int32_t c = ((lo[j] >> sl) & 3) | (((hi[j] >> shh) & 1) << 2);
          o[j] = (static_cast<float>(c) - zf[j]) * sf[j];
        }
      }
    }
  }
}

}  // namespace

// deq(W_q)ᵀ for output columns [n0, n1) as a contiguous fp32 [K, n1 − n0] (the slab the BLAS multiplies: y = x·slab,
// dX = dY·slabᵀ); parallel over blocks of NB columns.
torch::Tensor owq_dequant(std::vector<torch::Tensor> planes, torch::Tensor scales, torch::Tensor zeros, int64_t bits,
                          int64_t in_features, int64_t n0, int64_t n1) {
  TORCH_CHECK(bits == 3 || bits == 4, "bits must be 3 or 4");
  TORCH_CHECK(zeros.scalar_type() == torch::kByte && zeros.is_contiguous() && scales.is_contiguous(), "bad scales");
  TORCH_CHECK(static_cast<int64_t>(planes.size()) == (bits == 3 ? 2 : 1), "wrong number of planes");
  for (auto& p : planes) TORCH_CHECK(p.scalar_type() == torch::kInt && p.is_contiguous(), "planes: int32 contiguous");
  const int64_t K = in_features, N = scales.size(1), G = K / scales.size(0);
  TORCH_CHECK(G * scales.size(0) == K, "groups do not divide K");
  TORCH_CHECK(0 <= n0 && n0 <= n1 && n1 <= N, "column range out of bounds");
  TORCH_CHECK(planes[0].size(1) == N && planes[0].size(0) * (bits == 4 ? 8 : 16) >= K, "planes do not match K, N");
  TORCH_CHECK(bits == 4 || (planes[1].size(1) == N && planes[1].size(0) * 32 >= K), "planes do not match K, N");
  auto out = torch::empty({K, n1 - n0}, scales.options().dtype(torch::kFloat));
  const int32_t* p0 = planes[0].data_ptr<int32_t>();
  const int32_t* p1 = bits == 3 ? planes[1].data_ptr<int32_t>() : nullptr;
  const uint8_t* z = zeros.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  const int64_t ld = n1 - n0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scales.scalar_type(), "owq_dequant", [&] {
    const scalar_t* s = scales.data_ptr<scalar_t>();
    at::parallel_for(0, (ld + NB - 1) / NB, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t c0 = n0 + b * NB, c1 = std::min(c0 + NB, n1);
        if (bits == 4) dequant_cols<4, scalar_t>(p0, p1, s, z, op, K, N, G, n0, ld, c0, c1);
        else dequant_cols<3, scalar_t>(p0, p1, s, z, op, K, N, G, n0, ld, c0, c1);
      }
    });
  });
  return out;
}

// WCT_CPU_GEMV selects the GEMV per call: "int16" (default) or "fp32"; without AVX-512 (BW) the fp32 one always runs.
bool gemv_int16() {
  const char* env = std::getenv("WCT_CPU_GEMV");
  const std::string mode = env && *env ? env : "int16";
  TORCH_CHECK(mode == "int16" || mode == "fp32", "WCT_CPU_GEMV must be int16 or fp32, not '", mode, "'");
#ifdef OWQ_INT16
  return mode == "int16";
#else
  return false;
#endif
}

std::string gemv_mode() {
#if defined(OWQ_INT16) && defined(__AVX512VNNI__)
  const char* int16 = "int16 (AVX512-VNNI dpbusd)";
#else
  const char* int16 = "int16 (AVX512BW maddubs)";
#endif
#ifdef __AVX512F__
  const char* fp32 = "fp32 (AVX-512)";
#else
  const char* fp32 = "fp32 (portable)";
#endif
  return gemv_int16() ? int16 : fp32;
}

// x fp32 [M, K] (rows contiguous), planes int32 (contiguous), scales [K/G, N] fp32/fp16/bf16, zeros uint8 [K/G, N],
// weak_idx int32 [n_o] (the weak columns, excluded from the int16 scale of x).
torch::Tensor owq_gemv(torch::Tensor x, std::vector<torch::Tensor> planes, torch::Tensor scales, torch::Tensor zeros,
                       torch::Tensor weak_idx, int64_t bits) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.stride(1) == 1, "x must be fp32 [M, K]");
  TORCH_CHECK(bits == 3 || bits == 4, "bits must be 3 or 4");
  TORCH_CHECK(zeros.scalar_type() == torch::kByte && zeros.is_contiguous() && scales.is_contiguous(), "bad scales");
  TORCH_CHECK(weak_idx.scalar_type() == torch::kInt && weak_idx.dim() == 1 && weak_idx.is_contiguous(),
              "weak_idx must be int32 [n_o]");
  for (auto& p : planes) TORCH_CHECK(p.scalar_type() == torch::kInt && p.is_contiguous(), "planes: int32 contiguous");
  const int64_t K = x.size(1), N = scales.size(1), G = K / scales.size(0);
  TORCH_CHECK(G * scales.size(0) == K, "groups do not divide K");
  auto y = torch::empty({x.size(0), N}, x.options());
  const int32_t* p0 = planes[0].data_ptr<int32_t>();
  const int32_t* p1 = bits == 3 ? planes[1].data_ptr<int32_t>() : nullptr;
  const uint8_t* z = zeros.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
#ifdef OWQ_INT16
  XQ q;
  const bool int16 = gemv_int16() && (bits == 4 ? quantize_x<4>(x, weak_idx, G, q) : quantize_x<3>(x, weak_idx, G, q));
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scales.scalar_type(), "owq_gemv", [&] {
    const scalar_t* s = scales.data_ptr<scalar_t>();
#ifdef OWQ_INT16
    if (int16 && x.size(0) <= KSPLIT_MAX_M && G >= KSPLIT_MIN_G && K * N >= ksplit_min_weights()) {
      if (bits == 4) run_ksplit<4, scalar_t>(q, p0, p1, s, z, yp, x.size(0), N);
      else run_ksplit<3, scalar_t>(q, p0, p1, s, z, yp, x.size(0), N);
      return;
    }
    if (int16) {
      if (bits == 4) run_int16<4, scalar_t>(q, p0, p1, s, z, yp, x.size(0), N);
      else run_int16<3, scalar_t>(q, p0, p1, s, z, yp, x.size(0), N);
      return;
    }
#endif
    if (bits == 4) run<4, scalar_t>(x, p0, p1, s, z, yp, K, N, G);
    else run<3, scalar_t>(x, p0, p1, s, z, yp, K, N, G);
  });
  return y;
}


namespace {

// One input row's dot products with 4 weight rows n..n+3 of a [N, K] matrix stored as fp16 / bf16 / fp32,
// converted to fp32 in registers (fp16 → fp32 and bf16 → fp32 are exact) and accumulated in fp32.
template <typename w_t>
inline float to_f32(w_t v) { return static_cast<float>(v); }

#ifdef __AVX512F__
template <typename w_t>
inline __m512 load16(const w_t* p);
template <>
inline __m512 load16<float>(const float* p) { return _mm512_loadu_ps(p); }
template <>
inline __m512 load16<at::Half>(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
template <>
inline __m512 load16<at::BFloat16>(const at::BFloat16* p) {  // bf16 is the top half of an fp32
  const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}
#endif

template <typename w_t>
void dense_rows(const float* x, const w_t* w, float* y, int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n += 4) {
    const int64_t nr = std::min<int64_t>(4, n1 - n);
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K;
      float out[4] = {0.f, 0.f, 0.f, 0.f};
      int64_t k = 0;
#ifdef __AVX512F__
      if constexpr (!std::is_same_v<w_t, double>) if (nr == 4) {
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (; k + 16 <= K; k += 16) {
          const __m512 xv = _mm512_loadu_ps(xm + k);
          for (int r = 0; r < 4; ++r) acc[r] = _mm512_fmadd_ps(xv, load16<w_t>(w + (n + r) * K + k), acc[r]);
        }
        for (int r = 0; r < 4; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
      }
#endif
      for (int r = 0; r < nr; ++r) {
        float s = out[r];
        for (int64_t kk = k; kk < K; ++kk) s += xm[kk] * to_f32(w[(n + r) * K + kk]);
        y[m * N + n + r] = s;
      }
    }
  }
}

}  // namespace

// y [M, N] = x [M, K] · Wᵀ for W [N, K] in fp32, fp16 or bf16, fp32 accumulation: the decode head read in its stored
// dtype (an fp16 embedding: half the bytes of fp32, the same products), parallel over blocks of output rows.
torch::Tensor dense_gemv(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x must be fp32 [M, K]");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(1) == x.size(1), "w must be contiguous [N, K]");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "dense_gemv", [&] {
    const scalar_t* wp = w.data_ptr<scalar_t>();
    at::parallel_for(0, (N + 255) / 256, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        dense_rows<scalar_t>(x.data_ptr<float>(), wp, y.data_ptr<float>(), M, K, N, b * 256, std::min(N, (b + 1) * 256));
    });
  });
  return y;
}

void bind_decode(pybind11::module& m);  // kernels/decode_cpu.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("owq_gemv", &owq_gemv, "y = x · deq(W_q)ᵀ from owq-pack v1 planes (3/4-bit; int16 x or fp32, WCT_CPU_GEMV)");
  m.def("gemv_mode", &gemv_mode, "the GEMV owq_gemv runs now (WCT_CPU_GEMV and the build's instruction set)");
  m.def("dense_gemv", &dense_gemv, "y = x · Wᵀ for W [N, K] fp32/fp16/bf16, fp32 accumulation (the decode head)");
  m.def("owq_dequant", &owq_dequant, "deq(W_q)ᵀ [K, n1 − n0] fp32 for output columns [n0, n1) (3/4-bit)");
  bind_decode(m);
}
