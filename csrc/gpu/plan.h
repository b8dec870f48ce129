// gpu/plan.h — the sequence of kernels of a scored selection, shared by the CUDA and Metal hosts and by
// the emulator in tests/. A Device queues each step; nothing comes back to the host before finish().
//
// Device interface (all buffers live on the device; rows are int indices):
//   upload(p, center)       copy V (and the float32 text centroid, or null) to the device
//   row_stats(has_center)   inv[i] = 1/max(||v_i||, 1e-12), dist[i] = ||v_i - center||^2, bad flag
//   rank(k1, k_order)       alive[i] = rank_i < k1 by (dist, index); picks[rank_i] = i for rank_i < k_order
//   keep_all()              alive[i] = 1
//   start_sum()             w = sum of the alive normalised rows (TRIM_SUM_CHUNKS chunks, Kahan)
//   nearest()               value[i] = max over j != i of cos(v_i, v_j)
//   clear_values()          value[i] = -inf
//   scores(running_max)     value[i] = trim_step_value(u^_i . w, ...) for alive rows
//   pick(step, reset)       picks[step] = argmin over alive of value; retire it; w = trim_direction(...)
//   finish(picks, count, alive) -> bool   wait, copy `count` picks (and alive flags when not null),
//                                         return whether any row was non-finite or overflowed
//   finish_dist(dist) -> bool             the same for the stage-1 distances
#pragma once

#include <cstdint>
#include <numeric>
#include <vector>

#include "../trim.h"

namespace trim::gpu {

// The text centroid as the kernels read it (float32), and C of the stage-1 scores into *offset.
inline std::vector<float> float_centroid(const Problem& p, double* offset) {
  const std::vector<double> mean = text_centroid(p, offset);
  return {mean.begin(), mean.end()};
}

// Scored selection (trimtokenator, align, divprune) of k < n rows on `dev`; pick order into out[k].
template <class Device>
void select_scored(Device& dev, const Problem& p, Method method, int64_t k, double stage1_ratio, int64_t* out) {
  const bool stage1 = p.m > 0 && method != Method::divprune;
  double offset = 0;
  const std::vector<float> center = stage1 ? float_centroid(p, &offset) : std::vector<float>{};
  dev.upload(p, stage1 ? center.data() : nullptr);
  dev.row_stats(stage1);
  bool bad = false;
  if (method == Method::divprune) {
    dev.keep_all();
    dev.nearest();
    dev.pick(0, true);  // the row whose nearest other row is farthest
    dev.clear_values();
    for (int64_t step = 1; step < k; ++step) {
      dev.scores(true);
      dev.pick(step, true);
    }
    bad = dev.finish(out, k, nullptr);
  } else if (method == Method::align && !stage1) {  // no text: the first k rows
    bad = dev.finish(out, 0, nullptr);
    std::iota(out, out + k, int64_t{0});
  } else if (method == Method::align) {  // stage 1 alone: its ranking
    dev.rank(k, k);
    bad = dev.finish(out, k, nullptr);
  } else {
    const int64_t k1 = stage1 ? stage1_count(p.n, k, stage1_ratio) : p.n;
    if (stage1) dev.rank(k1, 0);
    else dev.keep_all();
    if (k < k1) {
      dev.start_sum();
      for (int64_t step = 0; step < k; ++step) {
        dev.scores(false);
        dev.pick(step, step == 0);
      }
      bad = dev.finish(out, k, nullptr);
    } else {  // stage 1 already kept k rows: they are the answer, ascending
      std::vector<int> alive(static_cast<size_t>(p.n));
      bad = dev.finish(out, 0, alive.data());
      for (int64_t i = 0, j = 0; i < p.n; ++i)
        if (alive[i]) out[j++] = i;
    }
  }
  if (bad) throw_bad_rows(p);
}

// The stage-1 scores a_i on `dev` (p.m >= 1).
template <class Device>
void alignment_scores(Device& dev, const Problem& p, float* out) {
  double offset = 0;
  const std::vector<float> center = float_centroid(p, &offset);
  dev.upload(p, center.data());
  dev.row_stats(true);
  std::vector<float> dist(static_cast<size_t>(p.n));
  if (dev.finish_dist(dist.data())) throw_bad_rows(p);
  for (int64_t i = 0; i < p.n; ++i) out[i] = static_cast<float>(-(static_cast<double>(dist[i]) + offset));
}

}  // namespace trim::gpu
