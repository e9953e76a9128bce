// Sparse GEMV for batch-1 decode: y[o] = sum over active i of x[i] * W_t[i, o].
//
// W_t is the transposed weight, [in, out], so the weights of one INPUT channel are one contiguous row: a
// zeroed input skips a whole row and its bytes are never read. That is the entire point: decode at batch 1
// is bound by weight bytes, so reading half the rows should take about half the time.
//
// Why hand-written: torch's gather path (index_select of active rows, then a matmul) copies the active rows
// before reading them again and was slower than the dense matmul below ~65% sparsity on the dev CPU.
//
// Structure (chosen by measurement on the 2-core AMD EPYC / AVX2 dev box, see kernels/sparse_gemv.py):
//   1. one serial pass over x collects (index, value) of the active inputs (optionally applying the WINA
//      test |x_i| * ||W[:, i]|| >= threshold, so the engine does not need a separate mask kernel);
//   2. threads split the OUTPUT columns into contiguous ranges (no reduction between threads); each thread
//      walks the active rows 8 at a time across its whole range (up to 2048 columns per pass), so every
//      active row segment is read front to back as one sequential stream the hardware prefetcher follows,
//      and y's slice stays in L1. The first lines of the rows 8 ahead are software-prefetched: sparse rows
//      start at irregular strides, which the prefetcher cannot guess.
// bf16 weights are widened to fp32 on the fly (a 16-bit shift); accumulation is fp32 throughout.
//
// `sparse_gemv_parts` is the engine's entry: one call per (fused) projection module computes every part
// (q|k|v, gate|up) with its own WINA threshold, writes the result straight into the output tensor in its
// dtype and returns how many inputs were zeroed, so a decode step pays one Python->C++ call per module.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include "isa.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kColBlock = 64;      // parallel grain: 64 output columns = 4 (fp32) or 2 (bf16) cache lines
constexpr int64_t kSubBlock = 2048;    // columns per pass over the active rows: y's slice (8 KiB) stays in L1
constexpr int64_t kRowsPerPass = 8;    // active rows accumulated per pass over y
constexpr int64_t kPrefetchLines = 4;  // first lines of the first pass's rows prefetched before the walk
// Why this walk (alternatives timed in a standalone harness: 1 thread as in the vLLM worker, bf16, weights
// coming from DRAM; figures in docs/measurements/):
// - full-range passes beat 256-column passes, and 8 rows per pass over y beat 4 rows. Prefetching whole rows,
//   further ahead, or 16-64 rows ahead was within noise or worse.
// - A panel layout ([out/64][in][64], every row split in 128-byte pieces) streamed fastest dense but gained
//   almost nothing from skipping rows: the pieces are too short for a skip to save DRAM time, so rows stay
//   whole.
// - While a pass reads its rows at column c, it prefetches the next pass's rows at column c (one line per row
//   per line of columns). The hardware prefetcher follows eight row streams at once poorly when each starts
//   at an arbitrary offset; walking the next eight alongside the current ones keeps a whole pass of requests
//   in flight (prefetching further along the row was slower). With it the walk is memory-bound: an AVX-512
//   version (16 columns per FMA) measured the same, so there is none (the int8 GEMM, which is not
//   memory-bound at M > 1, has one).
// - The prefetches fill L2 on AMD CPUs (featurelens::Prefetch, isa.h); prefetching two passes ahead: within
//   noise.

using featurelens::Prefetch;
Prefetch g_prefetch = featurelens::initial_prefetch();

inline float to_float(float v) { return v; }
inline float to_float(at::BFloat16 v) { return static_cast<float>(v); }
inline float to_float(int8_t v) { return static_cast<float>(v); }

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  // bf16 is the top half of an fp32: zero-extend 8 x u16 to u32 and shift left by 16.
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline __m256 load8(const int8_t* p) {  // int8 rows (`basis_gemv_int8`): the row's scale is folded into val
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

template <Prefetch P, typename T>
inline void prefetch_row(const T* row, int64_t c0, int64_t c1) {
  const char* p = reinterpret_cast<const char*>(row + c0);
  const char* end = std::min(reinterpret_cast<const char*>(row + c1), p + kPrefetchLines * 64);
  for (; p < end; p += 64) featurelens::prefetch_line<P>(p);
}

// The rows of pass k (r) and of the pass after it (next: what to prefetch; a row of this pass past the end).
template <typename T>
inline void pass_rows(const T* W, int64_t ld, const int64_t* idx, int64_t nnz, int64_t k, const T* r[8],
                      const T* next[8]) {
  for (int j = 0; j < 8; ++j) {
    r[j] = W + idx[k + j] * ld;
    next[j] = k + 8 + j < nnz ? W + idx[k + 8 + j] * ld : r[j];
  }
}

template <Prefetch P, typename T>
inline void prefetch_columns(const T* const next[8], int64_t c) {
  for (int j = 0; j < 8; ++j) featurelens::prefetch_line<P>(next[j] + c);
}

// y[c0:c1] = sum_k val[k] * W[idx[k], c0:c1]
template <Prefetch P, typename T>
void accumulate_columns(const T* W, int64_t ld, const int64_t* idx, const float* val, int64_t nnz,
                        float* y, int64_t c0, int64_t c1) {
  constexpr int64_t line = 64 / sizeof(T);  // columns per cache line of a row
  std::fill(y + c0, y + c1, 0.0f);
  for (int64_t k = 0; k < std::min(kRowsPerPass, nnz); ++k) prefetch_row<P>(W + idx[k] * ld, c0, c1);
  int64_t k = 0;
  for (; k + 8 <= nnz; k += 8) {
    const T *r[8], *next[8];
    pass_rows(W, ld, idx, nnz, k, r, next);
    __m256 v[8];
    for (int j = 0; j < 8; ++j) v[j] = _mm256_set1_ps(val[k + j]);
    // Eight rows per pass over y (one load/store of the accumulator per eight FMAs), in two independent
    // FMA chains so the adds do not serialise on one register.
    auto columns8 = [&](int64_t c) {
      __m256 a0 = _mm256_loadu_ps(y + c);
      __m256 a1 = _mm256_mul_ps(v[1], load8(r[1] + c));
      a0 = _mm256_fmadd_ps(v[0], load8(r[0] + c), a0);
      a1 = _mm256_fmadd_ps(v[3], load8(r[3] + c), a1);
      a0 = _mm256_fmadd_ps(v[2], load8(r[2] + c), a0);
      a1 = _mm256_fmadd_ps(v[5], load8(r[5] + c), a1);
      a0 = _mm256_fmadd_ps(v[4], load8(r[4] + c), a0);
      a1 = _mm256_fmadd_ps(v[7], load8(r[7] + c), a1);
      a0 = _mm256_fmadd_ps(v[6], load8(r[6] + c), a0);
      _mm256_storeu_ps(y + c, _mm256_add_ps(a0, a1));
    };
    int64_t c = c0;
    for (; c + line <= c1; c += line) {
      prefetch_columns<P>(next, c);
      for (int64_t cc = c; cc < c + line; cc += 8) columns8(cc);
    }
    for (; c + 8 <= c1; c += 8) columns8(c);
    for (; c < c1; ++c) {
      float acc = y[c];
      for (int j = 0; j < 8; ++j) acc += val[k + j] * to_float(r[j][c]);
      y[c] = acc;
    }
  }
  for (; k < nnz; ++k) {
    const T* r = W + idx[k] * ld;
    const __m256 v = _mm256_set1_ps(val[k]);
    int64_t c = c0;
    for (; c + 8 <= c1; c += 8) _mm256_storeu_ps(y + c, _mm256_fmadd_ps(v, load8(r + c), _mm256_loadu_ps(y + c)));
    for (; c < c1; ++c) y[c] += val[k] * to_float(r[c]);
  }
}

// Active (index, value) pairs of x; with norms given, the WINA test decides, else x != 0 does.
template <typename X>
int64_t gather_active(const X* x, int64_t n, const float* norms, double threshold, int64_t* idx, float* val) {
  int64_t nnz = 0;
  const float thr = static_cast<float>(threshold);
  for (int64_t i = 0; i < n; ++i) {
    const float v = to_float(x[i]);
    const bool keep = norms ? (v != 0.0f && std::fabs(v) * norms[i] >= thr) : (v != 0.0f);
    if (keep) {
      idx[nnz] = i;
      val[nnz] = v;
      ++nnz;
    }
  }
  return nnz;
}

// y[0:n_out] = sum_k val[k] * W[idx[k], :], threads splitting the output columns (W: [n_in, n_out] rows).
template <typename T>
void walk_columns(const T* W, int64_t n_out, const int64_t* idx, const float* val, int64_t nnz, float* yp) {
  const int64_t n_blocks = (n_out + kColBlock - 1) / kColBlock;
  const Prefetch level = g_prefetch;
  // at::parallel_for is OpenMP in torch's CPU build; each thread gets one contiguous range of blocks.
  at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
    const int64_t c1 = std::min(b1 * kColBlock, n_out);
    for (int64_t c0 = b0 * kColBlock; c0 < c1; c0 += kSubBlock) {
      const int64_t c = std::min(c0 + kSubBlock, c1);
      if (level == Prefetch::kL2) accumulate_columns<Prefetch::kL2>(W, n_out, idx, val, nnz, yp, c0, c);
      else accumulate_columns<Prefetch::kL1>(W, n_out, idx, val, nnz, yp, c0, c);
    }
  });
}

// out (bfloat16, n elements) = y rounded to nearest even: the entries whose output is in x's dtype.
void store_bf16(const float* y, int64_t n, torch::Tensor& out) {
  at::BFloat16* o = out.data_ptr<at::BFloat16>();
  for (int64_t i = 0; i < n; ++i) o[i] = static_cast<at::BFloat16>(y[i]);
}

// y[0:n_out] (float32) = active x @ w_t, with idx/val scratch of n_in entries. Returns the active count.
int64_t gemv_into(const torch::Tensor& x, const torch::Tensor& w_t, const float* norms, double threshold,
                  int64_t* idx, float* val, float* yp) {
  const int64_t n_in = w_t.size(0), n_out = w_t.size(1);
  int64_t nnz = 0;
  if (x.scalar_type() == at::kFloat) {
    nnz = gather_active(x.data_ptr<float>(), n_in, norms, threshold, idx, val);
  } else if (x.scalar_type() == at::kBFloat16) {
    nnz = gather_active(x.data_ptr<at::BFloat16>(), n_in, norms, threshold, idx, val);
  } else {
    TORCH_CHECK(false, "x must be float32 or bfloat16, got ", x.scalar_type());
  }
  if (w_t.scalar_type() == at::kFloat) {
    walk_columns(w_t.data_ptr<float>(), n_out, idx, val, nnz, yp);
  } else if (w_t.scalar_type() == at::kBFloat16) {
    walk_columns(w_t.data_ptr<at::BFloat16>(), n_out, idx, val, nnz, yp);
  } else {
    TORCH_CHECK(false, "w_t must be float32 or bfloat16, got ", w_t.scalar_type());
  }
  return nnz;
}

void check_operands(const torch::Tensor& x, const torch::Tensor& w_t) {
  TORCH_CHECK(x.dim() == 1 && x.is_contiguous(), "x must be a contiguous 1-D tensor");
  TORCH_CHECK(w_t.dim() == 2 && w_t.is_contiguous(), "w_t must be a contiguous [in, out] tensor");
  TORCH_CHECK(x.size(0) == w_t.size(0), "x has ", x.size(0), " inputs but w_t has ", w_t.size(0), " rows");
  TORCH_CHECK(x.device().is_cpu() && w_t.device().is_cpu(), "sparse_gemv is a CPU kernel");
}

}  // namespace

// x: [in] float32 or bfloat16; w_t: [in, out] float32 or bfloat16, contiguous.
// norms: empty tensor, or [in] float32 column norms of W (= row norms of w_t) to apply the WINA threshold.
// Returns y: [out] float32.
torch::Tensor sparse_gemv(torch::Tensor x, torch::Tensor w_t, torch::Tensor norms, double threshold) {
  check_operands(x, w_t);
  const bool use_norms = norms.numel() > 0;
  if (use_norms)
    TORCH_CHECK(norms.scalar_type() == at::kFloat && norms.is_contiguous() && norms.numel() == x.size(0),
                "norms must be a contiguous float32 [in] tensor");
  const int64_t n_in = w_t.size(0);
  std::vector<int64_t> idx(n_in);
  std::vector<float> val(n_in);
  auto y = torch::empty({w_t.size(1)}, x.options().dtype(at::kFloat));
  gemv_into(x, w_t, use_norms ? norms.data_ptr<float>() : nullptr, threshold, idx.data(), val.data(),
            y.data_ptr<float>());
  return y;
}

// The engine's batch-1 entry for one (fused) projection module. x: [in]; w_ts: one [in, out_p] per part;
// norms: [parts, in] float32 WINA column norms; thresholds: one per part; out: contiguous, numel = sum of
// out_p, float32 or x's dtype: part p's result lands in its columns, in order. Returns the number of
// inputs zeroed over all parts (WINA score below the threshold, or x_i == 0).
int64_t sparse_gemv_parts(torch::Tensor x, std::vector<torch::Tensor> w_ts, torch::Tensor norms,
                          std::vector<double> thresholds, torch::Tensor out) {
  const int64_t parts = static_cast<int64_t>(w_ts.size());
  TORCH_CHECK(parts > 0 && static_cast<int64_t>(thresholds.size()) == parts, "one threshold per weight");
  TORCH_CHECK(norms.scalar_type() == at::kFloat && norms.is_contiguous() && norms.dim() == 2 &&
                  norms.size(0) == parts && norms.size(1) == x.size(0),
              "norms must be a contiguous float32 [parts, in] tensor");
  TORCH_CHECK(out.is_contiguous() && (out.scalar_type() == at::kFloat || out.scalar_type() == x.scalar_type()),
              "out must be contiguous, float32 or x's dtype");
  int64_t total = 0;
  for (const auto& w : w_ts) {
    check_operands(x, w);
    TORCH_CHECK(w.scalar_type() == w_ts[0].scalar_type(), "all weights must share one dtype");
    total += w.size(1);
  }
  TORCH_CHECK(out.numel() == total, "out has ", out.numel(), " elements, the parts give ", total);
  const int64_t n_in = x.size(0);
  // Reused across calls (decode calls this ~120 times per token): no allocation on the hot path.
  thread_local std::vector<int64_t> idx;
  thread_local std::vector<float> val, y;
  idx.resize(n_in);
  val.resize(n_in);
  const bool in_place = out.scalar_type() == at::kFloat;
  if (!in_place) y.resize(total);
  float* yp = in_place ? out.data_ptr<float>() : y.data();
  int64_t zeroed = 0, offset = 0;
  for (int64_t p = 0; p < parts; ++p) {
    const float* np = norms.data_ptr<float>() + p * n_in;
    zeroed += n_in - gemv_into(x, w_ts[p], np, thresholds[p], idx.data(), val.data(), yp + offset);
    offset += w_ts[p].size(1);
  }
  if (!in_place) store_bf16(y.data(), total, out);  // out's dtype is x's: bfloat16 here (float32 was in place)
  return zeroed;
}

// x T for an input basis stored in int8 with one scale per row (T[i, :] = q[i, :] * scales[i]): the same walk
// over every nonzero input, the row scale folded into x_i, so the basis costs one byte per entry instead of
// two. x: [in] float32 or bfloat16; q: [in, out] int8; scales: [in] float32; out: [out], float32 or x's dtype.
void basis_gemv_int8(torch::Tensor x, torch::Tensor q, torch::Tensor scales, torch::Tensor out) {
  TORCH_CHECK(x.dim() == 1 && x.is_contiguous() && x.device().is_cpu(), "x must be a contiguous 1-D CPU tensor");
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && q.scalar_type() == at::kChar && q.size(0) == x.size(0),
              "q must be a contiguous int8 [in, out] tensor with x's length as rows");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == x.size(0),
              "scales must be a contiguous float32 [in] tensor");
  TORCH_CHECK(out.is_contiguous() && out.numel() == q.size(1) &&
                  (out.scalar_type() == at::kFloat || out.scalar_type() == x.scalar_type()),
              "out must be contiguous, [out], float32 or x's dtype");
  const int64_t n_in = q.size(0), n_out = q.size(1);
  thread_local std::vector<int64_t> idx;
  thread_local std::vector<float> val, y;
  idx.resize(n_in);
  val.resize(n_in);
  int64_t nnz = x.scalar_type() == at::kFloat
                    ? gather_active(x.data_ptr<float>(), n_in, nullptr, 0.0, idx.data(), val.data())
                    : gather_active(x.data_ptr<at::BFloat16>(), n_in, nullptr, 0.0, idx.data(), val.data());
  const float* sp = scales.data_ptr<float>();
  for (int64_t k = 0; k < nnz; ++k) val[k] *= sp[idx[k]];
  const bool in_place = out.scalar_type() == at::kFloat;
  if (!in_place) y.resize(n_out);
  float* yp = in_place ? out.data_ptr<float>() : y.data();
  // Plain pointers into this thread's scratch, taken here: inside the parallel region a thread_local name would
  // be the worker thread's own empty vector.
  walk_columns(q.data_ptr<int8_t>(), n_out, idx.data(), val.data(), nnz, yp);
  if (!in_place) store_bf16(y.data(), n_out, out);
}

// The cache level the walks prefetch into: "l1", "l2" or "auto" (isa.h); returns the one in use.
std::string set_prefetch(const std::string& name) {
  g_prefetch = featurelens::parse_prefetch(name);
  return featurelens::prefetch_name(g_prefetch);
}

std::string prefetch() { return featurelens::prefetch_name(g_prefetch); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("prefetch", &prefetch, "the cache level the row walks prefetch into: l1 or l2");
  m.def("set_prefetch", &set_prefetch, "prefetch into 'l1', 'l2' or 'auto' (l2 on AMD); returns the one in use",
        pybind11::arg("name"));
  m.def("basis_gemv_int8", &basis_gemv_int8, "out = x @ (q * scales[:, None]) (int8 basis rows, fp32 accumulate)",
        pybind11::arg("x"), pybind11::arg("q"), pybind11::arg("scales"), pybind11::arg("out"));
  m.def("sparse_gemv", &sparse_gemv, "y = x[active] @ w_t[active] (batch-1 sparse GEMV, fp32 accumulate)",
        pybind11::arg("x"), pybind11::arg("w_t"), pybind11::arg("norms"), pybind11::arg("threshold"));
  m.def("sparse_gemv_parts", &sparse_gemv_parts,
        "out[part columns] = sparse_gemv(x, w_ts[p], norms[p], thresholds[p]) for every part; returns inputs zeroed",
        pybind11::arg("x"), pybind11::arg("w_ts"), pybind11::arg("norms"), pybind11::arg("thresholds"),
        pybind11::arg("out"));
}
