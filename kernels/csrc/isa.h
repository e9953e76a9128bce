// Run-time choice between the AVX2 and AVX-512 paths of a CPU kernel (the int8 GEMM). Extensions are compiled with
// portable AVX2 flags (the build cache may be shared between machines); the AVX-512 functions alone are
// compiled for AVX-512 (`#pragma GCC target`) and are only called when this CPU has it.
#pragma once

#include <torch/extension.h>

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

}  // namespace featurelens
