// kernels.cpp — the portable build of the leaf loops, and the run-time choice between builds.
#define TRIM_ISA generic
#include "kernels_impl.h"

namespace trim::cpu {

namespace {
bool has_avx2() {
#if defined(TRIM_HAVE_AVX2) && (defined(__GNUC__) || defined(__clang__))
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}
}  // namespace

const Kernels& kernels() {
  static const Kernels chosen = has_avx2() ? avx2::table() : generic::table();
  return chosen;
}

const char* kernels_isa() { return has_avx2() ? "avx2" : "generic"; }

}  // namespace trim::cpu
