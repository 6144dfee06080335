// CUDA kernels for owq-pack v1 layers, torch-free with extern "C" launchers (loaded by wct/kernels/cuda_backend.py).
//
// owq_gemv    : decode GEMV for M <= OWQ_GEMV_MAX_M rows. One thread per output column n (coalesced plane reads),
//               blockIdx.y splits K into chunks of k_per_split (a multiple of 32) whose activations are staged in
//               shared memory as fp32. Accumulation in fp32; the weak columns (any number) are a tail of the last
//               split. Partials go to a workspace [splits, M, N] summed by owq_reduce in split order: deterministic.
// owq_dequant : deq(W_q) with the weak rows of W_o scattered in, as a scratch [K, N] for one GEMM (large M, dX).
// Launchers return the cudaError_t of the launch (0 = success). dtype codes: 0 float, 1 half, 2 bfloat16.
#include <cuda_runtime.h>

#include "owq_dequant.cuh"

#define OWQ_THREADS 256

template <typename T, typename S>
__global__ void owq_gemv_kernel(const T* __restrict__ x, int64_t stride_x, const int32_t* __restrict__ pa,
                                const int32_t* __restrict__ pb, const S* __restrict__ scales,
                                const uint8_t* __restrict__ zeros, const int32_t* __restrict__ idx,
                                const T* __restrict__ wo, float* __restrict__ ws, int M, int N, int K, int n_o,
                                int group, int k_per_split, int bits) {
  extern __shared__ float xs[];  // [M][k_per_split]
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  const int split = blockIdx.y;
  const int k_lo = split * k_per_split;
  const int len = min(K, k_lo + k_per_split) - k_lo;
  for (int i = threadIdx.x; i < M * len; i += blockDim.x) {
    const int m = i / len, kk = i % len;
    xs[m * k_per_split + kk] = owq_to_float(x[m * stride_x + k_lo + kk]);
  }
  __syncthreads();
  if (n >= N) return;
  float acc[OWQ_GEMV_MAX_M];
#pragma unroll
  for (int m = 0; m < OWQ_GEMV_MAX_M; ++m) acc[m] = 0.f;
  owq_column_dot(pa, pb, scales, zeros, N, n, k_lo, len, group, bits, xs, k_per_split, M, acc);
  if (split == gridDim.y - 1) owq_weak_tail(x, stride_x, idx, wo, n_o, N, n, M, acc);
#pragma unroll
  for (int m = 0; m < OWQ_GEMV_MAX_M; ++m)
    if (m < M) ws[(static_cast<int64_t>(split) * M + m) * N + n] = acc[m];
}

template <typename T>
__global__ void owq_reduce_kernel(const float* __restrict__ ws, const T* __restrict__ bias, T* __restrict__ y,
                                  int splits, int M, int N) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t mn = static_cast<int64_t>(M) * N;
  if (i >= mn) return;
  float s = 0.f;
  for (int p = 0; p < splits; ++p) s += ws[p * mn + i];
  if (bias != nullptr) s += owq_to_float(bias[i % N]);
  y[i] = owq_from_float<T>(s);
}

template <typename T, typename S>
__global__ void owq_dequant_kernel(const int32_t* __restrict__ pa, const int32_t* __restrict__ pb,
                                   const S* __restrict__ scales, const uint8_t* __restrict__ zeros,
                                   T* __restrict__ out, int N, int K, int group, int bits) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n < N) owq_dequant_block(pa, pb, scales, zeros, N, n, blockIdx.y * 32, K, group, bits, out);
}

template <typename T>
__global__ void owq_scatter_weak_kernel(const int32_t* __restrict__ idx, const T* __restrict__ wo, T* __restrict__ out,
                                        int N) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  const int o = blockIdx.y;
  if (n < N) out[static_cast<int64_t>(idx[o]) * N + n] = wo[static_cast<int64_t>(o) * N + n];
}

template <typename T, typename S>
static int gemv(const void* x, int64_t stride_x, const void* pa, const void* pb, const void* scales, const void* zeros,
                const void* idx, const void* wo, const void* bias, void* ws, void* y, int M, int N, int K, int n_o,
                int group, int bits, int splits, int k_per_split, cudaStream_t stream) {
  if (M < 1 || M > OWQ_GEMV_MAX_M || k_per_split % 32 || group % 32 && group < K) return cudaErrorInvalidValue;
  const dim3 grid((N + OWQ_THREADS - 1) / OWQ_THREADS, splits);
  const size_t smem = sizeof(float) * M * k_per_split;
  owq_gemv_kernel<T, S><<<grid, OWQ_THREADS, smem, stream>>>(
      static_cast<const T*>(x), stride_x, static_cast<const int32_t*>(pa), static_cast<const int32_t*>(pb),
      static_cast<const S*>(scales), static_cast<const uint8_t*>(zeros), static_cast<const int32_t*>(idx),
      static_cast<const T*>(wo), static_cast<float*>(ws), M, N, K, n_o, group, k_per_split, bits);
  const int64_t mn = static_cast<int64_t>(M) * N;
  owq_reduce_kernel<T><<<(mn + OWQ_THREADS - 1) / OWQ_THREADS, OWQ_THREADS, 0, stream>>>(
      static_cast<const float*>(ws), static_cast<const T*>(bias), static_cast<T*>(y), splits, M, N);
  return cudaGetLastError();
}

template <typename T, typename S>
static int dequant(const void* pa, const void* pb, const void* scales, const void* zeros, const void* idx,
                   const void* wo, void* out, int N, int K, int n_o, int group, int bits, cudaStream_t stream) {
  if (group % 32 && group < K) return cudaErrorInvalidValue;
  const dim3 grid((N + OWQ_THREADS - 1) / OWQ_THREADS, (K + 31) / 32);
  owq_dequant_kernel<T, S><<<grid, OWQ_THREADS, 0, stream>>>(
      static_cast<const int32_t*>(pa), static_cast<const int32_t*>(pb), static_cast<const S*>(scales),
      static_cast<const uint8_t*>(zeros), static_cast<T*>(out), N, K, group, bits);
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

int owq_gemv(int act, int scale_is_float, const void* x, int64_t stride_x, const void* pa, const void* pb,
             const void* scales, const void* zeros, const void* idx, const void* wo, const void* bias, void* ws,
             void* y, int M, int N, int K, int n_o, int group, int bits, int splits, int k_per_split, void* stream) {
  OWQ_DISPATCH(gemv, x, stride_x, pa, pb, scales, zeros, idx, wo, bias, ws, y, M, N, K, n_o, group, bits, splits,
               k_per_split, static_cast<cudaStream_t>(stream))
}

int owq_dequant(int act, int scale_is_float, const void* pa, const void* pb, const void* scales, const void* zeros,
                const void* idx, const void* wo, void* out, int N, int K, int n_o, int group, int bits, void* stream) {
  OWQ_DISPATCH(dequant, pa, pb, scales, zeros, idx, wo, out, N, K, n_o, group, bits, static_cast<cudaStream_t>(stream))
}

int owq_gemv_max_m() { return OWQ_GEMV_MAX_M; }

}  // extern "C"
