// image.cpp — one image's selection as a whole: how many rows it keeps, how a LLaVA-1.6 image's budget
// is split over its chunks, and the chunks' selections (ALGORITHM.md). The patched llama.cpp tools call
// select_image; the Python handlers compose the same steps from trimcpp.selection.
#include <algorithm>
#include <cmath>
#include <numeric>

#include "trim.h"

namespace trim {

int64_t keep_rows(const Keep& keep, int64_t n) {
  if (keep.count < 0) throw InputError("keep must be >= 1, got " + std::to_string(keep.count));
  if (keep.count > 0) return keep.count;
  if (keep.share == 0.0) return n;
  if (!(keep.share > 0.0 && keep.share <= 1.0)) {
    throw InputError("a keep share must be in (0, 1], got " + std::to_string(keep.share));
  }
  return std::max<int64_t>(1, round_half_up(keep.share * static_cast<double>(n)));
}

int64_t image_target(const Keep& keep, Method method, int64_t rows, int64_t chunks) {
  if (method == Method::none) return rows;
  return std::min(rows, std::max(keep_rows(keep, rows), chunks));
}

double diversity_weight(int64_t rows, double sum_sqnorm) {
  const double n = static_cast<double>(rows);
  const double diversity = rows > 1 ? 1.0 - (sum_sqnorm - n) / (n * (n - 1.0)) : 1.0;
  return n * std::max(diversity, 0.0);
}

std::vector<std::vector<int64_t>> select_image(const std::vector<const float*>& chunks,
                                               const std::vector<int64_t>& rows, int64_t d, const float* t,
                                               int64_t m, const Keep& keep, Method method, double stage1_ratio,
                                               uint64_t seed, const Variant& variant) {
  const int64_t count = static_cast<int64_t>(chunks.size());
  if (count == 0 || rows.size() != chunks.size()) throw InputError("an image needs one row count per chunk");
  const int64_t total = std::accumulate(rows.begin(), rows.end(), int64_t{0});
  const int64_t target = image_target(keep, method, total, count);
  std::vector<int64_t> budgets(rows);
  if (target < total && count == 1) {
    budgets[0] = target;
  } else if (target < total) {
    std::vector<double> weights(static_cast<size_t>(count));
    for (int64_t c = 0; c < count; ++c) {
      weights[c] = diversity_weight(rows[c], cpu::normalized_sum_sqnorm(chunks[c], rows[c], d));
    }
    split_budget(rows.data(), weights.data(), count, target, budgets.data());
  }
  std::vector<std::vector<int64_t>> kept(static_cast<size_t>(count));
  for (int64_t c = 0; c < count; ++c) {
    std::vector<int64_t>& out = kept[c];
    out.resize(static_cast<size_t>(rows[c]));
    if (budgets[c] >= rows[c]) {
      std::iota(out.begin(), out.end(), int64_t{0});
      continue;
    }
    const Problem p{chunks[c], rows[c], d, m > 0 ? t : nullptr, m};
    out.resize(static_cast<size_t>(select(p, method, budgets[c], stage1_ratio, seed, Backend::cpu, out.data(), variant)));
    std::sort(out.begin(), out.end());
  }
  return kept;
}

Method method_named(const std::string& name) {
  static const char* const names[] = {"trimtokenator", "align", "divprune", "uniform", "random", "none", "cdpruner"};
  for (int i = 0; i < 7; ++i) {
    if (name == names[i]) return static_cast<Method>(i);
  }
  throw InputError("unknown method '" + name + "' (trimtokenator, align, divprune, cdpruner, uniform, random or none)");
}

}  // namespace trim
