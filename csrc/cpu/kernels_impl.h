// kernels_impl.h — the CPU backend's leaf loops on an 8-lane float vector (GCC/Clang vector
// extensions, which become SSE, AVX or NEON; a plain struct elsewhere). Each lane accumulates on its
// own and the lanes are summed in a fixed pairwise order, so every ISA rounds the same way.
// Included once per instruction set, inside namespace trim::cpu::TRIM_ISA, by kernels*.cpp; it
// uses no standard-library templates, so builds for different ISAs cannot share a definition.
#ifndef TRIM_ISA
#error "define TRIM_ISA (the namespace of this build of the kernels) before including kernels_impl.h"
#endif

#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace trim::cpu::TRIM_ISA {

#if defined(__GNUC__) || defined(__clang__)
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x8_unaligned __attribute__((vector_size(32), aligned(4), may_alias));
#undef TRIM_INLINE
#define TRIM_INLINE inline __attribute__((always_inline))
TRIM_INLINE f32x8 load(const float* p) { return *reinterpret_cast<const f32x8_unaligned*>(p); }
#else
struct f32x8 {
  float x[8];
  float& operator[](int i) { return x[i]; }
  float operator[](int i) const { return x[i]; }
};
inline f32x8 operator+(f32x8 a, const f32x8& b) {
  for (int i = 0; i < 8; ++i) a.x[i] += b.x[i];
  return a;
}
inline f32x8 operator-(f32x8 a, const f32x8& b) {
  for (int i = 0; i < 8; ++i) a.x[i] -= b.x[i];
  return a;
}
inline f32x8 operator*(f32x8 a, const f32x8& b) {
  for (int i = 0; i < 8; ++i) a.x[i] *= b.x[i];
  return a;
}
inline f32x8& operator+=(f32x8& a, const f32x8& b) { return a = a + b; }
#undef TRIM_INLINE
#define TRIM_INLINE inline
inline f32x8 load(const float* p) {
  f32x8 v;
  std::memcpy(v.x, p, sizeof v.x);
  return v;
}
#endif

constexpr int64_t kWidth = 8;

// The first `count` (< 8) floats of p, zeros after.
TRIM_INLINE f32x8 load_partial(const float* p, int64_t count) {
  float tmp[kWidth] = {};
  for (int64_t i = 0; i < count; ++i) tmp[i] = p[i];
  return load(tmp);
}

// Pairwise sum of two accumulators' 16 lanes.
TRIM_INLINE float reduce(const f32x8& a, const f32x8& b) {
  const f32x8 s = a + b;
  return ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]));
}

// out[r] = row_r . w for four rows of length d that share each read of w.
TRIM_INLINE void dot4(const float* r0, const float* r1, const float* r2, const float* r3, const float* w,
                      int64_t d, float* out) {
  f32x8 a0 = {}, a1 = {}, a2 = {}, a3 = {}, b0 = {}, b1 = {}, b2 = {}, b3 = {};
  int64_t i = 0;
  for (; i + 2 * kWidth <= d; i += 2 * kWidth) {
    const f32x8 x = load(w + i), y = load(w + i + kWidth);
    a0 += load(r0 + i) * x;
    a1 += load(r1 + i) * x;
    a2 += load(r2 + i) * x;
    a3 += load(r3 + i) * x;
    b0 += load(r0 + i + kWidth) * y;
    b1 += load(r1 + i + kWidth) * y;
    b2 += load(r2 + i + kWidth) * y;
    b3 += load(r3 + i + kWidth) * y;
  }
  for (; i < d; i += kWidth) {
    const int64_t n = d - i < kWidth ? d - i : kWidth;
    const f32x8 x = load_partial(w + i, n);
    a0 += load_partial(r0 + i, n) * x;
    a1 += load_partial(r1 + i, n) * x;
    a2 += load_partial(r2 + i, n) * x;
    a3 += load_partial(r3 + i, n) * x;
  }
  out[0] = reduce(a0, b0);
  out[1] = reduce(a1, b1);
  out[2] = reduce(a2, b2);
  out[3] = reduce(a3, b3);
}

// row . w
TRIM_INLINE float dot(const float* row, const float* w, int64_t d) {
  f32x8 a = {}, b = {};
  int64_t i = 0;
  for (; i + 2 * kWidth <= d; i += 2 * kWidth) {
    a += load(row + i) * load(w + i);
    b += load(row + i + kWidth) * load(w + i + kWidth);
  }
  for (; i < d; i += kWidth) {
    const int64_t n = d - i < kWidth ? d - i : kWidth;
    a += load_partial(row + i, n) * load_partial(w + i, n);
  }
  return reduce(a, b);
}

// ||x||^2, and ||x - c||^2 when c is not null, in one read of x (four chains each, to hide latency).
TRIM_INLINE void sqnorm_sqdist(const float* x, const float* c, int64_t d, float* sqnorm, float* sqdist) {
  f32x8 n0 = {}, n1 = {}, n2 = {}, n3 = {}, s0 = {}, s1 = {}, s2 = {}, s3 = {};
  const bool centered = c != nullptr;
  int64_t i = 0;
  for (; i + 4 * kWidth <= d; i += 4 * kWidth) {
    const f32x8 a = load(x + i), b = load(x + i + kWidth), e = load(x + i + 2 * kWidth), f = load(x + i + 3 * kWidth);
    n0 += a * a;
    n1 += b * b;
    n2 += e * e;
    n3 += f * f;
    if (centered) {
      const f32x8 da = a - load(c + i), db = b - load(c + i + kWidth);
      const f32x8 de = e - load(c + i + 2 * kWidth), df = f - load(c + i + 3 * kWidth);
      s0 += da * da;
      s1 += db * db;
      s2 += de * de;
      s3 += df * df;
    }
  }
  for (; i < d; i += kWidth) {
    const int64_t n = d - i < kWidth ? d - i : kWidth;
    const f32x8 a = load_partial(x + i, n);
    n0 += a * a;
    if (centered) {
      const f32x8 da = a - load_partial(c + i, n);
      s0 += da * da;
    }
  }
  *sqnorm = reduce(n0 + n2, n1 + n3);
  if (centered) *sqdist = reduce(s0 + s2, s1 + s3);
}

// acc += x * scale, accumulated in double.
TRIM_INLINE void add_scaled(double* acc, const float* x, double scale, int64_t d) {
  for (int64_t i = 0; i < d; ++i) acc[i] += static_cast<double>(x[i]) * scale;
}

// acc += pairwise float32 sum of 8 scaled rows, per column (the compiler vectorises over columns).
TRIM_INLINE void add_block(double* acc, const float* const* rows, const float* scales, int64_t d) {
  const float *x0 = rows[0], *x1 = rows[1], *x2 = rows[2], *x3 = rows[3];
  const float *x4 = rows[4], *x5 = rows[5], *x6 = rows[6], *x7 = rows[7];
  const float c0 = scales[0], c1 = scales[1], c2 = scales[2], c3 = scales[3];
  const float c4 = scales[4], c5 = scales[5], c6 = scales[6], c7 = scales[7];
  for (int64_t i = 0; i < d; ++i) {
    const float low = (x0[i] * c0 + x1[i] * c1) + (x2[i] * c2 + x3[i] * c3);
    const float high = (x4[i] * c4 + x5[i] * c5) + (x6[i] * c6 + x7[i] * c7);
    acc[i] += static_cast<double>(low + high);
  }
}

Kernels table() {
  return Kernels{[](const float* r0, const float* r1, const float* r2, const float* r3, const float* w, int64_t d,
                    float* out) { dot4(r0, r1, r2, r3, w, d, out); },
                 [](const float* row, const float* w, int64_t d) { return dot(row, w, d); },
                 [](const float* x, const float* c, int64_t d, float* sqnorm, float* sqdist) {
                   sqnorm_sqdist(x, c, d, sqnorm, sqdist);
                 },
                 [](double* acc, const float* x, double scale, int64_t d) { add_scaled(acc, x, scale, d); },
                 [](double* acc, const float* const* rows, const float* scales, int64_t d) {
                   add_block(acc, rows, scales, d);
                 }};
}

}  // namespace trim::cpu::TRIM_ISA
