// CUDA kernels for owq-pack v1 layers, torch-free with extern "C" launchers (loaded by wct/kernels/cuda_backend.py).
//
// owq_gemv    : decode GEMV for M <= OWQ_GEMV_MAX_M rows, templated on bits and M (no runtime m-chain, no local
//               arrays). blockIdx.y splits K into chunks of k_per_split staged in shared memory; the weak columns
//               are spread over the splits (x[idx] staged as fp32). Split-K is fused and deterministic: every
//               split writes its fp32 partial to ws [splits, M, N], and the last block of a column tile (a
//               __threadfence + atomicAdd ticket) sums the partials in split order, adds the bias and casts.
//   fast    : fp16 activations and scales, N % 4 == 0, 16-byte aligned planes: 4 columns per thread from 128-bit
//             loads, LOP3/0x6400 fp16x2 decode, HSUB2 zero, HFMA2 with x staged as half2 in pair order; at 3 bits
//             it reads the 3-bit kernel words pw (wct.format.layout.kernel_words3), the layout a 3-bit layer
//             holds on this backend (general and dequant read them too when pw is given).
//   general : every other case (fp32/bf16, ragged N, unaligned): one column per thread, exponent-trick decode.
// owq_dequant : deq(W_q) with the weak rows of W_o scattered in, as a scratch [K, N] for one GEMM (large M, dX).
// Launchers return the cudaError_t of the launch (0 = success). dtype codes: 0 float, 1 half, 2 bfloat16.
#include <cuda_runtime.h>

#include "owq_dequant.cuh"

#define OWQ_THREADS 256
#define OWQ_FAST_THREADS 128

// Write or reduce a block's results. acc[c][m] is the partial of column n0 + c, row m over this split's rows;
// rows m >= M_rows (the template's padding up to M) are dropped.
// With one split the block writes y; otherwise the partials go to ws and the tile's last block (counters[tile]
// counts arrivals, and is reset by that block for the next launch) sums them in split order: deterministic.
template <int M, int COLS, typename T>
__device__ __forceinline__ void owq_finish(float (&acc)[COLS][M], int M_rows, int64_t n0, int N, const T* bias,
                                           float* ws, int* counters, T* y) {
  const int split = blockIdx.y, splits = gridDim.y;
  const bool live = n0 < N;
  if (splits > 1) {
    if (live)
#pragma unroll
      for (int m = 0; m < M; ++m)
#pragma unroll
        for (int c = 0; c < COLS; ++c)
          if (m < M_rows) ws[(static_cast<int64_t>(split) * M_rows + m) * N + n0 + c] = acc[c][m];
    __threadfence();
    __syncthreads();
    __shared__ int last;
    if (threadIdx.x == 0) last = atomicAdd(counters + blockIdx.x, 1) == splits - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    if (threadIdx.x == 0) counters[blockIdx.x] = 0;
    if (!live) return;
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int c = 0; c < COLS; ++c) {
        float s = 0.f;
        for (int p = 0; m < M_rows && p < splits; ++p) s += __ldcg(ws + (static_cast<int64_t>(p) * M_rows + m) * N + n0 + c);
        acc[c][m] = s;
      }
  }
  if (!live) return;
#pragma unroll
  for (int c = 0; c < COLS; ++c) {
    const float b = bias != nullptr ? owq_to_float(bias[n0 + c]) : 0.f;
#pragma unroll
    for (int m = 0; m < M; ++m)
      if (m < M_rows) y[static_cast<int64_t>(m) * N + n0 + c] = owq_from_float<T>(acc[c][m] + b);
  }
}

// Stage this split's weak activations x[m, idx[o]] (o in [o_lo, o_hi), m < M_rows; zero up to M) as fp32 into
// xo [M][ldo].
template <int M, typename T>
__device__ __forceinline__ void owq_stage_weak(const T* x, int64_t stride_x, int M_rows, const int32_t* idx, int o_lo,
                                               int o_hi, float* xo, int ldo) {
  for (int i = threadIdx.x; i < M * (o_hi - o_lo); i += blockDim.x) {
    const int m = i / (o_hi - o_lo), o = o_lo + i % (o_hi - o_lo);
    xo[m * ldo + o - o_lo] = m < M_rows ? owq_to_float(x[m * stride_x + idx[o]]) : 0.f;
  }
}

// Minimum blocks per SM of owq_gemv_fast<BITS, M> (.minnctapersm; 0 = none): the register cap under which ptxas
// keeps every instantiation free of stack frames and spills on sm_80 and sm_90 (ptxas -v, nvcc 13; the budget test
// checks all of them). With no minimum ptxas aims at its own occupancy target and, for some, spills a value or a
// predicate held across the K loop to an 8-byte stack frame: at 3 bits (64 registers at M = 1), at 4 bits with
// M = 4 and 8 (96 and 128 registers), at 2 bits with M = 2 on sm_80 (56). One block per SM lets the 3-bit kernels
// take what they need (80 registers at M = 1); four (≤ 128 registers) suffice for 4 bits at M = 4 and 2 bits at
// M = 2, three (≤ 168) for 4 bits at M = 8. The others keep ptxas's choice (4 bits at M = 1: 56 registers).
template <int BITS, int M>
constexpr int owq_fast_min_blocks() {
  return BITS == 3 ? 1 : BITS == 4 && M == 8 ? 3 : (BITS == 4 && M == 4) || (BITS == 2 && M == 2) ? 4 : 0;
}

template <int BITS, int M>
__global__ void __launch_bounds__(OWQ_FAST_THREADS, owq_fast_min_blocks<BITS, M>())
    owq_gemv_fast(const __half* __restrict__ x, int64_t stride_x, const int32_t* __restrict__ pa,
                  const int32_t* __restrict__ pb, const int32_t* __restrict__ pw, const __half* __restrict__ scales,
                  const uint8_t* __restrict__ zeros,
                  const int32_t* __restrict__ idx, const __half* __restrict__ wo, const __half* __restrict__ bias,
                  float* __restrict__ ws, int* __restrict__ counters, __half* __restrict__ y, int M_rows, int N,
                  int K, int n_o, int group, int k_per_split, int o_per_split) {
  extern __shared__ __align__(16) unsigned char smem[];
  __half* xs = reinterpret_cast<__half*>(smem);                   // [M][k_per_split], pair order
  float* xo = reinterpret_cast<float*>(xs + M * k_per_split);  // [M][o_per_split]
  constexpr int R = OwqStep<BITS>::ROWS;
  const int k_lo = blockIdx.y * k_per_split;
  const int len = min(K, k_lo + k_per_split) - k_lo, len_pad = (len + R - 1) / R * R;
  const int o_lo = owq_weak_bound(n_o, blockIdx.y, gridDim.y), o_hi = owq_weak_bound(n_o, blockIdx.y + 1, gridDim.y);
  owq_stage_x_pairs<BITS>(x, stride_x, M_rows, M, k_lo, len, len_pad, k_per_split, xs, threadIdx.x, blockDim.x);
  owq_stage_weak<M>(x, stride_x, M_rows, idx, o_lo, o_hi, xo, o_per_split);
  __syncthreads();
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * OWQ_COLS;
  float acc[OWQ_COLS][M] = {};
  if (n0 < N) {
    owq_fast_columns<BITS, M>(pa, pb, pw, scales, zeros, N, n0, k_lo, k_lo + len_pad, group, xs, k_per_split,
                              acc);
    owq_weak_columns<M, OWQ_COLS>(wo, N, n0, o_lo, o_hi, xo, o_per_split, acc);
  }
  owq_finish<M, OWQ_COLS>(acc, M_rows, n0, N, bias, ws, counters, y);
}

template <int BITS, int M, typename T, typename S>
__global__ void __launch_bounds__(OWQ_THREADS)
    owq_gemv_general(const T* __restrict__ x, int64_t stride_x, const int32_t* __restrict__ pa,
                     const int32_t* __restrict__ pb, const int32_t* __restrict__ pw, const S* __restrict__ scales,
                     const uint8_t* __restrict__ zeros,
                     const int32_t* __restrict__ idx, const T* __restrict__ wo, const T* __restrict__ bias,
                     float* __restrict__ ws, int* __restrict__ counters, T* __restrict__ y, int M_rows, int N, int K,
                     int n_o, int group, int k_per_split, int o_per_split) {
  extern __shared__ __align__(16) unsigned char smem[];
  float* xs = reinterpret_cast<float*>(smem);  // [M][k_per_split]
  float* xo = xs + M * k_per_split;            // [M][o_per_split]
  const int k_lo = blockIdx.y * k_per_split;
  const int len = min(K, k_lo + k_per_split) - k_lo, len_pad = (len + 31) / 32 * 32;
  const int o_lo = owq_weak_bound(n_o, blockIdx.y, gridDim.y), o_hi = owq_weak_bound(n_o, blockIdx.y + 1, gridDim.y);
  for (int i = threadIdx.x; i < M * len_pad; i += blockDim.x) {
    const int m = i / len_pad, kk = i % len_pad;
    xs[m * k_per_split + kk] = kk < len && m < M_rows ? owq_to_float(x[m * stride_x + k_lo + kk]) : 0.f;
  }
  owq_stage_weak<M>(x, stride_x, M_rows, idx, o_lo, o_hi, xo, o_per_split);
  __syncthreads();
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  float acc[1][M] = {};
  if (n < N) {
    const OwqStagedF32 xs32{xs, k_per_split};
    if constexpr (BITS == 3) {
      if (pw) owq_general_column<BITS, M, true>(pw, pb, scales, zeros, N, n, k_lo, k_lo + len_pad, group, xs32, acc);
      else owq_general_column<BITS, M>(pa, pb, scales, zeros, N, n, k_lo, k_lo + len_pad, group, xs32, acc);
    } else {
      owq_general_column<BITS, M>(pa, pb, scales, zeros, N, n, k_lo, k_lo + len_pad, group, xs32, acc);
    }
    owq_weak_columns<M, 1>(wo, N, n, o_lo, o_hi, xo, o_per_split, acc);
  }
  owq_finish<M, 1>(acc, M_rows, n, N, bias, ws, counters, y);
}

template <int BITS, typename T, typename S>
__global__ void owq_dequant_kernel(const int32_t* __restrict__ pa, const int32_t* __restrict__ pb,
                                   const int32_t* __restrict__ pw, const S* __restrict__ scales,
                                   const uint8_t* __restrict__ zeros, T* __restrict__ out, int N, int K, int group) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= N) return;
  if constexpr (BITS == 3) {
    if (pw) return owq_dequant_block<BITS, true>(pw, pb, scales, zeros, N, n, blockIdx.y * 32, K, group, out);
  }
  owq_dequant_block<BITS>(pa, pb, scales, zeros, N, n, blockIdx.y * 32, K, group, out);
}

template <typename T>
__global__ void owq_scatter_weak_kernel(const int32_t* __restrict__ idx, const T* __restrict__ wo, T* __restrict__ out,
                                        int N) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  const int o = blockIdx.y;
  if (n < N) out[static_cast<int64_t>(idx[o]) * N + n] = wo[static_cast<int64_t>(o) * N + n];
}

#ifdef OWQ_BUDGET_ONLY
// Only the fast kernels, every instantiation the launcher uses (bits 2, 3, 4 × M = 1, 2, 4, 8), for the static
// check (scripts/ptx_budget.py, tests/test_kernels_budget.py): seconds to compile instead of minutes.
#define OWQ_FAST_ARGS                                                                                        \
  const __half*, int64_t, const int32_t*, const int32_t*, const int32_t*, const __half*, const uint8_t*,     \
      const int32_t*, const __half*, const __half*, float*, int*, __half*, int, int, int, int, int, int, int
#define OWQ_FAST_M(BITS)                                          \
  template __global__ void owq_gemv_fast<BITS, 1>(OWQ_FAST_ARGS); \
  template __global__ void owq_gemv_fast<BITS, 2>(OWQ_FAST_ARGS); \
  template __global__ void owq_gemv_fast<BITS, 4>(OWQ_FAST_ARGS); \
  template __global__ void owq_gemv_fast<BITS, 8>(OWQ_FAST_ARGS);
OWQ_FAST_M(2)
OWQ_FAST_M(3)
OWQ_FAST_M(4)
#else
static bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Call F<MT, rest...>(a) with MT the template row count for a.M (1, 2, 4 or 8; rows past a.M are zero and
// dropped): four instantiations instead of eight keep the library's build time down.
#define OWQ_M_CASES(F, ...)                                                                        \
  switch (a.M) {                                                                                   \
    case 1: return F<1, __VA_ARGS__>(a);                                                           \
    case 2: return F<2, __VA_ARGS__>(a);                                                           \
    case 3: case 4: return F<4, __VA_ARGS__>(a);                                                   \
    case 5: case 6: case 7: case 8: return F<8, __VA_ARGS__>(a);                                   \
    default: return cudaErrorInvalidValue;                                                         \
  }

struct OwqGemvArgs {
  const void *x, *pa, *pb, *pw, *scales, *zeros, *idx, *wo, *bias;
  void *ws, *counters, *y;
  int64_t stride_x;
  int M, N, K, n_o, group, bits, splits, k_per_split;
  cudaStream_t stream;
};

static int owq_o_per_split(const OwqGemvArgs& a) { return (a.n_o + a.splits - 1) / a.splits; }

template <int M, int BITS>
static int launch_fast(const OwqGemvArgs& a) {
  const int o_per = owq_o_per_split(a);
  const size_t smem = sizeof(__half) * M * a.k_per_split + sizeof(float) * M * o_per;
  const dim3 grid((a.N / OWQ_COLS + OWQ_FAST_THREADS - 1) / OWQ_FAST_THREADS, a.splits);
  owq_gemv_fast<BITS, M><<<grid, OWQ_FAST_THREADS, smem, a.stream>>>(
      static_cast<const __half*>(a.x), a.stride_x, static_cast<const int32_t*>(a.pa),
      static_cast<const int32_t*>(a.pb), static_cast<const int32_t*>(a.pw), static_cast<const __half*>(a.scales),
      static_cast<const uint8_t*>(a.zeros), static_cast<const int32_t*>(a.idx), static_cast<const __half*>(a.wo),
      static_cast<const __half*>(a.bias),
      static_cast<float*>(a.ws), static_cast<int*>(a.counters), static_cast<__half*>(a.y), a.M, a.N, a.K, a.n_o,
      a.group, a.k_per_split, o_per);
  return cudaGetLastError();
}

template <int M, int BITS, typename T, typename S>
static int launch_general(const OwqGemvArgs& a) {
  const int o_per = owq_o_per_split(a);
  const size_t smem = sizeof(float) * M * (a.k_per_split + o_per);
  const dim3 grid((a.N + OWQ_THREADS - 1) / OWQ_THREADS, a.splits);
  owq_gemv_general<BITS, M, T, S><<<grid, OWQ_THREADS, smem, a.stream>>>(
      static_cast<const T*>(a.x), a.stride_x, static_cast<const int32_t*>(a.pa), static_cast<const int32_t*>(a.pb),
      static_cast<const int32_t*>(a.pw), static_cast<const S*>(a.scales), static_cast<const uint8_t*>(a.zeros), static_cast<const int32_t*>(a.idx),
      static_cast<const T*>(a.wo), static_cast<const T*>(a.bias), static_cast<float*>(a.ws),
      static_cast<int*>(a.counters), static_cast<T*>(a.y), a.M, a.N, a.K, a.n_o, a.group, a.k_per_split, o_per);
  return cudaGetLastError();
}

template <int BITS> static int fast_m(const OwqGemvArgs& a) { OWQ_M_CASES(launch_fast, BITS) }
template <int BITS, typename T, typename S> static int general_m(const OwqGemvArgs& a) {
  OWQ_M_CASES(launch_general, BITS, T, S)
}

// Whether the fast path takes these arguments (fp16 x and scales, 4-column and 128-bit alignment, steps that
// divide the groups and the split length; at 3 bits the 3-bit words).
static bool fast_ok(const OwqGemvArgs& a, int act, int scale_is_float) {
  const int rows = a.bits == 3 ? 32 : 32 / a.bits;
  if (a.bits == 3 && (a.pw == nullptr || !aligned(a.pw, 16))) return false;
  return act == 1 && !scale_is_float && a.N % OWQ_COLS == 0 && aligned(a.pa, 16) && aligned(a.pb, 16) &&
         aligned(a.scales, 8) && aligned(a.zeros, 4) && aligned(a.wo, 8) && a.group % rows == 0 &&
         a.k_per_split % rows == 0;
}

template <typename T, typename S>
static int gemv_general(const OwqGemvArgs& a) {
  switch (a.bits) {
    case 2: return general_m<2, T, S>(a);
    case 3: return general_m<3, T, S>(a);
    case 4: return general_m<4, T, S>(a);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T, typename S>
static int dequant(const void* pa, const void* pb, const void* pw, const void* scales, const void* zeros,
                   const void* idx, const void* wo, void* out, int N, int K, int n_o, int group, int bits,
                   cudaStream_t stream) {
  const dim3 grid((N + OWQ_THREADS - 1) / OWQ_THREADS, (K + 31) / 32);
  const auto args = [&](auto kernel) {
    kernel<<<grid, OWQ_THREADS, 0, stream>>>(static_cast<const int32_t*>(pa), static_cast<const int32_t*>(pb),
                                             static_cast<const int32_t*>(pw), static_cast<const S*>(scales), static_cast<const uint8_t*>(zeros),
                                             static_cast<T*>(out), N, K, group);
  };
  switch (bits) {
    case 2: args(owq_dequant_kernel<2, T, S>); break;
    case 3: args(owq_dequant_kernel<3, T, S>); break;
    case 4: args(owq_dequant_kernel<4, T, S>); break;
    default: return cudaErrorInvalidValue;
  }
  if (n_o > 0)
    owq_scatter_weak_kernel<T><<<dim3((N + OWQ_THREADS - 1) / OWQ_THREADS, n_o), OWQ_THREADS, 0, stream>>>(
        static_cast<const int32_t*>(idx), static_cast<const T*>(wo), static_cast<T*>(out), N);
  return cudaGetLastError();
}

// Instantiate F<T, S> for activation dtype code `act` and scales either in the activation dtype or in float.
#define OWQ_DISPATCH(F, ...)                                                                      \
  switch (act * 2 + (scale_is_float ? 1 : 0)) {                                                    \
    case 0: case 1: return F<float, float>(__VA_ARGS__);                                           \
    case 2: return F<__half, __half>(__VA_ARGS__);                                                 \
    case 3: return F<__half, float>(__VA_ARGS__);                                                  \
    case 4: return F<__nv_bfloat16, __nv_bfloat16>(__VA_ARGS__);                                   \
    case 5: return F<__nv_bfloat16, float>(__VA_ARGS__);                                           \
    default: return cudaErrorInvalidValue;                                                         \
  }

extern "C" {

// y [M, N] = x [M, K] (row stride stride_x) · W_fullᵀ + bias. `group` is the group size (>= the padded K for one
// group). ws holds [splits, M, N] fp32 partials when splits > 1; counters (int32, zero before the first launch,
// left zero by every launch) one entry per column tile: ceil(N / 256) suffice. pw: at 3 bits the 3-bit kernel
// words (wct.format.layout.kernel_words3), which every path then reads (pa, pb unused), or null: the v1 planes
// pa, pb, which only the general kernel reads. path: 0 fastest that applies, 1 the general kernel. Returns a
// cudaError_t.
int owq_gemv(int act, int scale_is_float, const void* x, int64_t stride_x, const void* pa, const void* pb,
             const void* pw, const void* scales, const void* zeros, const void* idx, const void* wo, const void* bias, void* ws,
             void* counters, void* y, int M, int N, int K, int n_o, int group, int bits, int splits, int k_per_split,
             int path, void* stream) {
  const OwqGemvArgs a{x, pa, pb, pw, scales, zeros, idx, wo, bias, ws, counters, y, stride_x, M, N, K, n_o, group,
                      bits, splits, k_per_split, static_cast<cudaStream_t>(stream)};
  if (M < 1 || M > OWQ_GEMV_MAX_M || k_per_split % 32 || group % 32 || splits < 1 ||
      static_cast<int64_t>(splits - 1) * k_per_split >= K)
    return cudaErrorInvalidValue;
  if (path == 0 && fast_ok(a, act, scale_is_float)) {
    switch (bits) {
      case 2: return fast_m<2>(a);
      case 3: return fast_m<3>(a);
      case 4: return fast_m<4>(a);
      default: return cudaErrorInvalidValue;
    }
  }
  OWQ_DISPATCH(gemv_general, a)
}

// out [K, N] = W_fullᵀ (the GEMM scratch); pw as for owq_gemv.
int owq_dequant(int act, int scale_is_float, const void* pa, const void* pb, const void* pw, const void* scales,
                const void* zeros, const void* idx, const void* wo, void* out, int N, int K, int n_o, int group,
                int bits, void* stream) {
  if (group % 32) return cudaErrorInvalidValue;
  OWQ_DISPATCH(dequant, pa, pb, pw, scales, zeros, idx, wo, out, N, K, n_o, group, bits,
               static_cast<cudaStream_t>(stream))
}

int owq_gemv_max_m() { return OWQ_GEMV_MAX_M; }

}  // extern "C"
#endif  // OWQ_BUDGET_ONLY
