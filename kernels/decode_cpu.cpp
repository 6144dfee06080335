// wct CPU decode step (docs/kernels.md "Decode loop"): one token of every sequence through all decoder layers of a
// Llama-family model in one call, so that a step costs its arithmetic and not ~25 Python tensor operations per
// layer. Per layer, in fp32 (wct/decoding.py writes the same step with torch operations for the prefill):
//   h = n₁(x);  q, k, v = W_q h, W_k h, W_v h;  q, k = rope(q), rope(k);  K[pos], V[pos] = k, v
//   x += W_o · softmax(q·Kᵀ·scale)·V  (each query head reads kv head h / (heads / kv_heads))
//   h = n₂(x);  x += W_down · (silu(W_gate h) ⊙ W_up h)
// with n(x) = x / sqrt(mean(x²) + eps) · w, rope(q)[d] = q[d]·cos[d] + q[(d + hd/2) mod hd]·sin±[d] (sin± = sin with
// its first half negated: rotate_half), and every W either an OWQ layer (owq_gemv over the planes, plus its weak
// columns W_o·x[idx] and bias) or a dense fp32 matrix.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

torch::Tensor owq_gemv(torch::Tensor x, std::vector<torch::Tensor> planes, torch::Tensor scales, torch::Tensor zeros,
                       torch::Tensor weak_idx, int64_t bits);  // kernels/owq_cpu.cpp

namespace {

struct Linear {
  std::vector<torch::Tensor> planes;
  torch::Tensor scales, zeros, idx, w_o, bias, dense;  // idx int32 [n_o], w_o fp32 [n_o, N]; bias / dense optional
  int64_t bits = 0;

  // y [B, N] = W x for x [B, K] fp32 contiguous.
  torch::Tensor operator()(const torch::Tensor& x) const {
    torch::Tensor y = dense.defined() ? at::matmul(x, dense.t()) : owq_gemv(x, planes, scales, zeros, idx, bits);
    const int64_t B = x.size(0), K = x.size(1), N = y.size(1), n_o = idx.defined() ? idx.numel() : 0;
    float* yp = y.data_ptr<float>();
    const float* xp = x.data_ptr<float>();
    for (int64_t j = 0; j < n_o; ++j) {  // the weak columns: y += x[:, idx_j] ⊗ W_o[j]
      const int64_t k = idx.data_ptr<int32_t>()[j];
      const float* w = w_o.data_ptr<float>() + j * N;
      for (int64_t b = 0; b < B; ++b) {
        const float xv = xp[b * K + k];
        for (int64_t n = 0; n < N; ++n) yp[b * N + n] += xv * w[n];
      }
    }
    if (bias.defined())
      for (int64_t b = 0; b < B; ++b)
        for (int64_t n = 0; n < N; ++n) yp[b * N + n] += bias.data_ptr<float>()[n];
    return y;
  }
};

struct Layer {
  Linear q, k, v, o, gate, up, down;
  torch::Tensor n1, n2;
  double e1, e2;
};

void rms_rows(const float* x, const float* w, float* y, int64_t M, int64_t d, double eps) {
  for (int64_t m = 0; m < M; ++m) {
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < d; ++i) ss += x[m * d + i] * x[m * d + i];
    const float r = 1.0f / std::sqrt(ss / static_cast<float>(d) + static_cast<float>(eps));
    for (int64_t i = 0; i < d; ++i) y[m * d + i] = w[i] * (x[m * d + i] * r);
  }
}

// rope in place on `heads` vectors of length hd at p.
void rope(float* p, int64_t heads, int64_t hd, const float* cos, const float* sin) {
  const int64_t half = hd / 2;
  float tmp[512];
  for (int64_t h = 0; h < heads; ++h, p += hd) {
    for (int64_t d = 0; d < hd; ++d) tmp[d] = p[d] * cos[d] + p[(d + half) % hd] * sin[d];
    for (int64_t d = 0; d < hd; ++d) p[d] = tmp[d];
  }
}

}  // namespace

// RMSNorm of the rows of x [M, d] fp32 (transformers' LlamaRMSNorm in fp32), for the Python prefill.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x must be fp32 [M, d]");
  TORCH_CHECK(w.scalar_type() == torch::kFloat && w.numel() == x.size(1), "w must be fp32 [d]");
  auto y = torch::empty_like(x);
  rms_rows(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), x.size(0), x.size(1), eps);
  return y;
}

// The decoder layers of one model; built once by wct/decoding.py, then `step` per token.
class DecodeStack {
 public:
  DecodeStack(int64_t heads, int64_t kv_heads, int64_t head_dim, double scaling)
      : heads_(heads), kv_heads_(kv_heads), hd_(head_dim), scaling_(scaling) {
    TORCH_CHECK(head_dim <= 512 && head_dim % 2 == 0 && heads % kv_heads == 0, "unsupported attention shape");
  }

  // linears: 7 tuples (planes, scales, zeros, weak_idx int32, weak_weight fp32, bias fp32 | None, dense fp32 | None,
  // bits)
  // in the order q, k, v, o, gate, up, down.
  void add_layer(torch::Tensor n1, double e1, torch::Tensor n2, double e2,
                 std::vector<std::tuple<std::vector<torch::Tensor>, torch::Tensor, torch::Tensor, torch::Tensor,
                                        torch::Tensor, std::optional<torch::Tensor>, std::optional<torch::Tensor>,
                                        int64_t>> linears) {
    TORCH_CHECK(linears.size() == 7, "a layer has 7 linears");
    std::vector<Linear> ls;
    for (auto& t : linears) {
      Linear l;
      std::tie(l.planes, l.scales, l.zeros, l.idx, l.w_o, std::ignore, std::ignore, l.bits) = t;
      if (std::get<5>(t)) l.bias = *std::get<5>(t);
      if (std::get<6>(t)) l.dense = *std::get<6>(t);
      ls.push_back(l);
    }
    layers_.push_back({ls[0], ls[1], ls[2], ls[3], ls[4], ls[5], ls[6], n1, n2, e1, e2});
  }

  // x [B, d] fp32 (one token per sequence at position pos) → the hidden state after the last layer; the caches
  // [layers, B, kv_heads, L, hd] get position pos; cos, sin± [hd] of that position.
  torch::Tensor step(torch::Tensor x, torch::Tensor k_cache, torch::Tensor v_cache, int64_t pos, torch::Tensor cos,
                     torch::Tensor sin) {
    x = x.contiguous().clone();
    const int64_t B = x.size(0), d = x.size(1), L = k_cache.size(3), G = heads_ / kv_heads_;
    TORCH_CHECK(pos < L && k_cache.size(1) == B, "position or batch outside the cache");
    const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
    auto h = torch::empty_like(x);
    auto attn = torch::empty({B, heads_ * hd_}, x.options());
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& ly = layers_[i];
      float* xp = x.data_ptr<float>();
      rms_rows(xp, ly.n1.data_ptr<float>(), h.data_ptr<float>(), B, d, ly.e1);
      auto q = ly.q(h), k = ly.k(h), v = ly.v(h);
      float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
      float* kc = k_cache[i].data_ptr<float>();  // [B, kv, L, hd]
      float* vc = v_cache[i].data_ptr<float>();
      for (int64_t b = 0; b < B; ++b) {
        rope(qp + b * heads_ * hd_, heads_, hd_, cp, sp);
        rope(kp + b * kv_heads_ * hd_, kv_heads_, hd_, cp, sp);
        for (int64_t g = 0; g < kv_heads_; ++g)
          for (int64_t e = 0; e < hd_; ++e) {
            kc[((b * kv_heads_ + g) * L + pos) * hd_ + e] = kp[(b * kv_heads_ + g) * hd_ + e];
            vc[((b * kv_heads_ + g) * L + pos) * hd_ + e] = vp[(b * kv_heads_ + g) * hd_ + e];
          }
      }
      float* ap = attn.data_ptr<float>();
      at::parallel_for(0, B * heads_, 1, [&](int64_t h0, int64_t h1) {
        std::vector<float> p(pos + 1);
        for (int64_t bh = h0; bh < h1; ++bh) {
          const int64_t b = bh / heads_, hh = bh % heads_, g = hh / G;
          const float* qv = qp + bh * hd_;
          const float* kb = kc + (b * kv_heads_ + g) * L * hd_;
          const float* vb = vc + (b * kv_heads_ + g) * L * hd_;
          float mx = -INFINITY;
          for (int64_t l = 0; l <= pos; ++l) {
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t e = 0; e < hd_; ++e) s += qv[e] * kb[l * hd_ + e];
            p[l] = s * static_cast<float>(scaling_);
            mx = std::max(mx, p[l]);
          }
          float den = 0.f;
          for (int64_t l = 0; l <= pos; ++l) den += (p[l] = std::exp(p[l] - mx));
          float* out = ap + bh * hd_;
          for (int64_t e = 0; e < hd_; ++e) out[e] = 0.f;
          for (int64_t l = 0; l <= pos; ++l) {
            const float w = p[l] / den;
            for (int64_t e = 0; e < hd_; ++e) out[e] += w * vb[l * hd_ + e];
          }
        }
      });
      auto o = ly.o(attn);
      x.add_(o);
      rms_rows(x.data_ptr<float>(), ly.n2.data_ptr<float>(), h.data_ptr<float>(), B, d, ly.e2);
      auto gt = ly.gate(h), up = ly.up(h);
      float *gp = gt.data_ptr<float>(), *upp = up.data_ptr<float>();
      for (int64_t j = 0; j < gt.numel(); ++j) gp[j] = gp[j] / (1.0f + std::exp(-gp[j])) * upp[j];
      x.add_(ly.down(gt));
    }
    return x;
  }

 private:
  int64_t heads_, kv_heads_, hd_;
  double scaling_;
  std::vector<Layer> layers_;
};

void bind_decode(pybind11::module& m) {
  m.def("rms_norm", &rms_norm, "RMSNorm of the rows of x [M, d] fp32 (transformers' LlamaRMSNorm in fp32)");
  pybind11::class_<DecodeStack>(m, "DecodeStack")
      .def(pybind11::init<int64_t, int64_t, int64_t, double>())
      .def("add_layer", &DecodeStack::add_layer)
      .def("step", &DecodeStack::step);
}
