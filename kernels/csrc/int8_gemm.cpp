// int8-weight GEMMs for the quantized inference mode. Two schemes:
//   weight-only (W8A16, what the engine serves): y[m, o] = sw[o] * sum_k wq[o, k] * x[m, k], fp32 accumulation;
//   W8A8: y[m, o] = sx[m] * sw[o] * sum_k xq[m, k] * wq[o, k], exact int32 accumulation.
// On SmolLM2-135M weight-only keeps held-out perplexity at x1.00 of dense and W8A8 with per-token activations
// costs x1.03 (docs/modes.md) — the activation quantization costs the quality, so the mode is weight-only;
// W8A8 stays for comparison (`featurelens bench modes`) and for a CPU with fast int8 dot products.
//
// Weights: int8, [out, in] row-major, symmetric per-output-channel scales sw (quantize_weight in
// kernels/int8_gemm.py). Activations: quantized here, per row (token), symmetric dynamic: sx = max|x| / 127,
// xq = nearbyint(x / sx) — the same scheme as vLLM's oneDNN W8A8 path that the engine uses for larger M, so
// both paths compute the same integer dot products (exact int32 accumulation) and differ only in rounding of
// the final float scaling.
//
// Why hand-written: at decode sizes (M = 1..16) vLLM's oneDNN int8 primitive measured several times slower than
// the bf16 F.linear it should beat (see docs/modes.md). This kernel reads each weight row once for all M rows
// (it stays in L1 across them), widens int8 -> int16 (vpmovsxbw) and multiplies-adds pairs into int32
// (vpmaddwd): 16 weights per 3 ops.
// The weight-only GEMM has AVX-512 paths too, picked at run time where the CPU has them (section below).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include "isa.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

namespace {

template <typename T>
inline float to_float(T v) { return static_cast<float>(v); }

// Every 64 bytes of weights read, the line kStreamAhead bytes further down the thread's range of weight rows is
// prefetched (`stop` = the end of that range). On an Emerald Rapids box the hardware prefetcher does not run
// far enough ahead of one stream: with the row-ahead prefetch alone the kernel read about half the bandwidth
// of a pure streaming read, and a line ~2 KB ahead recovered much of the gap (further ahead gained little).
// These prefetches fill L1. Filling L2 instead (as the sparse walk does on AMD, isa.h) measured slower for this
// single stream on Zen 4 (figures: docs/measurements/).
constexpr int64_t kStreamAhead = 2048;

inline void prefetch_stream(const int8_t* p, const int8_t* stop) {
  if (p + kStreamAhead < stop) _mm_prefetch(reinterpret_cast<const char*>(p + kStreamAhead), _MM_HINT_T0);
}

// The AVX2 paths' form: at the start of a row, the lines of the k bytes kStreamAhead further on.
inline void prefetch_span(const int8_t* row, int64_t k, const int8_t* stop) {
  for (int64_t i = 0; i < k; i += 64) prefetch_stream(row + i, stop);
}


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
      prefetch_span(row, k, wp + end * k);
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
void run_w8a16_avx2(const torch::Tensor& x, const torch::Tensor& wq, const torch::Tensor& sw, torch::Tensor& out) {
  const int64_t m = x.size(0), k = x.size(1), n = wq.size(0);
  std::vector<float> xf(static_cast<size_t>(m * k));
  const T* xp = x.data_ptr<T>();
  for (int64_t i = 0; i < m * k; ++i) xf[i] = to_float(xp[i]);
  T* yp = out.data_ptr<T>();
  const int8_t* wp = wq.data_ptr<int8_t>();
  const float* swp = sw.data_ptr<float>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> wrow(m > 1 ? static_cast<size_t>(k) : 0);  // M > 1: widen each row once, reuse M times
    for (int64_t o = begin; o < end; ++o) {
      const int8_t* row = wp + o * k;
      if (o + 4 < end) _mm_prefetch(reinterpret_cast<const char*>(wp + (o + 4) * k), _MM_HINT_T0);
      prefetch_span(row, k, wp + end * k);
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
}

// ---- weight-only on AVX-512 (runtime-dispatched: the build stays portable, these functions alone are compiled
// for AVX-512 and only called when the CPU has it) ----
//
// The AVX2 path widens 8 weights per 3 ops; for M > 1 it widens each row into an fp32 buffer and re-reads it
// once per activation row with 8-wide FMAs. Here, per weight row, in registers (nothing is buffered):
//   M <= 3, or activations not bf16: 16 weights per vpmovsxbd + vcvtdq2ps, then one FMA per activation row
//     (fp32 activations, fp32 accumulation: the AVX2 path's arithmetic);
//   M >= 4 with bf16 activations (the engine's dtype): 32 weights dequantized to bf16 (exact for int8), then
//     one vdpbf16ps (32 products) per activation row, 8 rows per pass. bf16 x bf16 products are exact in fp32
//     and accumulate in fp32, so both equal the fp32 reference up to summation order.
// Chosen against alternatives timed in a standalone harness (1 thread, one SmolLM2 block, weights cold, Zen 5;
// figures in docs/measurements/): fp32 FMA rows are fastest up to M = 3 and dpbf16 over 8 rows from M = 4,
// both well ahead of the AVX2 path and of dequantizing 4 rows into an L1 bf16 buffer with a 4x4 register tile.
// For M = 1, four weight rows sharing each activation load were slower (four streams defeat the prefetcher);
// prefetching 2/8/16 rows ahead or 2 lines changed nothing. Masked loads on every chunk (not just the tail)
// made the cold M = 2..4 runs 3-4x slower, so full chunks use plain loads.
using featurelens::Isa;
Isa g_isa = featurelens::best_isa();

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")

inline __m512 load16_w8(const int8_t* w) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
}

inline __m512 load16_w8_tail(const int8_t* w, __mmask16 mask) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, w)));
}

inline void prefetch_row_ahead(const int8_t* w, int64_t o, int64_t end, int64_t k) {
  if (o + 4 < end) _mm_prefetch(reinterpret_cast<const char*>(w + 4 * k), _MM_HINT_T0);
}


// M = 1: y[o] = sw[o] * dot(wq[o, :], x), 64 weights per step in four accumulators.
template <typename T>
void w8a16_m1_avx512(const int8_t* wp, const float* x, int64_t k, const float* swp, T* yp, int64_t begin,
                     int64_t end) {
  const int64_t k64 = k & ~int64_t{63}, k16 = k & ~int64_t{15};
  const __mmask16 tail = static_cast<__mmask16>((1u << (k - k16)) - 1u);
  const int8_t* stop = wp + end * k;
  for (int64_t o = begin; o < end; ++o) {
    const int8_t* w = wp + o * k;
    prefetch_row_ahead(w, o, end, k);
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i < k64; i += 64) {
      prefetch_stream(w + i, stop);
      a0 = _mm512_fmadd_ps(load16_w8(w + i), _mm512_loadu_ps(x + i), a0);
      a1 = _mm512_fmadd_ps(load16_w8(w + i + 16), _mm512_loadu_ps(x + i + 16), a1);
      a2 = _mm512_fmadd_ps(load16_w8(w + i + 32), _mm512_loadu_ps(x + i + 32), a2);
      a3 = _mm512_fmadd_ps(load16_w8(w + i + 48), _mm512_loadu_ps(x + i + 48), a3);
    }
    for (; i < k16; i += 16) a0 = _mm512_fmadd_ps(load16_w8(w + i), _mm512_loadu_ps(x + i), a0);
    if (tail) a1 = _mm512_fmadd_ps(load16_w8_tail(w + k16, tail), _mm512_maskz_loadu_ps(tail, x + k16), a1);
    yp[o] = static_cast<T>(_mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))) * swp[o]);
  }
}

// MM (2..4) fp32 activation rows xf[j * k ...]: y[j * n + o], 16 weights widened once per MM FMAs.
template <int MM, typename T>
void w8a16_rows_f32(const int8_t* wp, const float* xf, int64_t k, int64_t n, const float* swp, T* yp,
                    int64_t begin, int64_t end) {
  const int64_t k16 = k & ~int64_t{15};
  const __mmask16 tail = static_cast<__mmask16>((1u << (k - k16)) - 1u);
  const int8_t* stop = wp + end * k;
  for (int64_t o = begin; o < end; ++o) {
    const int8_t* w = wp + o * k;
    prefetch_row_ahead(w, o, end, k);
    __m512 acc[MM];
    for (int j = 0; j < MM; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t i = 0; i < k16; i += 16) {
      if ((i & 63) == 0) prefetch_stream(w + i, stop);
      const __m512 wv = load16_w8(w + i);
      for (int j = 0; j < MM; ++j) acc[j] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xf + j * k + i), acc[j]);
    }
    if (tail) {
      const __m512 wv = load16_w8_tail(w + k16, tail);
      for (int j = 0; j < MM; ++j) acc[j] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(tail, xf + j * k + k16), acc[j]);
    }
    for (int j = 0; j < MM; ++j) yp[j * n + o] = static_cast<T>(_mm512_reduce_add_ps(acc[j]) * swp[o]);
  }
}

// 32 int8 weights -> 32 bf16 (exact), lanes in order; `count` < 32 zero-fills the rest.
inline __m512bh dequant32_bf16(const int8_t* w, int64_t count) {
  const __m256i b = count >= 32 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w))
                                : _mm256_maskz_loadu_epi8(static_cast<__mmask32>((1ull << count) - 1ull), w);
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
  return _mm512_cvtne2ps_pbh(hi, lo);
}

// MM (1..8) bf16 activation rows xs[j * kp ...], zero-padded to kp (a multiple of 32): y[j * n + o].
template <int MM>
void w8a16_rows_bf16(const int8_t* wp, const at::BFloat16* xs, int64_t k, int64_t kp, int64_t n,
                     const float* swp, at::BFloat16* yp, int64_t begin, int64_t end) {
  const int8_t* stop = wp + end * k;
  for (int64_t o = begin; o < end; ++o) {
    const int8_t* w = wp + o * k;
    prefetch_row_ahead(w, o, end, k);
    __m512 acc[MM];
    for (int j = 0; j < MM; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t i = 0; i < kp; i += 32) {
      if ((i & 63) == 0) prefetch_stream(w + i, stop);
      const __m512bh wv = dequant32_bf16(w + i, k - i);
      for (int j = 0; j < MM; ++j)
        acc[j] = _mm512_dpbf16_ps(acc[j], wv, reinterpret_cast<__m512bh>(_mm512_loadu_si512(xs + j * kp + i)));
    }
    for (int j = 0; j < MM; ++j) yp[j * n + o] = static_cast<at::BFloat16>(_mm512_reduce_add_ps(acc[j]) * swp[o]);
  }
}


// Rows of the dequantized weight out[r, :] = bf16(wq[r, :] * sw[r]) (round to nearest even), 16 per step.
void dequant_rows_bf16_avx512(const int8_t* wp, const float* swp, int64_t k, at::BFloat16* op, int64_t begin,
                              int64_t end) {
  const int64_t k16 = k & ~int64_t{15};
  const __mmask16 tail = static_cast<__mmask16>((1u << (k - k16)) - 1u);
  const int8_t* stop = wp + end * k;
  for (int64_t r = begin; r < end; ++r) {
    const int8_t* w = wp + r * k;
    at::BFloat16* o = op + r * k;
    const __m512 s = _mm512_set1_ps(swp[r]);
    for (int64_t i = 0; i < k16; i += 16) {
      if ((i & 63) == 0) prefetch_stream(w + i, stop);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + i),
                          reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_mul_ps(load16_w8(w + i), s))));
    }
    if (tail)
      _mm256_mask_storeu_epi16(o + k16, tail,
                               reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_mul_ps(load16_w8_tail(w + k16, tail), s))));
  }
}

#pragma GCC pop_options

// Rows [r0, r0 + mm) of x against output rows [begin, end), mm <= 4 (fp32 rows) or <= 8 (bf16 rows).
template <typename T>
void rows_f32(int64_t mm, const int8_t* wp, const float* xf, int64_t k, int64_t n, const float* swp, T* yp,
              int64_t begin, int64_t end) {
  switch (mm) {
    case 1: return w8a16_m1_avx512(wp, xf, k, swp, yp, begin, end);
    case 2: return w8a16_rows_f32<2>(wp, xf, k, n, swp, yp, begin, end);
    case 3: return w8a16_rows_f32<3>(wp, xf, k, n, swp, yp, begin, end);
    default: return w8a16_rows_f32<4>(wp, xf, k, n, swp, yp, begin, end);
  }
}

void rows_bf16(int64_t mm, const int8_t* wp, const at::BFloat16* xs, int64_t k, int64_t kp, int64_t n,
               const float* swp, at::BFloat16* yp, int64_t begin, int64_t end) {
  switch (mm) {
    case 1: return w8a16_rows_bf16<1>(wp, xs, k, kp, n, swp, yp, begin, end);
    case 2: return w8a16_rows_bf16<2>(wp, xs, k, kp, n, swp, yp, begin, end);
    case 3: return w8a16_rows_bf16<3>(wp, xs, k, kp, n, swp, yp, begin, end);
    case 4: return w8a16_rows_bf16<4>(wp, xs, k, kp, n, swp, yp, begin, end);
    case 5: return w8a16_rows_bf16<5>(wp, xs, k, kp, n, swp, yp, begin, end);
    case 6: return w8a16_rows_bf16<6>(wp, xs, k, kp, n, swp, yp, begin, end);
    case 7: return w8a16_rows_bf16<7>(wp, xs, k, kp, n, swp, yp, begin, end);
    default: return w8a16_rows_bf16<8>(wp, xs, k, kp, n, swp, yp, begin, end);
  }
}

// The AVX-512 weight-only GEMM; false without AVX-512 (the AVX2 path runs instead).
template <typename T>
bool run_w8a16_avx512(const torch::Tensor& x, const torch::Tensor& wq, const torch::Tensor& sw, torch::Tensor& out) {
  if (g_isa != Isa::kAvx512) return false;
  const int64_t m = x.size(0), k = x.size(1), n = wq.size(0);
  const int8_t* wp = wq.data_ptr<int8_t>();
  const float* swp = sw.data_ptr<float>();
  T* yp = out.data_ptr<T>();
  const T* xp = x.data_ptr<T>();
  if constexpr (std::is_same<T, at::BFloat16>::value) {
    if (m >= 4) {
      const int64_t kp = (k + 31) & ~int64_t{31};
      std::vector<at::BFloat16> xs(static_cast<size_t>(m * kp), at::BFloat16(0.f));
      for (int64_t r = 0; r < m; ++r) std::copy(xp + r * k, xp + (r + 1) * k, xs.begin() + r * kp);
      at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
        for (int64_t r0 = 0; r0 < m; r0 += 8)
          rows_bf16(std::min<int64_t>(8, m - r0), wp, xs.data() + r0 * kp, k, kp, n, swp, yp + r0 * n, begin, end);
      });
      return true;
    }
  }
  std::vector<float> xf(static_cast<size_t>(m * k));
  for (int64_t i = 0; i < m * k; ++i) xf[i] = to_float(xp[i]);
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r0 = 0; r0 < m; r0 += 4)
      rows_f32(std::min<int64_t>(4, m - r0), wp, xf.data() + r0 * k, k, n, swp, yp + r0 * n, begin, end);
  });
  return true;
}

template <typename T>
torch::Tensor run_w8a16(const torch::Tensor& x, const torch::Tensor& wq, const torch::Tensor& sw) {
  auto out = torch::empty({x.size(0), wq.size(0)}, x.options());
  if (!run_w8a16_avx512<T>(x, wq, sw, out)) run_w8a16_avx2<T>(x, wq, sw, out);
  return out;
}

// ---- dequantization, for the large-M path (kernels/int8_gemm.py `WeightOnlyGemm`): from ~16-32 rows on, the
// dequantized weight in one vectorized pass plus the engine's float GEMM (oneDNN; AMX tiles where present)
// beats any GEMV-style kernel here. out[r - row0, :] = wq[r, :] * sw[r] in out's dtype (float32 exact;
// bfloat16 / float16 rounded to nearest even, one rounding per weight, as a checkpoint in that dtype would be).
template <typename T>
void dequant_rows_portable(const int8_t* wp, const float* swp, int64_t k, T* op, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const int8_t* w = wp + r * k;
    T* o = op + r * k;
    const float s = swp[r];
    if constexpr (std::is_same<T, float>::value) {
      const __m256 sv = _mm256_set1_ps(s);
      int64_t i = 0;
      for (; i + 8 <= k; i += 8) _mm256_storeu_ps(o + i, _mm256_mul_ps(load_w8(w + i), sv));
      for (; i < k; ++i) o[i] = static_cast<float>(w[i]) * s;
    } else if constexpr (std::is_same<T, at::BFloat16>::value) {
      const __m256 sv = _mm256_set1_ps(s);
      const __m256i bias = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1);
      int64_t i = 0;
      for (; i + 8 <= k; i += 8) {  // round to nearest even: + 0x7FFF + the kept lsb, keep the high half
        const __m256i b = _mm256_castps_si256(_mm256_mul_ps(load_w8(w + i), sv));
        const __m256i r = _mm256_srli_epi32(
            _mm256_add_epi32(b, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(b, 16), one))), 16);
        const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(o + i), _mm256_castsi256_si128(packed));
      }
      for (; i < k; ++i) o[i] = static_cast<T>(static_cast<float>(w[i]) * s);
    } else {
      for (int64_t i = 0; i < k; ++i) o[i] = static_cast<T>(static_cast<float>(w[i]) * s);
    }
  }
}

void dequantize_rows(torch::Tensor wq, torch::Tensor sw, int64_t row0, torch::Tensor out) {
  TORCH_CHECK(wq.dim() == 2 && sw.dim() == 1 && out.dim() == 2, "dequantize_rows: wq [N, K], sw [N], out [R, K]");
  TORCH_CHECK(wq.scalar_type() == torch::kInt8 && sw.scalar_type() == torch::kFloat32,
              "dequantize_rows: wq must be int8, sw float32");
  TORCH_CHECK(wq.is_contiguous() && sw.is_contiguous() && out.is_contiguous(), "dequantize_rows: contiguous tensors");
  const int64_t k = wq.size(1), rows = out.size(0);
  TORCH_CHECK(out.size(1) == k && sw.size(0) == wq.size(0), "dequantize_rows: shapes do not match");
  TORCH_CHECK(row0 >= 0 && row0 + rows <= wq.size(0), "dequantize_rows: rows out of range");
  const int8_t* wp = wq.data_ptr<int8_t>() + row0 * k;
  const float* swp = sw.data_ptr<float>() + row0;
  switch (out.scalar_type()) {
    case torch::kBFloat16: {
      at::BFloat16* op = out.data_ptr<at::BFloat16>();
      at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
        if (g_isa == Isa::kAvx512) dequant_rows_bf16_avx512(wp, swp, k, op, begin, end);
        else dequant_rows_portable(wp, swp, k, op, begin, end);
      });
      return;
    }
    case torch::kFloat32: {
      float* op = out.data_ptr<float>();
      at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) { dequant_rows_portable(wp, swp, k, op, begin, end); });
      return;
    }
    case torch::kFloat16: {
      at::Half* op = out.data_ptr<at::Half>();
      at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) { dequant_rows_portable(wp, swp, k, op, begin, end); });
      return;
    }
    default: TORCH_CHECK(false, "dequantize_rows: out must be float32, bfloat16 or float16");
  }
}

// "avx512" or "avx2": the instruction set the weight-only GEMM uses; set_isa("avx2") forces the portable path
// (benchmarks and tests compare both), set_isa("avx512") is refused on a CPU without it.
std::string isa() { return featurelens::isa_name(g_isa); }

std::string set_isa(const std::string& name) {
  g_isa = featurelens::parse_isa(name);
  return isa();
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
  m.def("dequantize_rows", &dequantize_rows, "out = wq[row0 : row0 + len(out)] * sw (per row), in out's dtype");
  m.def("isa", &isa, "the instruction set of the weight-only GEMM: avx512 or avx2");
  m.def("set_isa", &set_isa, "force 'avx2', 'avx512' or 'auto' (the CPU's best); returns the one in use");
}
