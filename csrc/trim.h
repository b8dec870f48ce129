// trim.h — the kernel contract of trimcpp's selection core (see ALGORITHM.md).
// Plain C++ on pointers and sizes; every backend implements the functions of its namespace.
#pragma once

#include <cstdint>
#include <stdexcept>

namespace trim {

enum class Method : int { trimtokenator = 0, align = 1, divprune = 2, uniform = 3, random = 4, none = 5 };

// Input the core itself finds invalid (non-finite values, overflow); bindings map it to ValueError.
struct InputError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// Row-major V (n x d) and T (m x d; t may be null when m == 0).
struct Problem {
  const float* v;
  int64_t n;
  int64_t d;
  const float* t;
  int64_t m;
};

// The backend-independent part (csrc/select.cpp).

// round(x) of ALGORITHM.md: floor(x + 0.5).
int64_t round_half_up(double x);
// K1 = clamp(round(r1 * n), k, n).
int64_t stage1_count(int64_t n, int64_t k, double stage1_ratio);
// True when all `count` values are finite.
bool all_finite(const float* x, int64_t count);
// Writes the k `uniform` indices (k <= n) to out.
void select_uniform(int64_t n, int64_t k, int64_t* out);
// Writes k distinct indices (k <= n) in draw order to out: splitmix64(seed) + partial Fisher-Yates.
void select_random(int64_t n, int64_t k, uint64_t seed, int64_t* out);
// Budgets b_i in [1, sizes[i]] proportional to weights[i], largest remainder, sum min(total, sum sizes).
void split_budget(const int64_t* sizes, const double* weights, int64_t count, int64_t total, int64_t* out);
// Selects min(k, n) rows (all n for `none`) on the CPU backend; indices in pick order into out[n].
int64_t select(const Problem& p, Method method, int64_t k, double stage1_ratio, uint64_t seed, int64_t* out);

namespace cpu {
// True when this backend can run here (always, for the CPU).
bool available();
// The a_i of ALGORITHM.md for every row (m >= 1), into out[n].
void alignment_scores(const Problem& p, float* out);
// Scored selection (trimtokenator, align, divprune) of k < n rows; indices in pick order into out[k].
void select_scored(const Problem& p, Method method, int64_t k, double stage1_ratio, int64_t* out);
// ||sum_i v_i / max(||v_i||, 1e-12)||^2 over the n rows of v, in double (its errors name no subject).
double normalized_sum_sqnorm(const float* v, int64_t n, int64_t d);
}  // namespace cpu

}  // namespace trim
