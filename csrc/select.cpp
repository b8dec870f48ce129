// select.cpp — the backend-independent part of the contract: methods that read no scores, the
// budget split, and the dispatch of a selection to a backend.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include "trim.h"

namespace trim {

int64_t round_half_up(double x) { return static_cast<int64_t>(std::floor(x + 0.5)); }

int64_t stage1_count(int64_t n, int64_t k, double stage1_ratio) {
  return std::clamp(round_half_up(stage1_ratio * static_cast<double>(n)), k, n);
}

int64_t adaptive_stage1_count(int64_t n, int64_t k) {
  // s = floor(sqrt(k n)); round half up: s + 1 when k n >= (s + 1/2)^2, i.e. k n > s^2 + s.
  const int64_t kn = k * n;
  auto s = static_cast<int64_t>(std::sqrt(static_cast<double>(kn)));
  while (s * s > kn) --s;
  while ((s + 1) * (s + 1) <= kn) ++s;
  return std::clamp(s + (kn > s * s + s ? 1 : 0), k, n);
}

bool all_finite(const float* x, int64_t count) {
  // An exponent of all ones is inf or NaN; an integer max reduction vectorises everywhere.
  uint32_t worst = 0;
  for (int64_t i = 0; i < count; ++i) {
    uint32_t bits;
    std::memcpy(&bits, x + i, sizeof bits);
    worst = std::max(worst, bits & 0x7f800000u);
  }
  return worst != 0x7f800000u;
}

void select_uniform(int64_t n, int64_t k, int64_t* out) {
  if (k == 1) {
    out[0] = 0;
    return;
  }
  for (int64_t i = 0; i < k; ++i) out[i] = (2 * i * (n - 1) + (k - 1)) / (2 * (k - 1));
}

namespace {

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// floor(x * range / 2^64), portable (no __int128 on MSVC).
uint64_t scale_to_range(uint64_t x, uint64_t range) {
  const uint64_t x_lo = x & 0xffffffffu, x_hi = x >> 32, r_lo = range & 0xffffffffu, r_hi = range >> 32;
  const uint64_t lo_lo = x_lo * r_lo, hi_lo = x_hi * r_lo, lo_hi = x_lo * r_hi, hi_hi = x_hi * r_hi;
  const uint64_t mid = (lo_lo >> 32) + (hi_lo & 0xffffffffu) + (lo_hi & 0xffffffffu);
  return hi_hi + (hi_lo >> 32) + (lo_hi >> 32) + (mid >> 32);
}

}  // namespace

void select_random(int64_t n, int64_t k, uint64_t seed, int64_t* out) {
  std::vector<int64_t> perm(static_cast<size_t>(n));
  std::iota(perm.begin(), perm.end(), int64_t{0});
  uint64_t state = seed;
  for (int64_t i = 0; i < k; ++i) {
    const auto j = i + static_cast<int64_t>(scale_to_range(splitmix64(state), static_cast<uint64_t>(n - i)));
    std::swap(perm[i], perm[j]);
    out[i] = perm[i];
  }
}

void split_budget(const int64_t* sizes, const double* weights, int64_t count, int64_t total, int64_t* out) {
  const int64_t sum_sizes = std::accumulate(sizes, sizes + count, int64_t{0});
  const int64_t budget = std::min(total, sum_sizes);
  if (budget < count) throw InputError("total must be at least the number of images");
  // Real-valued budgets q_k = clamp(lambda * w_k, 1, m_k) with sum q_k = budget, then largest remainder.
  std::vector<double> w(weights, weights + count), q(count);
  for (int64_t i = 0; i < count; ++i) w[i] = std::max(w[i], 1e-6 * static_cast<double>(sizes[i]));
  if (budget == sum_sizes) {
    std::copy(sizes, sizes + count, out);
    return;
  }
  std::vector<double> breaks;
  for (int64_t i = 0; i < count; ++i) {
    breaks.push_back(1.0 / w[i]);
    breaks.push_back(static_cast<double>(sizes[i]) / w[i]);
  }
  std::sort(breaks.begin(), breaks.end());
  auto clamped = [&](int64_t i, double lambda) {
    return std::clamp(lambda * w[i], 1.0, static_cast<double>(sizes[i]));
  };
  auto f = [&](double lambda) {
    double s = 0;
    for (int64_t i = 0; i < count; ++i) s += clamped(i, lambda);
    return s;
  };
  double lo = 0, hi = breaks.back();
  for (double b : breaks) {
    if (f(b) >= static_cast<double>(budget)) {
      hi = b;
      break;
    }
    lo = b;
  }
  // On (lo, hi) every k is either pinned (to 1 or m_k) or free (lambda * w_k): solve for lambda.
  const double mid = 0.5 * (lo + hi);
  double pinned = 0, free_weight = 0;
  for (int64_t i = 0; i < count; ++i) {
    const double x = mid * w[i];
    if (x <= 1.0) pinned += 1.0;
    else if (x >= static_cast<double>(sizes[i])) pinned += static_cast<double>(sizes[i]);
    else free_weight += w[i];
  }
  const double lambda = free_weight > 0 ? (static_cast<double>(budget) - pinned) / free_weight : mid;
  for (int64_t i = 0; i < count; ++i) {
    const double x = mid * w[i];
    q[i] = x <= 1.0 ? 1.0 : x >= static_cast<double>(sizes[i]) ? static_cast<double>(sizes[i]) : lambda * w[i];
  }
  int64_t given = 0;
  for (int64_t i = 0; i < count; ++i) {
    out[i] = std::clamp(static_cast<int64_t>(std::floor(q[i])), int64_t{1}, sizes[i]);
    given += out[i];
  }
  std::vector<int64_t> order(static_cast<size_t>(count));
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return q[a] - std::floor(q[a]) > q[b] - std::floor(q[b]);
  });
  while (given < budget) {  // one round suffices unless rounding left q a hair short
    for (int64_t i : order) {
      if (given == budget) break;
      if (out[i] < sizes[i]) {
        ++out[i];
        ++given;
      }
    }
  }
}

std::vector<double> text_centroid(const Problem& p, double* offset) {
  std::vector<double> mean(static_cast<size_t>(p.d), 0.0);
  double sq = 0;
  for (int64_t j = 0; j < p.m; ++j) {
    const float* t = p.t + j * p.d;
    for (int64_t i = 0; i < p.d; ++i) {
      mean[i] += t[i];
      sq += static_cast<double>(t[i]) * t[i];
    }
  }
  double mean_sq = 0;
  for (double& x : mean) {
    x /= static_cast<double>(p.m);
    mean_sq += x * x;
  }
  *offset = sq / static_cast<double>(p.m) - mean_sq;
  return mean;
}

void throw_bad_rows(const Problem& p, const std::string& subject) {
  const std::string lead = subject.empty() ? "" : subject + " ";
  if (!all_finite(p.v, p.n * p.d)) throw InputError(lead + "contains NaN or inf");
  throw InputError(lead + "has values too large for float32 arithmetic (a squared norm overflows)");
}

namespace {

void select_scored(const Problem& p, Method method, int64_t k, double stage1_ratio, Backend backend, int64_t* out) {
  switch (backend) {
    case Backend::cuda: cuda::select_scored(p, method, k, stage1_ratio, out); break;
    case Backend::metal: metal::select_scored(p, method, k, stage1_ratio, out); break;
    default: cpu::select_scored(p, method, k, stage1_ratio, out); break;
  }
}

void to_unit(const float* x, int64_t rows, int64_t d, std::vector<float>& out) {
  out.resize(static_cast<size_t>(rows * d));
  for (int64_t i = 0; i < rows; ++i) {
    const float* row = x + i * d;
    double sq = 0;
    for (int64_t j = 0; j < d; ++j) sq += static_cast<double>(row[j]) * row[j];
    const double scale = 1.0 / std::max(std::sqrt(sq), 1e-12);
    for (int64_t j = 0; j < d; ++j) out[static_cast<size_t>(i * d + j)] = static_cast<float>(row[j] * scale);
  }
}

// V and T with every row divided by max(||row||, 1e-12) (in double): the L2 score of the unit rows,
// -(1/M) sum_j ||v^_i - t^_j||^2, is 2 (1/M) sum_j cos(v_i, t_j) - 2 (ALGORITHM.md, cosine).
void make_unit(const Problem& p, VariantInput& in) {
  if (!all_finite(p.v, p.n * p.d)) throw InputError("visual contains NaN or inf");
  if (p.m > 0 && !all_finite(p.t, p.m * p.d)) throw InputError("text contains NaN or inf");
  to_unit(p.v, p.n, p.d, in.v);
  to_unit(p.t, p.m, p.d, in.t);
  in.p = Problem{in.v.data(), p.n, p.d, p.m > 0 ? in.t.data() : nullptr, p.m};
}

void backend_scores(const Problem& p, Backend backend, float* out) {
  switch (backend) {
    case Backend::cuda: cuda::alignment_scores(p, out); break;
    case Backend::metal: metal::alignment_scores(p, out); break;
    default: cpu::alignment_scores(p, out); break;
  }
}

}  // namespace

VariantInput variant_input(const Problem& p, Method method, int64_t k, double stage1_ratio, const Variant& variant) {
  VariantInput in;
  in.p = p;
  in.stage1_ratio = stage1_ratio;
  const bool aligned = p.m > 0 && (method == Method::trimtokenator || method == Method::align);
  if (aligned && method == Method::trimtokenator && variant.stage1 == Stage1::adaptive) {
    in.stage1_ratio = static_cast<double>(adaptive_stage1_count(p.n, k)) / static_cast<double>(p.n);
  }
  if (aligned && variant.alignment == Alignment::cosine) make_unit(p, in);
  return in;
}

void alignment_scores(const Problem& p, Backend backend, float* out, Alignment alignment) {
  if (alignment == Alignment::l2) return backend_scores(p, backend, out);
  VariantInput in;
  make_unit(p, in);
  backend_scores(in.p, backend, out);
}

int64_t select(const Problem& p, Method method, int64_t k, double stage1_ratio, uint64_t seed, Backend backend,
               int64_t* out, const Variant& variant) {
  if (k < 1) throw InputError("keep must be >= 1");
  if (method == Method::cdpruner && backend != Backend::cpu) throw InputError("cdpruner runs on the CPU backend only");
  if (p.m > 0 && !all_finite(p.t, p.m * p.d)) throw InputError("text contains NaN or inf");
  const bool scored = method == Method::trimtokenator || method == Method::align || method == Method::divprune ||
                      method == Method::cdpruner;
  // The scored paths find non-finite rows in their first pass; everything else checks here.
  if ((!scored || k >= p.n) && !all_finite(p.v, p.n * p.d)) throw InputError("visual contains NaN or inf");
  if (k >= p.n || method == Method::none) {
    std::iota(out, out + p.n, int64_t{0});
    return p.n;
  }
  switch (method) {
    case Method::uniform: select_uniform(p.n, k, out); break;
    case Method::random: select_random(p.n, k, seed, out); break;
    case Method::cdpruner: cpu::select_cdpruner(p, k, out); break;
    default: {
      const VariantInput in = variant_input(p, method, k, stage1_ratio, variant);
      select_scored(in.p, method, k, in.stage1_ratio, backend, out);
      break;
    }
  }
  return k;
}

}  // namespace trim
