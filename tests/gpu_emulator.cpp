// gpu_emulator.cpp — runs the GPU backends' plan (csrc/gpu/plan.h) and kernel arithmetic
// (csrc/gpu/arith.h) on the CPU, one emulated thread after another, so that tests/test_gpu_plan.py
// can check the logic of the CUDA and Metal kernels against the float64 reference on any machine.
// Lanes, chunks and butterflies are laid out as the kernels lay them out; only the parallelism differs.
//
// stdin:  int64 n, d, m, k, method, mode (0 select, 1 alignment scores); float64 stage1_ratio;
//         float32 V (n x d); float32 T (m x d)
// stdout: int64 count, then count int64 picks (mode 0) or n float32 scores (mode 1)
// exit 3 with the message on stderr for input the core rejects.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "gpu/arith.h"
#include "gpu/plan.h"

namespace {

// The butterfly of a SIMD group: after it every lane holds the same total.
template <class T, class Add>
T butterfly(std::vector<T> lanes, Add add) {
  for (int s = TRIM_SIMD / 2; s >= 1; s /= 2) {
    std::vector<T> next(lanes.size());
    for (int l = 0; l < TRIM_SIMD; ++l) next[l] = add(lanes[l], lanes[l ^ s]);
    lanes.swap(next);
  }
  return lanes[0];
}

class Emulator {
 public:
  void upload(const trim::Problem& p, const float* center) {
    n_ = static_cast<int>(p.n);
    d_ = static_cast<int>(p.d);
    v_.assign(p.v, p.v + p.n * p.d);
    center_.assign(d_, 0.0f);
    if (center) center_.assign(center, center + d_);
    inv_.assign(n_, 0.0f);
    dist_.assign(n_, 0.0f);
    alive_.assign(n_, 1);
    value_.assign(n_, 0.0f);
    w_.assign(d_, trim_kahan_zero());
    w32_.assign(d_, 0.0f);
    picks_.assign(n_, -1);
    bad_ = false;
  }

  void row_stats(bool has_center) {
    for (int i = 0; i < n_; ++i) {
      std::vector<TrimStats> lanes(TRIM_SIMD);
      for (int l = 0; l < TRIM_SIMD; ++l) lanes[l] = trim_lane_stats(row(i), center_.data(), has_center, d_, l);
      const TrimStats s = butterfly(lanes, trim_add_stats);
      inv_[i] = trim_inv_norm(s.sqnorm);
      dist_[i] = s.sqdist;
      if (!std::isfinite(s.sqnorm) || !std::isfinite(s.sqdist)) bad_ = true;
    }
  }

  void rank(int64_t k1, int64_t k_order) {
    for (int i = 0; i < n_; ++i) {
      int64_t r = 0;
      for (int j = 0; j < n_; ++j) r += trim_ranks_before(dist_[j], j, dist_[i], i);
      alive_[i] = r < k1;
      if (r < k_order) picks_[r] = i;
    }
  }

  void keep_all() { alive_.assign(n_, 1); }

  void start_sum() {
    for (int col = 0; col < d_; ++col) {
      TrimKahan total = trim_kahan_zero();
      for (int c = 0; c < TRIM_SUM_CHUNKS; ++c) {
        const TrimKahan part = trim_column_chunk(v_.data(), inv_.data(), alive_.data(), trim_chunk_start(n_, c),
                                                 trim_chunk_start(n_, c + 1), d_, col);
        total = trim_kahan_merge(total, part);
      }
      w_[col] = total;
      w32_[col] = total.sum;
    }
  }

  void nearest() {
    for (int i = 0; i < n_; ++i) {
      float best = -INFINITY;
      for (int j = 0; j < n_; ++j) {
        if (j == i) continue;
        float dot = 0.0f;
        for (int e = 0; e < d_; ++e) dot = TRIM_FMA(row(i)[e], row(j)[e], dot);
        best = trim_larger(best, trim_cosine(dot, inv_[i], inv_[j]));
      }
      value_[i] = best;
    }
  }

  void clear_values() { value_.assign(n_, -INFINITY); }

  void scores(bool running_max) {
    for (int i = 0; i < n_; ++i) {
      if (!alive_[i]) continue;
      std::vector<float> lanes(TRIM_SIMD);
      for (int l = 0; l < TRIM_SIMD; ++l) lanes[l] = trim_lane_dot(row(i), w32_.data(), d_, l);
      const float dot = butterfly(lanes, [](float a, float b) { return a + b; });
      value_[i] = trim_step_value(dot, inv_[i], value_[i], running_max);
    }
  }

  void pick(int64_t step, bool reset) {
    TrimPick best = trim_no_pick();
    for (int i = 0; i < n_; ++i)
      if (alive_[i]) best = trim_better(best, TrimPick{value_[i], i});
    if (best.index == TRIM_NO_INDEX) return;  // only NaN left: finish() reports the bad rows
    picks_[step] = best.index;
    alive_[best.index] = 0;
    for (int e = 0; e < d_; ++e) {
      w_[e] = trim_direction(w_[e], row(best.index)[e] * inv_[best.index], reset);
      w32_[e] = w_[e].sum;
    }
  }

  bool finish(int64_t* picks, int64_t count, int* alive) {
    std::copy(picks_.begin(), picks_.begin() + count, picks);
    if (alive) std::copy(alive_.begin(), alive_.end(), alive);
    return bad_;
  }

  bool finish_dist(float* dist) {
    std::copy(dist_.begin(), dist_.end(), dist);
    return bad_;
  }

 private:
  const float* row(int i) const { return v_.data() + static_cast<size_t>(i) * d_; }

  int n_ = 0, d_ = 0;
  bool bad_ = false;
  std::vector<float> v_, center_, inv_, dist_, value_, w32_;
  std::vector<int> alive_;
  std::vector<TrimKahan> w_;
  std::vector<int64_t> picks_;
};

template <class T>
bool read(T* x, size_t count) {
  return std::fread(x, sizeof(T), count, stdin) == count;
}

}  // namespace

int main() {
  int64_t head[8];  // n, d, m, k, method, mode (1: scores), alignment, stage1 (trim::Variant)
  double ratio = 0;
  if (!read(head, 8) || !read(&ratio, 1)) return 2;
  const auto [n, d, m, k, method, mode, alignment, stage1] = head;
  std::vector<float> v(static_cast<size_t>(n * d)), t(static_cast<size_t>(m * d));
  if (!read(v.data(), v.size()) || !read(t.data(), t.size())) return 2;
  const trim::Problem p{v.data(), n, d, m ? t.data() : nullptr, m};
  const trim::Variant variant{static_cast<trim::Alignment>(alignment), static_cast<trim::Stage1>(stage1)};
  Emulator dev;
  try {
    if (mode == 1) {
      // The scores of the variant's alignment, as trim::alignment_scores computes them for a GPU.
      const trim::VariantInput in = trim::variant_input(p, trim::Method::align, 1, ratio, variant);
      std::vector<float> scores(static_cast<size_t>(n));
      trim::gpu::alignment_scores(dev, in.p, scores.data());
      std::fwrite(&n, sizeof n, 1, stdout);
      std::fwrite(scores.data(), sizeof(float), scores.size(), stdout);
    } else {
      // As trim::select hands a scored selection to a GPU backend: the variant first, then the plan.
      const trim::VariantInput in = trim::variant_input(p, static_cast<trim::Method>(method), k, ratio, variant);
      std::vector<int64_t> picks(static_cast<size_t>(k));
      trim::gpu::select_scored(dev, in.p, static_cast<trim::Method>(method), k, in.stage1_ratio, picks.data());
      std::fwrite(&k, sizeof k, 1, stdout);
      std::fwrite(picks.data(), sizeof(int64_t), picks.size(), stdout);
    }
  } catch (const trim::InputError& error) {
    std::fprintf(stderr, "%s\n", error.what());
    return 3;
  }
  return 0;
}
