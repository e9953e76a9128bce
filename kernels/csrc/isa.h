// Run-time choice between the AVX2 and AVX-512 paths of a CPU kernel (the int8 GEMM). Extensions are compiled with
// portable AVX2 flags (the build cache may be shared between machines); the AVX-512 functions alone are
// compiled for AVX-512 (`#pragma GCC target`) and are only called when this CPU has it.
#pragma once

#include <torch/extension.h>

#include <immintrin.h>

#include <cstdlib>
#include <string>

namespace featurelens {

enum class Isa { kAvx2, kAvx512 };

// F + BW + VL + BF16: what the AVX-512 paths use (Zen 4/5, Sapphire Rapids and later).
inline bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

inline Isa best_isa() { return cpu_has_avx512() ? Isa::kAvx512 : Isa::kAvx2; }

inline std::string isa_name(Isa isa) { return isa == Isa::kAvx512 ? "avx512" : "avx2"; }

// "avx2", "avx512" (refused on a CPU without it) or "auto" (the CPU's best) -> the ISA to use.
inline Isa parse_isa(const std::string& name) {
  TORCH_CHECK(name == "avx2" || name == "avx512" || name == "auto", "isa must be 'avx2', 'avx512' or 'auto'");
  TORCH_CHECK(name != "avx512" || cpu_has_avx512(), "this CPU lacks AVX-512 F/BW/VL/BF16");
  return name == "avx2" ? Isa::kAvx2 : best_isa();
}

// Which cache level the sparse row walks' software prefetches fill: L1 (_MM_HINT_T0) or L2 (_MM_HINT_T1).
// On a Zen 4 core filling L2 instead of L1 made the bf16 sparse walk 1.4-2x faster; a likely reason: sixteen
// row streams' L1 prefetches occupy the L1 miss buffers that the demand loads need. Elsewhere L1 is what was
// measured (an older walk on an AVX2 AMD box saw L2 within noise or worse). So "auto" is L2 on AMD CPUs and
// L1 elsewhere; FEATURELENS_PREFETCH=l1|l2 overrides it, the extension's `set_prefetch` switches it at run
// time, and `featurelens bench kernels` times both levels on any box (figures: docs/measurements/).
// The int8 GEMM's single far-prefetched stream keeps L1: L2 measured slower there on Zen 4.
enum class Prefetch { kL1, kL2 };

inline Prefetch auto_prefetch() {
  __builtin_cpu_init();
  return __builtin_cpu_is("amd") ? Prefetch::kL2 : Prefetch::kL1;
}

inline std::string prefetch_name(Prefetch p) { return p == Prefetch::kL2 ? "l2" : "l1"; }

// "l1", "l2" or "auto" -> the level to use.
inline Prefetch parse_prefetch(const std::string& name) {
  TORCH_CHECK(name == "l1" || name == "l2" || name == "auto", "prefetch must be 'l1', 'l2' or 'auto', got '",
              name, "'");
  return name == "l1" ? Prefetch::kL1 : name == "l2" ? Prefetch::kL2 : auto_prefetch();
}

// The level at load: FEATURELENS_PREFETCH if it is "l1" or "l2", else auto. No exception here: this runs while
// the extension is loaded (the Python wrapper warns about an invalid value).
inline Prefetch initial_prefetch() {
  const char* env = std::getenv("FEATURELENS_PREFETCH");
  const std::string name = env ? env : "";
  return name == "l1" || name == "l2" ? parse_prefetch(name) : auto_prefetch();
}

template <Prefetch P>
inline void prefetch_line(const void* p) {
  _mm_prefetch(static_cast<const char*>(p), P == Prefetch::kL2 ? _MM_HINT_T1 : _MM_HINT_T0);
}

}  // namespace featurelens
