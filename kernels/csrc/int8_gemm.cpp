// int8-weight GEMMs for the quantized inference mode. Two schemes:
//   weight-only (W8A16, what the engine serves): y[m, o] = sw[o] * sum_k wq[o, k] * x[m, k], fp32 accumulation;
//   W8A8: y[m, o] = sx[m] * sw[o] * sum_k xq[m, k] * wq[o, k], exact int32 accumulation.
// Measured on SmolLM2-135M (held-out perplexity, HF float32): dense 24.03, weight-only 23.97 (x1.00), W8A8 with
// per-token activations 24.78 (x1.03) — the activation quantization costs the quality, so the mode is
// weight-only; W8A8 stays for comparison (`featurelens bench modes`) and for a CPU with fast int8 dot products.
//
// Weights: int8, [out, in] row-major, symmetric per-output-channel scales sw (quantize_weight in
// kernels/int8_gemm.py). Activations: quantized here, per row (token), symmetric dynamic: sx = max|x| / 127,
// xq = nearbyint(x / sx) — the same scheme as vLLM's oneDNN W8A8 path that the engine uses for larger M, so
// both paths compute the same integer dot products (exact int32 accumulation) and differ only in rounding of
// the final float scaling.
//
// Why hand-written: at decode sizes (M = 1..16) vLLM's oneDNN int8 primitive measured 3.0 ms for SmolLM2's
// gate_up projection at M = 1 on the 2-core AVX2 dev box, 7x slower than the bf16 F.linear it should beat
// (see docs/modes.md). This kernel reads each weight row once for all M rows (it stays in L1 across them),
// widens int8 -> int16 (vpmovsxbw) and multiplies-adds pairs into int32 (vpmaddwd): 16 weights per 3 ops.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

template <typename T>
inline float to_float(T v) { return static_cast<float>(v); }

// Quantize one activation row to int16-held int8 values; returns the scale (0 for an all-zero row).
template <typename T>
float quantize_row(const T* x, int64_t k, int16_t* out) {
  float amax = 0.f;
  for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(to_float(x[i])));
  if (amax == 0.f) {
    std::fill(out, out + k, int16_t{0});
    return 0.f;
  }
  const float scale = amax / 127.f;
  for (int64_t i = 0; i < k; ++i) {
    float q = std::nearbyint(to_float(x[i]) / scale);
    q = std::min(127.f, std::max(-127.f, q));
    out[i] = static_cast<int16_t>(q);
  }
  return scale;
}

inline int32_t dot_i8_i16(const int8_t* w, const int16_t* x, int64_t k) {
  __m256i acc0 = _mm256_setzero_si256();
  __m256i acc1 = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 32 <= k; i += 32) {
    __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i)));
    __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i + 16)));
    __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i));
    __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i + 16));
    acc0 = _mm256_add_epi32(acc0, _mm256_madd_epi16(w0, x0));
    acc1 = _mm256_add_epi32(acc1, _mm256_madd_epi16(w1, x1));
  }
  for (; i + 16 <= k; i += 16) {
    __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i)));
    __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i));
    acc0 = _mm256_add_epi32(acc0, _mm256_madd_epi16(w0, x0));
  }
  acc0 = _mm256_add_epi32(acc0, acc1);
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc0), _mm256_extracti128_si256(acc0, 1));
  s = _mm_hadd_epi32(s, s);
  s = _mm_hadd_epi32(s, s);
  int32_t total = _mm_cvtsi128_si32(s);
  for (; i < k; ++i) total += static_cast<int32_t>(w[i]) * static_cast<int32_t>(x[i]);
  return total;
}

template <typename T>
torch::Tensor run(const torch::Tensor& x, const torch::Tensor& wq, const torch::Tensor& sw) {
  const int64_t m = x.size(0), k = x.size(1), n = wq.size(0);
  std::vector<int16_t> xq(static_cast<size_t>(m * k));
  std::vector<float> sx(static_cast<size_t>(m));
  const T* xp = x.data_ptr<T>();
  for (int64_t r = 0; r < m; ++r) sx[r] = quantize_row(xp + r * k, k, xq.data() + r * k);

  auto out = torch::empty({m, n}, x.options());
  T* yp = out.data_ptr<T>();
  const int8_t* wp = wq.data_ptr<int8_t>();
  const float* swp = sw.data_ptr<float>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const int8_t* row = wp + o * k;
      if (o + 4 < end) _mm_prefetch(reinterpret_cast<const char*>(wp + (o + 4) * k), _MM_HINT_T0);
      for (int64_t r = 0; r < m; ++r) {
        const int32_t acc = dot_i8_i16(row, xq.data() + r * k, k);
        yp[r * n + o] = static_cast<T>(static_cast<float>(acc) * sx[r] * swp[o]);
      }
    }
  });
  return out;
}

// ---- weight-only (W8A16): y[m, o] = sw[o] * sum_k float(wq[o, k]) * x[m, k], fp32 accumulation ----

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

inline __m256 load_w8(const int8_t* w) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w))));
}

// One int8 weight row against one fp32 activation row, the row widened on the fly (M = 1: read once anyway).
inline float dot_i8_f32(const int8_t* w, const float* x, int64_t k) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= k; i += 32) {
    a0 = _mm256_fmadd_ps(load_w8(w + i), _mm256_loadu_ps(x + i), a0);
    a1 = _mm256_fmadd_ps(load_w8(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
    a2 = _mm256_fmadd_ps(load_w8(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
    a3 = _mm256_fmadd_ps(load_w8(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
  }
  for (; i + 8 <= k; i += 8) a0 = _mm256_fmadd_ps(load_w8(w + i), _mm256_loadu_ps(x + i), a0);
  float total = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; i < k; ++i) total += static_cast<float>(w[i]) * x[i];
  return total;
}

inline float dot_f32(const float* w, const float* x, int64_t k) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= k; i += 32) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
  }
  for (; i + 8 <= k; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
  float total = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; i < k; ++i) total += w[i] * x[i];
  return total;
}

template <typename T>
torch::Tensor run_w8a16(const torch::Tensor& x, const torch::Tensor& wq, const torch::Tensor& sw) {
  const int64_t m = x.size(0), k = x.size(1), n = wq.size(0);
  std::vector<float> xf(static_cast<size_t>(m * k));
  const T* xp = x.data_ptr<T>();
  for (int64_t i = 0; i < m * k; ++i) xf[i] = to_float(xp[i]);
  auto out = torch::empty({m, n}, x.options());
  T* yp = out.data_ptr<T>();
  const int8_t* wp = wq.data_ptr<int8_t>();
  const float* swp = sw.data_ptr<float>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> wrow(m > 1 ? static_cast<size_t>(k) : 0);  // M > 1: widen each row once, reuse M times
    for (int64_t o = begin; o < end; ++o) {
      const int8_t* row = wp + o * k;
      if (o + 4 < end) _mm_prefetch(reinterpret_cast<const char*>(wp + (o + 4) * k), _MM_HINT_T0);
      if (m == 1) {
        yp[o] = static_cast<T>(dot_i8_f32(row, xf.data(), k) * swp[o]);
        continue;
      }
      int64_t i = 0;
      for (; i + 8 <= k; i += 8) _mm256_storeu_ps(wrow.data() + i, load_w8(row + i));
      for (; i < k; ++i) wrow[i] = static_cast<float>(row[i]);
      for (int64_t r = 0; r < m; ++r) yp[r * n + o] = static_cast<T>(dot_f32(wrow.data(), xf.data() + r * k, k) * swp[o]);
    }
  });
  return out;
}

torch::Tensor int8_gemm_w8a16(torch::Tensor x, torch::Tensor wq, torch::Tensor sw) {
  TORCH_CHECK(x.dim() == 2 && wq.dim() == 2 && sw.dim() == 1, "int8_gemm_w8a16: x [M, K], wq [N, K], sw [N]");
  TORCH_CHECK(x.size(1) == wq.size(1) && sw.size(0) == wq.size(0), "int8_gemm_w8a16: shapes do not match");
  TORCH_CHECK(wq.scalar_type() == torch::kInt8 && sw.scalar_type() == torch::kFloat32,
              "int8_gemm_w8a16: wq must be int8, sw float32");
  TORCH_CHECK(x.device().is_cpu() && wq.device().is_cpu() && sw.device().is_cpu(), "int8_gemm_w8a16: CPU tensors");
  auto xc = x.contiguous();
  auto wc = wq.contiguous();
  auto sc = sw.contiguous();
  switch (xc.scalar_type()) {
    case torch::kFloat32: return run_w8a16<float>(xc, wc, sc);
    case torch::kBFloat16: return run_w8a16<at::BFloat16>(xc, wc, sc);
    case torch::kFloat16: return run_w8a16<at::Half>(xc, wc, sc);
    default: TORCH_CHECK(false, "int8_gemm_w8a16: x must be float32, bfloat16 or float16");
  }
}

torch::Tensor int8_gemm(torch::Tensor x, torch::Tensor wq, torch::Tensor sw) {
  TORCH_CHECK(x.dim() == 2 && wq.dim() == 2 && sw.dim() == 1, "int8_gemm: x [M, K], wq [N, K], sw [N]");
  TORCH_CHECK(x.size(1) == wq.size(1) && sw.size(0) == wq.size(0), "int8_gemm: shapes do not match");
  TORCH_CHECK(wq.scalar_type() == torch::kInt8 && sw.scalar_type() == torch::kFloat32,
              "int8_gemm: wq must be int8, sw float32");
  TORCH_CHECK(x.device().is_cpu() && wq.device().is_cpu() && sw.device().is_cpu(), "int8_gemm: CPU tensors");
  auto xc = x.contiguous();
  auto wc = wq.contiguous();
  auto sc = sw.contiguous();
  switch (xc.scalar_type()) {
    case torch::kFloat32: return run<float>(xc, wc, sc);
    case torch::kBFloat16: return run<at::BFloat16>(xc, wc, sc);
    case torch::kFloat16: return run<at::Half>(xc, wc, sc);
    default: TORCH_CHECK(false, "int8_gemm: x must be float32, bfloat16 or float16");
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_gemm", &int8_gemm, "W8A8 small-M GEMM (dynamic per-row activation quantization)");
  m.def("int8_gemm_w8a16", &int8_gemm_w8a16, "int8-weight GEMM with float activations (weight-only)");
}
