// kernels.h — the CPU backend's leaf loops, built once per instruction set and chosen at run time.
#pragma once

#include <cstdint>

namespace trim::cpu {

struct Kernels {
  // out[r] = row_r . w for four rows of length d.
  void (*dot4)(const float* r0, const float* r1, const float* r2, const float* r3, const float* w, int64_t d,
               float* out);
  // row . w
  float (*dot)(const float* row, const float* w, int64_t d);
  // ||x||^2, and ||x - c||^2 when c is not null, in one read of x.
  void (*sqnorm_sqdist)(const float* x, const float* c, int64_t d, float* sqnorm, float* sqdist);
  // acc += x * scale, in double.
  void (*add_scaled)(double* acc, const float* x, double scale, int64_t d);
  // acc += sum_r rows[r] * scales[r] for kBlock rows: summed pairwise in float32 per column, then
  // added to acc in double (unused slots: any readable row with scale 0).
  void (*add_block)(double* acc, const float* const* rows, const float* scales, int64_t d);
};

// Rows per add_block call.
constexpr int kBlock = 8;

// The build for the best instruction set this processor runs (AVX2 + FMA on x86-64 when present).
const Kernels& kernels();
// The name of that instruction set ("avx2" or "generic").
const char* kernels_isa();

namespace generic { Kernels table(); }
namespace avx2 { Kernels table(); }

}  // namespace trim::cpu
