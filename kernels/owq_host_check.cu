// Host-run check of owq_dequant.cuh (built with nvcc and run on the CPU by tests/test_kernels_cuda.py): the kernels'
// own decode and GEMV bodies, run on the CPU.
//
// usage: owq_host_check dequant|decode|general|fast [words] < input
//        words (3 bits): dequant and general read the 3-bit words instead of the v1 planes, as they do for a layer
//        holding them (the fast path reads them always); general and fast then get the planes overwritten with
//        garbage, so a read of them would show.
// input : bits K N groups M n_o splits, then as whitespace-separated numbers: plane a words, plane b words (3-bit
//         only), the 3-bit words of wct.format.layout.kernel_words3 [Kp/32*3, N] (3-bit only), scales as fp16 bit patterns [groups, N], zero-points [groups, N], weak indices [n_o], W_o [n_o, N]
//         and x [M, K] as floats.
// output: dequant -> the scratch [K, N] from owq_dequant_block (after checking owq_code32 against owq_code);
//         decode  -> [Kp, N]: code - zero of every row as the fast path's fp16x2 word decoders give it (3 bits:
//                    from the 3-bit words), put back in row order through owq_slot;
//         general, fast -> y [M, N] from the general / fast GEMV body, emulating the launch: K split into
//                    `splits` chunks (x staged per chunk), the weak columns spread over the splits, partials summed
//                    in split order as the last block of a tile does.
#include <cstdio>
#include <cstring>
#include <vector>

#include "owq_dequant.cuh"

struct Layer {
  int bits, K, N, groups, M, n_o, splits, group;
  std::vector<int32_t> a, b, w3, idx;
  std::vector<__half> s, wo16;  // wo16: W_o in fp16, as the fast path reads it
  std::vector<float> wo;
  std::vector<uint8_t> z;
  std::vector<float> x;
};

static bool read_layer(Layer& L) {
  if (scanf("%d %d %d %d %d %d %d", &L.bits, &L.K, &L.N, &L.groups, &L.M, &L.n_o, &L.splits) != 7) return false;
  const int kp = (L.K + 31) / 32 * 32, N = L.N;
  L.group = L.groups > 1 ? L.K / L.groups : kp;
  const int wa = L.bits == 3 ? 2 : L.bits, wb = L.bits == 3 ? 1 : 0;
  L.a.resize(kp * wa / 32 * N);
  L.b.resize(kp * wb / 32 * N + 4);
  L.w3.resize(L.bits == 3 ? kp / 32 * 3 * N : 0);
  L.idx.resize(L.n_o);
  L.s.resize(L.groups * N);
  L.z.resize(L.groups * N);
  L.wo.resize(L.n_o * N + 4);
  L.wo16.resize(L.n_o * N + 4);
  L.x.resize(L.M * L.K);
  unsigned u;
  for (auto& v : L.a) scanf("%d", &v);
  for (size_t i = 0; i + 4 < L.b.size(); ++i) scanf("%d", &L.b[i]);
  for (auto& v : L.w3) scanf("%d", &v);
  for (auto& v : L.s) { scanf("%u", &u); v = __ushort_as_half(static_cast<unsigned short>(u)); }
  for (auto& v : L.z) { scanf("%u", &u); v = static_cast<uint8_t>(u); }
  for (auto& v : L.idx) scanf("%d", &v);
  for (int i = 0; i < L.n_o * N; ++i) {
    scanf("%f", &L.wo[i]);
    L.wo16[i] = __float2half_rn(L.wo[i]);
  }
  for (auto& v : L.x) scanf("%f", &v);
  return true;
}

static void print_matrix(const std::vector<float>& v, int rows, int cols) {
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < cols; ++c) printf("%.9g ", v[static_cast<size_t>(r) * cols + c]);
    printf("\n");
  }
}

// Overwrite the v1 planes: the paths that read the 3-bit words must not touch them.
static void poison_planes(Layer& L) {
  for (auto& v : L.a) v = 0x5A5A5A5A;
  for (auto& v : L.b) v = static_cast<int32_t>(0xA5A5A5A5u);
}

template <int BITS, bool W3>
static int dequant(const Layer& L) {
  const int kp = (L.K + 31) / 32 * 32;
  std::vector<float> out(static_cast<size_t>(L.K) * L.N);
  for (int n = 0; n < L.N; ++n)
    for (int k0 = 0; k0 < kp; k0 += 32) {
      uint32_t w[BITS == 3 ? 3 : BITS];
      const int32_t* a = W3 ? L.w3.data() : L.a.data();
      owq_load32<BITS, W3>(a, L.b.data(), L.N, k0, n, w);
      for (int j = 0; j < 32; ++j)
        if (owq_code32<BITS, W3>(w, j) != owq_code(L.a.data(), L.b.data(), L.N, k0 + j, n, BITS)) {
          fprintf(stderr, "owq_code32 != owq_code at k=%d n=%d\n", k0 + j, n);
          return 1;
        }
      owq_dequant_block<BITS, W3>(a, L.b.data(), L.s.data(), L.z.data(), L.N, n, k0, L.K, L.group, out.data());
    }
  print_matrix(out, L.K, L.N);
  return 0;
}

template <int BITS>
static int decode(const Layer& L) {
  constexpr int R = OwqStep<BITS>::ROWS, P = OwqStep<BITS>::PAIRS, A_ROWS = BITS == 3 ? 16 : 32 / BITS;
  const int kp = (L.K + 31) / 32 * 32;
  std::vector<float> out(static_cast<size_t>(kp) * L.N);
  for (int n = 0; n < L.N; ++n)
    for (int k = 0; k < kp; k += R) {
      const int g = (k < L.K ? k : L.K - 1) / L.group;
      const uint32_t zw = static_cast<uint32_t>(L.z[g * L.N + n]) << (8 * (n % 4));  // as byte n % 4 of a word
      const __half2 zh = n % 4 == 0 ? owq_zero_h2<0>(zw) : n % 4 == 1 ? owq_zero_h2<1>(zw)
                         : n % 4 == 2 ? owq_zero_h2<2>(zw) : owq_zero_h2<3>(zw);
      __half2 t[R / 2];
      if constexpr (BITS == 3) {
        __half2 zc[3];
        n % 4 == 0 ? owq_zero3_h2<0>(zw, zc) : n % 4 == 1 ? owq_zero3_h2<1>(zw, zc)
                   : n % 4 == 2 ? owq_zero3_h2<2>(zw, zc) : owq_zero3_h2<3>(zw, zc);
        const int32_t* w = L.w3.data() + (k / 32) * 3 * L.N + n;
        owq_decode_words3(w[0], w[L.N], w[2 * L.N], zc, t);
      } else {
        for (int i = 0; i < R / A_ROWS; ++i) owq_decode_word<BITS>(L.a[(k / A_ROWS + i) * L.N + n], zh, t + i * P);
      }
      const __half* th = reinterpret_cast<const __half*>(t);
      for (int r = 0; r < R; ++r) out[static_cast<size_t>(k + r) * L.N + n] = __half2float(th[owq_slot<BITS>(r)]);
    }
  print_matrix(out, kp, L.N);
  return 0;
}

// The launch of owq_gemv_{fast,general} on the CPU: per split, stage x, run each thread's body, write partials;
// then the ordered sum of the last block.
template <int BITS, int M, bool FAST, bool W3>
static int gemv(const Layer& L) {
  constexpr int COLS = FAST ? OWQ_COLS : 1;
  const int R = FAST ? OwqStep<BITS>::ROWS : 32;
  const int align = L.groups > 1 ? L.group : 32;
  const int kps = ((L.K + L.splits - 1) / L.splits + align - 1) / align * align;
  const int splits = (L.K + kps - 1) / kps, N = L.N;
  if (FAST && N % OWQ_COLS) return 2;
  const int o_per = (L.n_o + splits - 1) / splits;
  std::vector<float> ws(static_cast<size_t>(splits) * M * N), xs32(static_cast<size_t>(M) * kps), xo(M * o_per + 1);
  std::vector<__half> xs16(static_cast<size_t>(M) * kps);
  for (int split = 0; split < splits; ++split) {
    const int k_lo = split * kps, len = (L.K < k_lo + kps ? L.K : k_lo + kps) - k_lo;
    const int len_pad = (len + R - 1) / R * R;
    if (FAST) {
      owq_stage_x_pairs<BITS>(L.x.data(), L.K, M, M, k_lo, len, len_pad, kps, xs16.data(), 0, 1);
    } else {
      for (int m = 0; m < M; ++m)
        for (int kk = 0; kk < len_pad; ++kk) xs32[m * kps + kk] = kk < len ? L.x[m * L.K + k_lo + kk] : 0.f;
    }
    const int o_lo = owq_weak_bound(L.n_o, split, splits), o_hi = owq_weak_bound(L.n_o, split + 1, splits);
    for (int m = 0; m < M; ++m)
      for (int o = o_lo; o < o_hi; ++o) xo[m * o_per + o - o_lo] = L.x[m * L.K + L.idx[o]];
    for (int n0 = 0; n0 < N; n0 += COLS) {
      float acc[COLS][M] = {};
      if constexpr (FAST)
        owq_fast_columns<BITS, M>(L.a.data(), L.b.data(), L.w3.data(), L.s.data(), L.z.data(), N, n0, k_lo,
                                  k_lo + len_pad, L.group, xs16.data(), kps, acc);
      else
        owq_general_column<BITS, M, W3>(W3 ? L.w3.data() : L.a.data(), L.b.data(), L.s.data(), L.z.data(), N, n0,
                                        k_lo, k_lo + len_pad, L.group, OwqStagedF32{xs32.data(), kps}, acc);
      if constexpr (FAST)
        owq_weak_columns<M, COLS>(L.wo16.data(), N, n0, o_lo, o_hi, xo.data(), o_per, acc);
      else
        owq_weak_columns<M, COLS>(L.wo.data(), N, n0, o_lo, o_hi, xo.data(), o_per, acc);
      for (int c = 0; c < COLS; ++c)
        for (int m = 0; m < M; ++m) ws[(static_cast<size_t>(split) * M + m) * N + n0 + c] = acc[c][m];
    }
  }
  std::vector<float> y(static_cast<size_t>(M) * N);
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      float s = splits == 1 ? ws[static_cast<size_t>(m) * N + n] : 0.f;
      for (int p = 0; splits > 1 && p < splits; ++p) s += ws[(static_cast<size_t>(p) * M + m) * N + n];
      y[static_cast<size_t>(m) * N + n] = s;
    }
  print_matrix(y, M, N);
  return 0;
}

template <int BITS, bool FAST, bool W3>
static int gemv_m(const Layer& L) {
  switch (L.M) {
    case 1: return gemv<BITS, 1, FAST, W3>(L);
    case 2: return gemv<BITS, 2, FAST, W3>(L);
    case 8: return gemv<BITS, 8, FAST, W3>(L);
    default: return 2;
  }
}

template <int BITS, bool W3>
static int run(const char* mode, Layer& L) {
  if (!strcmp(mode, "dequant")) return dequant<BITS, W3>(L);
  if (!strcmp(mode, "decode")) return decode<BITS>(L);
  if (BITS == 3 && (W3 || !strcmp(mode, "fast"))) poison_planes(L);
  if (!strcmp(mode, "general")) return gemv_m<BITS, false, W3>(L);
  if (!strcmp(mode, "fast")) return gemv_m<BITS, true, false>(L);
  return 2;
}

int main(int argc, char** argv) {
  Layer L;
  if (argc < 2 || !read_layer(L)) return 2;
  const bool words = argc > 2 && !strcmp(argv[2], "words");
  switch (L.bits) {
    case 2: return words ? 2 : run<2, false>(argv[1], L);
    case 3: return words ? run<3, true>(argv[1], L) : run<3, false>(argv[1], L);
    case 4: return words ? 2 : run<4, false>(argv[1], L);
    default: return 2;
  }
}
