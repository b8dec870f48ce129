// gpu/arith.h — the arithmetic of the GPU kernels, written once for CUDA, Metal and the emulator in
// tests/ (plain C++), so that what each kernel computes is tested on any machine. Only values,
// indices and read-only buffers pass in here; threads, barriers and launches stay in the backends.
#pragma once

#if defined(__METAL_VERSION__)
#include <metal_stdlib>
using namespace metal;
#define TRIM_FN inline
#define TRIM_GLOBAL device
#define TRIM_FMA(a, b, c) fma(a, b, c)
#define TRIM_SQRT(x) sqrt(x)
typedef long trim_long;
#elif defined(__CUDACC__)
#define TRIM_FN __host__ __device__ inline
#define TRIM_GLOBAL
#define TRIM_FMA(a, b, c) fmaf(a, b, c)
#define TRIM_SQRT(x) sqrtf(x)
typedef long long trim_long;
#else
#include <cmath>
#define TRIM_FN inline
#define TRIM_GLOBAL
#define TRIM_FMA(a, b, c) std::fma(a, b, c)
#define TRIM_SQRT(x) std::sqrt(x)
typedef long long trim_long;
#endif

// Lanes that share one row in row_stats and scores (a CUDA warp, an Apple SIMD group).
#define TRIM_SIMD 32
// Row chunks of the first direction's column sums (summed chunk by chunk, in order).
#define TRIM_SUM_CHUNKS 16
// Side of the square tiles of divprune's Gram matrix.
#define TRIM_TILE 16
// Most threads of the one-group pick kernel (a power of two).
#define TRIM_PICK_THREADS 1024
// The index of "no candidate" (larger than any row).
#define TRIM_NO_INDEX 0x7fffffff

// A candidate of a greedy step: the lowest value wins, ties to the lowest index.
struct TrimPick {
  float value;
  int index;
};

TRIM_FN TrimPick trim_no_pick() {
  TrimPick p;
  p.value = INFINITY;
  p.index = TRIM_NO_INDEX;
  return p;
}

// The better of two candidates; a total order, so any reduction tree gives the same pick.
TRIM_FN TrimPick trim_better(TrimPick a, TrimPick b) {
  return (a.value < b.value || (a.value == b.value && a.index < b.index)) ? a : b;
}

// Stage 1: row a ranks before row b when closer to the text centroid, ties to the lower index.
TRIM_FN bool trim_ranks_before(float dist_a, int a, float dist_b, int b) {
  return dist_a < dist_b || (dist_a == dist_b && a < b);
}

// 1 / max(||v||, 1e-12), as the CPU backend computes it.
TRIM_FN float trim_inv_norm(float sqnorm) {
  const float norm = TRIM_SQRT(sqnorm);
  return 1.0f / (norm > 1e-12f ? norm : 1e-12f);
}

struct TrimStats {
  float sqnorm;
  float sqdist;  // ||v - center||^2 (0 without a center)
};

// One lane's share of a row's statistics: elements lane, lane + TRIM_SIMD, ...; lanes are then
// summed by an xor butterfly (trim_add_stats), which leaves the same total in every lane.
TRIM_FN TrimStats trim_lane_stats(TRIM_GLOBAL const float* row, TRIM_GLOBAL const float* center, int has_center,
                                  int d, int lane) {
  TrimStats s;
  s.sqnorm = 0.0f;
  s.sqdist = 0.0f;
  for (int e = lane; e < d; e += TRIM_SIMD) {
    const float x = row[e];
    s.sqnorm = TRIM_FMA(x, x, s.sqnorm);
    if (has_center) {
      const float y = x - center[e];
      s.sqdist = TRIM_FMA(y, y, s.sqdist);
    }
  }
  return s;
}

TRIM_FN TrimStats trim_add_stats(TrimStats a, TrimStats b) {
  a.sqnorm += b.sqnorm;
  a.sqdist += b.sqdist;
  return a;
}

// One lane's share of row . w (same lanes and butterfly as trim_lane_stats).
TRIM_FN float trim_lane_dot(TRIM_GLOBAL const float* row, TRIM_GLOBAL const float* w, int d, int lane) {
  float s = 0.0f;
  for (int e = lane; e < d; e += TRIM_SIMD) s = TRIM_FMA(row[e], w[e], s);
  return s;
}

// max(a, b) as std::max computes it (a unless a < b).
TRIM_FN float trim_larger(float a, float b) { return a < b ? b : a; }

// A greedy step's value of a candidate: u^ . w, or for divprune the running max of it over the picks.
TRIM_FN float trim_step_value(float dot, float inv, float previous, int running_max) {
  const float value = dot * inv;
  return running_max ? trim_larger(previous, value) : value;
}

// divprune: the cosine of rows i and j from their dot product.
TRIM_FN float trim_cosine(float dot, float inv_i, float inv_j) { return dot * inv_i * inv_j; }

// A float sum with Kahan compensation: the first direction sums up to thousands of rows.
struct TrimKahan {
  float sum;
  float comp;
};

TRIM_FN TrimKahan trim_kahan_zero() {
  TrimKahan s;
  s.sum = 0.0f;
  s.comp = 0.0f;
  return s;
}

TRIM_FN TrimKahan trim_kahan_add(TrimKahan s, float x) {
  const float y = x - s.comp;
  const float t = s.sum + y;
  s.comp = (t - s.sum) - y;
  s.sum = t;
  return s;
}

// total + part, where part is another compensated sum (its value is sum - comp).
TRIM_FN TrimKahan trim_kahan_merge(TrimKahan total, TrimKahan part) { return trim_kahan_add(total, part.sum - part.comp); }

// First row of column-sum chunk `chunk` (chunk TRIM_SUM_CHUNKS gives n).
TRIM_FN int trim_chunk_start(int n, int chunk) { return (int)(((trim_long)n * chunk) / TRIM_SUM_CHUNKS); }

// One chunk's share of column `col` of the sum of the normalised candidate rows.
TRIM_FN TrimKahan trim_column_chunk(TRIM_GLOBAL const float* v, TRIM_GLOBAL const float* inv,
                                    TRIM_GLOBAL const int* alive, int lo, int hi, int d, int col) {
  TrimKahan s = trim_kahan_zero();
  for (int i = lo; i < hi; ++i)
    if (alive[i]) s = trim_kahan_add(s, v[(trim_long)i * d + col] * inv[i]);
  return s;
}

// The next direction's element after a pick whose normalised element is x: x itself (`reset`:
// divprune, and trimtokenator's first pick) or the running sum plus x.
TRIM_FN TrimKahan trim_direction(TrimKahan w, float x, int reset) {
  if (reset) {
    w.sum = x;
    w.comp = 0.0f;
    return w;
  }
  return trim_kahan_add(w, x);
}
