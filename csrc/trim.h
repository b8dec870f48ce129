// trim.h — the kernel contract of trimcpp's selection core (see ALGORITHM.md).
// Plain C++ on pointers and sizes; every backend implements the functions of its namespace.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace trim {

enum class Method : int { trimtokenator = 0, align = 1, divprune = 2, uniform = 3, random = 4, none = 5, cdpruner = 6 };

enum class Backend : int { cpu = 0, cuda = 1, metal = 2 };

// Stage 1's score (ALGORITHM.md): the paper's L2 distance to the text rows, or (ours) their cosine.
enum class Alignment : int { l2 = 0, cosine = 1 };

// How many rows survive stage 1 (ALGORITHM.md): the share stage1_ratio of N (the paper), or (ours)
// K1 = round(sqrt(K N)), which adapts to the budget.
enum class Stage1 : int { ratio = 0, adaptive = 1 };

// The variant of stage 1 a selection uses. The core's own default is the paper's form; the product's
// default (the cosine) is set by its callers: trimcpp.selection.DEFAULT_ALIGNMENT and the patched
// tools' --image-alignment, which always pass a Variant.
struct Variant {
  Alignment alignment = Alignment::l2;
  Stage1 stage1 = Stage1::ratio;
};

// Input the core itself finds invalid (non-finite values, overflow); bindings map it to ValueError.
struct InputError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// A GPU backend that cannot run (no device, driver or runtime error); bindings map it to RuntimeError.
struct DeviceError : std::runtime_error {
  using std::runtime_error::runtime_error;
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
// K1 of Stage1::adaptive: clamp(round(sqrt(k n)), k, n), in exact integer arithmetic.
int64_t adaptive_stage1_count(int64_t n, int64_t k);
// True when all `count` values are finite.
bool all_finite(const float* x, int64_t count);
// Writes the k `uniform` indices (k <= n) to out.
void select_uniform(int64_t n, int64_t k, int64_t* out);
// Writes k distinct indices (k <= n) in draw order to out: splitmix64(seed) + partial Fisher-Yates.
void select_random(int64_t n, int64_t k, uint64_t seed, int64_t* out);
// Budgets b_i in [1, sizes[i]] proportional to weights[i], largest remainder, sum min(total, sum sizes).
void split_budget(const int64_t* sizes, const double* weights, int64_t count, int64_t total, int64_t* out);
// The mean of the rows of T in double (m >= 1), and *offset = mean_j ||t_j||^2 - ||mean||^2.
std::vector<double> text_centroid(const Problem& p, double* offset);
// Throws the InputError that fits rows whose first pass failed: non-finite values, or overflow. The
// message starts with `subject`, or with the verb when `subject` is empty.
[[noreturn]] void throw_bad_rows(const Problem& p, const std::string& subject = "visual");
// What a scored selection (trimtokenator, align, divprune) runs on under a variant of stage 1, for any
// backend: for cosine alignment (trimtokenator, align, with text) unit copies of the rows, whose L2
// score is 2 (1/M) sum_j cos(v_i, t_j) - 2; for an adaptive K1 (trimtokenator) the share K1 / n, which
// stage1_count rounds back to K1. Otherwise the problem and share as given. Not copyable (p points
// into v and t).
struct VariantInput {
  std::vector<float> v, t;
  Problem p{};
  double stage1_ratio = 0;
  VariantInput() = default;
  VariantInput(const VariantInput&) = delete;
  VariantInput& operator=(const VariantInput&) = delete;
  VariantInput(VariantInput&&) = default;
};
VariantInput variant_input(const Problem& p, Method method, int64_t k, double stage1_ratio, const Variant& variant);
// Selects min(k, n) rows (all n for `none`) on `backend`; indices in pick order into out[n]. The
// variant's alignment applies to trimtokenator and align, its stage-1 size to trimtokenator
// (variant_input, then the backend).
int64_t select(const Problem& p, Method method, int64_t k, double stage1_ratio, uint64_t seed, Backend backend,
               int64_t* out, const Variant& variant = {});
// The stage-1 scores a_i (m >= 1) on `backend`, into out[n]: L2, or the cosine score.
void alignment_scores(const Problem& p, Backend backend, float* out, Alignment alignment = Alignment::l2);

// One image as the trimmed handlers and patched llama.cpp's tools prune it (csrc/image.cpp).

// Rows kept per image: a count >= 1, or a share in (0, 1] of the image's rows; neither (both 0): all.
struct Keep {
  int64_t count = 0;
  double share = 0.0;
};
// K for an image of n rows: the count, or max(1, round(share * n)); n for "all". Throws InputError
// for a negative count or a share outside (0, 1].
int64_t keep_rows(const Keep& keep, int64_t n);
// Rows the LLM sees of an image of `rows` rows in `chunks` chunks (at least one per chunk, at most all).
int64_t image_target(const Keep& keep, Method method, int64_t rows, int64_t chunks);
// An image's weight in split_budget: rows x its mean pairwise cosine distance (ALGORITHM.md).
double diversity_weight(int64_t rows, double sum_sqnorm);
// The kept rows of one image given as chunks (LLaVA-1.6: slices, then the overview) of rows[c] x d
// floats each, conditioned on the text rows t (m x d, m may be 0): the image's target split over the
// chunks with split_budget and diversity weights, each chunk pruned with its budget. Indices per
// chunk, ascending, on the CPU backend, with stage 1's variant (select).
std::vector<std::vector<int64_t>> select_image(const std::vector<const float*>& chunks,
                                               const std::vector<int64_t>& rows, int64_t d, const float* t,
                                               int64_t m, const Keep& keep, Method method, double stage1_ratio,
                                               uint64_t seed, const Variant& variant = {});
// The Method named `name` ("trimtokenator", ...); throws InputError naming the known ones.
Method method_named(const std::string& name);

namespace cpu {
// True when this backend can run here (always, for the CPU).
bool available();
// The a_i of ALGORITHM.md for every row (m >= 1), into out[n].
void alignment_scores(const Problem& p, float* out);
// Scored selection (trimtokenator, align, divprune) of k < n rows; indices in pick order into out[k].
void select_scored(const Problem& p, Method method, int64_t k, double stage1_ratio, int64_t* out);
// cdpruner's greedy MAP inference of k < n rows (ALGORITHM.md); indices in pick order into out[k].
// The GPU backends do not run it (select throws InputError for them).
void select_cdpruner(const Problem& p, int64_t k, int64_t* out);
// ||sum_i v_i / max(||v_i||, 1e-12)||^2 over the n rows of v, in double (its errors name no subject).
double normalized_sum_sqnorm(const float* v, int64_t n, int64_t d);
}  // namespace cpu

// The GPU backends (csrc/cuda, csrc/metal, or their no_*.cpp stubs when switched off at build time).
// available() is a run-time check (a device and a working driver); the others throw DeviceError.
namespace cuda {
bool available();
// The device's name, or why there is none.
std::string device_name();
void alignment_scores(const Problem& p, float* out);
void select_scored(const Problem& p, Method method, int64_t k, double stage1_ratio, int64_t* out);
}  // namespace cuda

namespace metal {
bool available();
std::string device_name();
void alignment_scores(const Problem& p, float* out);
void select_scored(const Problem& p, Method method, int64_t k, double stage1_ratio, int64_t* out);
}  // namespace metal

}  // namespace trim
