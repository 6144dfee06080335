// Host-run check of owq_dequant.cuh (built with nvcc and run on the CPU by tests/test_kernels_cuda.py).
//
// usage: owq_host_check dequant|gemv < input
// input : bits K N groups M n_o k_per_split, then as whitespace-separated numbers: plane a words, plane b words
//         (3-bit only), scales as fp16 bit patterns [groups, N], zero-points [groups, N], weak indices [n_o],
//         W_o [n_o, N] and x [M, K] as floats.
// output: dequant -> the scratch [K, N] from owq_dequant_block (after checking owq_decode32 against owq_code);
//         gemv    -> y [M, N] from the GEMV's per-column body, emulating its launch: K split into k_per_split
//                    chunks staged as fp32, the weak tail in the last split, partials summed in split order.
#include <cstdio>
#include <cstring>
#include <vector>

#include "owq_dequant.cuh"

int main(int argc, char** argv) {
  const bool gemv = argc > 1 && strcmp(argv[1], "gemv") == 0;
  int bits, K, N, groups, M, n_o, kps;
  if (scanf("%d %d %d %d %d %d %d", &bits, &K, &N, &groups, &M, &n_o, &kps) != 7) return 2;
  const int kp = (K + 31) / 32 * 32;
  const int wa = bits == 3 ? 2 : bits, wb = bits == 3 ? 1 : 0;
  std::vector<int32_t> a(kp * wa / 32 * N), b(kp * wb / 32 * N + 1), idx(n_o + 1);
  std::vector<__half> s(groups * N);
  std::vector<uint8_t> z(groups * N);
  std::vector<float> wo(n_o * N + 1), x(M * K);
  unsigned u;
  for (auto& v : a) scanf("%d", &v);
  for (size_t i = 0; i + 1 < b.size(); ++i) scanf("%d", &b[i]);
  for (auto& v : s) { scanf("%u", &u); v = __ushort_as_half(static_cast<unsigned short>(u)); }
  for (auto& v : z) { scanf("%u", &u); v = static_cast<uint8_t>(u); }
  for (int o = 0; o < n_o; ++o) scanf("%d", &idx[o]);
  for (int i = 0; i < n_o * N; ++i) scanf("%f", &wo[i]);
  for (auto& v : x) scanf("%f", &v);
  const int group = K / groups;

  if (!gemv) {
    std::vector<float> out(static_cast<size_t>(K) * N);
    for (int n = 0; n < N; ++n)
      for (int k0 = 0; k0 < kp; k0 += 32) {
        uint32_t codes[32];
        owq_decode32(a.data(), b.data(), N, k0, n, bits, codes);
        for (int j = 0; j < 32; ++j)
          if (codes[j] != owq_code(a.data(), b.data(), N, k0 + j, n, bits)) {
            fprintf(stderr, "owq_decode32 != owq_code at k=%d n=%d\n", k0 + j, n);
            return 1;
          }
        if (k0 < K) owq_dequant_block(a.data(), b.data(), s.data(), z.data(), N, n, k0, K, group, bits, out.data());
      }
    for (int k = 0; k < K; ++k) {
      for (int n = 0; n < N; ++n) printf("%.9g ", out[static_cast<size_t>(k) * N + n]);
      printf("\n");
    }
    return 0;
  }

  const int splits = (K + kps - 1) / kps;
  std::vector<float> ws(static_cast<size_t>(splits) * M * N), xs(static_cast<size_t>(M) * kps);
  for (int split = 0; split < splits; ++split) {
    const int k_lo = split * kps, len = (K < k_lo + kps ? K : k_lo + kps) - k_lo;
    for (int m = 0; m < M; ++m)
      for (int kk = 0; kk < len; ++kk) xs[m * kps + kk] = x[m * K + k_lo + kk];
    for (int n = 0; n < N; ++n) {
      float acc[OWQ_GEMV_MAX_M] = {0.f};
      owq_column_dot(a.data(), b.data(), s.data(), z.data(), N, n, k_lo, len, group, bits, xs.data(), kps, M, acc);
      if (split == splits - 1) owq_weak_tail(x.data(), K, idx.data(), wo.data(), n_o, N, n, M, acc);
      for (int m = 0; m < M; ++m) ws[(static_cast<size_t>(split) * M + m) * N + n] = acc[m];
    }
  }
  for (int m = 0; m < M; ++m) {
    for (int n = 0; n < N; ++n) {
      float y = 0.f;
      for (int split = 0; split < splits; ++split) y += ws[(static_cast<size_t>(split) * M + m) * N + n];
      printf("%.9g ", y);
    }
    printf("\n");
  }
  return 0;
}
