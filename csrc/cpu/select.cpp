// cpu/select.cpp — the CPU backend: stage-1 alignment, the greedy stages, divprune.
// Each selection is one SPMD region: threads own contiguous row ranges ("shares") and meet at a
// barrier once per greedy step, where every thread reduces the per-share argmins to the same global
// pick. When the team waits longer than it works (other threads hold the cores), the caller goes on
// alone, working through every share itself with the same arithmetic, so the picks are the same,
// and calls the others back once those threads stop (greedy, greedy_alone).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "../trim.h"
#include "kernels.h"
#include "parallel.h"

namespace trim::cpu {

bool available() { return true; }

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int kMaxThreads = 64;

// A greedy step's best candidate: lowest value, ties to the lowest original index.
struct Pick {
  float value = kInf;
  int64_t index = std::numeric_limits<int64_t>::max();
  int64_t position = -1;  // position in the candidate list
};

inline bool better(float value, int64_t index, const Pick& than) {
  return value < than.value || (value == than.value && index < than.index);
}

// Everything the threads of one selection share.
struct Region {
  const Problem& p;
  int threads;
  Barrier barrier;
  std::vector<float> inv;     // 1 / max(||v_i||, 1e-12)
  std::vector<float> sqdist;  // ||v_i - tbar||^2 (stage 1)
  std::vector<float> center;  // tbar, float32
  std::vector<double> sums;   // per thread: sum of normalised rows it read (threads x d)
  std::vector<int64_t> candidates;  // original indices, ascending
  std::vector<int64_t> alive;       // per thread slice of candidate positions still selectable
  std::vector<int64_t> alive_count;
  std::vector<float> value;       // divprune: running max cosine to S, per candidate position
  std::vector<float> nearest;     // divprune: max cosine to any other row
  std::vector<double> direction;  // per thread: w in double (threads x d)
  std::vector<float> direction32; // per thread: w in float32 (threads x d)
  Pick slots[2][kMaxThreads];
  const Kernels& k = kernels();
  std::atomic<bool> bad_input{false};
  std::vector<int> peers;  // threads of the process running when the caller went alone (greedy)
  std::chrono::steady_clock::time_point next_look{};
  bool blind_retry = true;  // with no such thread to watch, one call back after 1 ms
  // Leaving the team: from step leave_at on the caller goes on alone; `left` counts the helpers gone.
  std::atomic<int64_t> leave_at{std::numeric_limits<int64_t>::max()};
  std::atomic<int> left{0};

  Region(const Problem& problem, int count) : p(problem), threads(count), barrier(count) {}

  // Whether the threads that kept us alone have stopped running (looked at every 50 us at most). If
  // none was seen (they had stopped, or belong to another process), once, 1 ms after going alone.
  bool cores_freed() {
    const auto now = std::chrono::steady_clock::now();
    if (now < next_look) return false;
    next_look = now + std::chrono::microseconds(50);
    if (!peers.empty()) return !any_running(peers);
    if (!blind_retry) return false;
    blind_retry = false;
    return true;
  }
  // Going alone: which threads to watch, and when to look first.
  void go_alone() {
    peers = running_peers();
    next_look = std::chrono::steady_clock::now() + std::chrono::microseconds(peers.empty() ? 1000 : 50);
  }

  const float* row(int64_t i) const { return p.v + i * p.d; }
  double* dir(int tid) { return direction.data() + tid * p.d; }
  float* dir32(int tid) { return direction32.data() + tid * p.d; }
};

// acc += the normalised rows idx[0..count), kBlock rows per kernel call.
void sum_normalized(const Region& r, double* acc, const int64_t* idx, int64_t count) {
  const float* rows[kBlock];
  float scales[kBlock];
  for (int64_t a = 0; a < count; a += kBlock) {
    for (int b = 0; b < kBlock; ++b) {
      const bool used = a + b < count;
      const int64_t i = idx[used ? a + b : a];
      rows[b] = r.row(i);
      scales[b] = used ? r.inv[i] : 0.0f;
    }
    r.k.add_block(acc, rows, scales, r.p.d);
  }
}

// Phase 1 on rows [lo, hi): inverse norms, stage-1 distances, and (when `sum`) the thread's sum of
// normalised rows, added a block at a time while the block is still in cache.
void row_pass(Region& r, int tid, bool stage1, bool sum) {
  const auto [lo, hi] = share(r.p.n, tid, r.threads);
  double* acc = sum ? r.sums.data() + tid * r.p.d : nullptr;
  bool finite = true;
  int64_t block[kBlock];
  for (int64_t first = lo; first < hi; first += kBlock) {
    const int64_t count = std::min<int64_t>(kBlock, hi - first);
    for (int64_t i = first; i < first + count; ++i) {
      float sqnorm = 0, sqdist = 0;
      r.k.sqnorm_sqdist(r.row(i), stage1 ? r.center.data() : nullptr, r.p.d, &sqnorm, &sqdist);
      finite = finite && std::isfinite(sqnorm) && std::isfinite(sqdist);
      r.inv[i] = 1.0f / std::max(std::sqrt(sqnorm), 1e-12f);
      if (stage1) r.sqdist[i] = sqdist;
      block[i - first] = i;
    }
    if (acc) sum_normalized(r, acc, block, count);
  }
  if (!finite) r.bad_input = true;
}

// Each thread's w32 = the sum of the threads' sums (same order on every thread, so the same bits).
void start_direction(Region& r, int tid) {
  float* w = r.dir32(tid);
  for (int64_t i = 0; i < r.p.d; ++i) {
    double total = 0;
    for (int t = 0; t < r.threads; ++t) total += r.sums[t * r.p.d + i];
    w[i] = static_cast<float>(total);
  }
}

// Stage-1 ranking: positions of all rows by ascending ||v_i - tbar||^2, ties to the lower index.
std::vector<int64_t> stage1_order(const Region& r, int64_t keep) {
  std::vector<int64_t> order(static_cast<size_t>(r.p.n));
  std::iota(order.begin(), order.end(), int64_t{0});
  auto closer = [&](int64_t a, int64_t b) {
    return r.sqdist[a] < r.sqdist[b] || (r.sqdist[a] == r.sqdist[b] && a < b);
  };
  std::partial_sort(order.begin(), order.begin() + keep, order.end(), closer);
  order.resize(static_cast<size_t>(keep));
  return order;
}

// Splits the candidates between threads and marks them all alive.
void start_candidates(Region& r) {
  const int64_t count = static_cast<int64_t>(r.candidates.size());
  r.alive.resize(static_cast<size_t>(count));
  r.alive_count.assign(static_cast<size_t>(r.threads), 0);
  for (int tid = 0; tid < r.threads; ++tid) {
    const auto [lo, hi] = share(count, tid, r.threads);
    for (int64_t pos = lo; pos < hi; ++pos) r.alive[pos] = pos;
    r.alive_count[tid] = hi - lo;
  }
}

// Removes candidate `position` from its owner's alive slice.
void retire(Region& r, int tid, int64_t position) {
  const auto [lo, hi] = share(static_cast<int64_t>(r.candidates.size()), tid, r.threads);
  if (position < lo || position >= hi) return;
  int64_t* slice = r.alive.data() + lo;
  int64_t& count = r.alive_count[tid];
  for (int64_t a = 0; a < count; ++a) {
    if (slice[a] == position) {
      slice[a] = slice[--count];
      return;
    }
  }
}

// The best of `threads` offers: every thread reduces the same slots to the same answer.
Pick reduce_slots_of(const Pick* slots, int threads) {
  Pick best;
  for (int tid = 0; tid < threads; ++tid)
    if (better(slots[tid].value, slots[tid].index, best)) best = slots[tid];
  return best;
}

// The global pick of a step.
Pick reduce_slots(const Region& r, int64_t step) { return reduce_slots_of(r.slots[step & 1], r.threads); }

// Share `tid`'s best candidate of a step; values are u^_j . w (trimtokenator) or the running max of
// it (divprune).
template <bool kRunningMax>
Pick scan(Region& r, int tid, int64_t step, const float* w) {
  const int64_t d = r.p.d;
  const auto [lo, hi] = share(static_cast<int64_t>(r.candidates.size()), tid, r.threads);
  const int64_t* slice = r.alive.data() + lo;
  const int64_t count = r.alive_count[tid];
  float dots[4];
  Pick best;
  auto consider = [&](int64_t position, float dot) {
    const int64_t index = r.candidates[position];
    float value = dot * r.inv[index];
    if constexpr (kRunningMax) value = r.value[position] = std::max(r.value[position], value);
    if (better(value, index, best)) best = {value, index, position};
  };
  // Groups of four rows, then the rest one by one; every other step walks the groups backwards,
  // so the rows read last (still in this core's L2) are read first again.
  const int64_t groups = count / 4;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t a = 4 * (step & 1 ? groups - 1 - g : g);
    r.k.dot4(r.row(r.candidates[slice[a]]), r.row(r.candidates[slice[a + 1]]),
             r.row(r.candidates[slice[a + 2]]), r.row(r.candidates[slice[a + 3]]), w, d, dots);
    for (int k = 0; k < 4; ++k) consider(slice[a + k], dots[k]);
  }
  for (int64_t a = 4 * groups; a < count; ++a) consider(slice[a], r.k.dot(r.row(r.candidates[slice[a]]), w, d));
  return best;
}

// Thread `tid`'s next direction after `pick`: the pick itself (divprune) or the running sum of picks
// (trimtokenator).
template <bool kRunningMax>
void next_direction(Region& r, int tid, int64_t step, const Pick& pick) {
  const int64_t d = r.p.d;
  double* wd = r.dir(tid);
  float* w32 = r.dir32(tid);
  if (kRunningMax || step == 0) std::fill(wd, wd + d, 0.0);
  r.k.add_scaled(wd, r.row(pick.index), r.inv[pick.index], d);
  for (int64_t i = 0; i < d; ++i) w32[i] = static_cast<float>(wd[i]);
}

template <bool kRunningMax>
void greedy_alone(Region& r, int64_t first, int64_t steps, int64_t* out);

using Clock = std::chrono::steady_clock;

// Greedy steps [first, steps) on thread `tid`, which owns share `tid`. On entry each thread's w
// holds step `first`'s direction. Thread 0 writes the picks, and times its own scans and its waits
// at the barrier: when, after eight steps, it has waited more than twice as long as it worked, the
// other threads are not getting a core often enough (another library's threads hold it; a thread
// that is only a little late costs far less), and the caller goes on alone, two steps later (a step
// every thread knows of by then).
template <bool kRunningMax>
void greedy(Region& r, int tid, int64_t first, int64_t steps, int64_t* out) {
  Clock::duration worked{}, waited{};
  for (int64_t step = first; step < steps; ++step) {
    const auto began = Clock::now();
    r.slots[step & 1][tid] = scan<kRunningMax>(r, tid, step, r.dir32(tid));
    const auto scanned = Clock::now();
    r.barrier.wait();
    const Pick pick = reduce_slots(r, step);
    if (tid == 0) out[step] = pick.index;
    retire(r, tid, pick.position);
    next_direction<kRunningMax>(r, tid, step, pick);
    if (step + 1 >= r.leave_at.load(std::memory_order_acquire)) {
      if (tid != 0) {
        r.left.fetch_add(1, std::memory_order_release);
        return;
      }
      while (r.left.load(std::memory_order_acquire) != r.threads - 1) std::this_thread::yield();
      r.go_alone();
      greedy_alone<kRunningMax>(r, step + 1, steps, out);
      return;
    }
    if (tid == 0) {
      worked += scanned - began;
      waited += Clock::now() - scanned;
      if (step - first >= 7 && waited > 2 * worked && step + 2 < steps)
        r.leave_at.store(step + 2, std::memory_order_release);
    }
  }
}

// Greedy steps on the caller alone, share by share, until the threads that hold the cores stop:
// then the other threads start (with the caller's direction) and every thread goes on with its own
// share from that step.
template <bool kRunningMax>
void greedy_alone(Region& r, int64_t first, int64_t steps, int64_t* out) {
  for (int64_t step = first; step < steps; ++step) {
    if (step > first && r.threads > 1 && r.cores_freed()) {
      for (int tid = 1; tid < r.threads; ++tid) {
        std::copy(r.dir(0), r.dir(0) + r.p.d, r.dir(tid));
        std::copy(r.dir32(0), r.dir32(0) + r.p.d, r.dir32(tid));
      }
      // Every helper waits for `go` (1: all started, -1: one could not be, so the caller goes on alone).
      std::atomic<int> go{0};
      std::vector<std::thread> helpers;
      try {
        for (int tid = 1; tid < r.threads; ++tid)
          helpers.emplace_back([&r, &go, tid, step, steps] {
            int state;
            while ((state = go.load(std::memory_order_acquire)) == 0) std::this_thread::yield();
            if (state > 0) greedy<kRunningMax>(r, tid, step, steps, nullptr);
          });
      } catch (...) {
        go.store(-1, std::memory_order_release);
        for (auto& helper : helpers) helper.join();
        helpers.clear();
        r.peers.clear();  // no second try
        r.blind_retry = false;
      }
      if (!helpers.empty()) {
        r.leave_at.store(std::numeric_limits<int64_t>::max(), std::memory_order_relaxed);
        r.left.store(0, std::memory_order_relaxed);
        go.store(1, std::memory_order_release);
        greedy<kRunningMax>(r, 0, step, steps, out);
        for (auto& helper : helpers) helper.join();  // before `go` goes out of scope
        return;
      }
    }
    for (int tid = 0; tid < r.threads; ++tid) r.slots[step & 1][tid] = scan<kRunningMax>(r, tid, step, r.dir32(0));
    const Pick pick = reduce_slots(r, step);
    out[step] = pick.index;
    for (int tid = 0; tid < r.threads; ++tid) retire(r, tid, pick.position);
    next_direction<kRunningMax>(r, 0, step, pick);
  }
}

void select_trimtokenator(Region& r, Method method, int64_t k, double stage1_ratio, int64_t* out) {
  const Problem& p = r.p;
  const bool stage1 = p.m > 0;
  const int64_t k1 = stage1 ? (method == Method::align ? k : stage1_count(p.n, k, stage1_ratio)) : p.n;
  const bool stage2 = method == Method::trimtokenator && k < k1;
  r.inv.resize(static_cast<size_t>(p.n));
  if (stage1) {
    double offset = 0;
    const std::vector<double> center = text_centroid(p, &offset);
    r.center.assign(center.begin(), center.end());
    r.sqdist.resize(static_cast<size_t>(p.n));
  }
  if (stage2) {
    r.sums.assign(static_cast<size_t>(r.threads * p.d), 0.0);
    r.direction.assign(static_cast<size_t>(r.threads * p.d), 0.0);
    r.direction32.assign(static_cast<size_t>(r.threads * p.d), 0.0f);
  }
  // Stage 1: the k1 rows closest to the text centroid, in ascending index (the caller, between barriers).
  auto survivors = [&] {
    if (r.bad_input) return;
    if (stage1) {
      r.candidates = stage1_order(r, k1);
      if (method == Method::align) std::copy(r.candidates.begin(), r.candidates.end(), out);
      std::sort(r.candidates.begin(), r.candidates.end());
    } else {
      r.candidates.resize(static_cast<size_t>(p.n));
      std::iota(r.candidates.begin(), r.candidates.end(), int64_t{0});
    }
    if (stage2) start_candidates(r);
  };
  // The survivors' sum for share `tid` (one more read of K1 rows).
  auto survivors_sum = [&](int tid) {
    const auto [lo, hi] = share(k1, tid, r.threads);
    sum_normalized(r, r.sums.data() + tid * p.d, r.candidates.data() + lo, hi - lo);
  };
  // Without stage 1 every row is a candidate, so the first pass also sums them.
  run_parallel(r.threads, [&](int tid) {
    row_pass(r, tid, stage1, stage2 && !stage1);
    r.barrier.wait();
    if (tid == 0) survivors();
    r.barrier.wait();
    if (r.bad_input || !stage2) return;
    if (stage1) {
      survivors_sum(tid);
      r.barrier.wait();
    }
    start_direction(r, tid);
    greedy<false>(r, tid, 0, k, out);
  });
  if (r.bad_input) throw_bad_rows(p);
  // Without a greedy stage: align with text wrote its ranking; otherwise the survivors are the answer.
  if (!stage2 && !(method == Method::align && stage1))
    std::copy(r.candidates.begin(), r.candidates.begin() + k, out);
}

// divprune's first pick needs each row's nearest other row: 4 rows at a time against every row.
void nearest_pass(Region& r, int tid) {
  const Problem& p = r.p;
  const int64_t blocks = (p.n + 3) / 4;
  float dots[4];
  for (int64_t b = tid; b < blocks; b += r.threads) {
    const int64_t i0 = 4 * b;
    const int64_t rows = std::min<int64_t>(4, p.n - i0);
    const float* rr[4];
    for (int k = 0; k < 4; ++k) rr[k] = r.row(i0 + std::min<int64_t>(k, rows - 1));
    float best[4] = {-kInf, -kInf, -kInf, -kInf};
    for (int64_t j = 0; j < p.n; ++j) {
      r.k.dot4(rr[0], rr[1], rr[2], rr[3], r.row(j), p.d, dots);
      for (int k = 0; k < rows; ++k)
        if (i0 + k != j) best[k] = std::max(best[k], dots[k] * r.inv[i0 + k] * r.inv[j]);
    }
    for (int k = 0; k < rows; ++k) r.nearest[i0 + k] = best[k];
  }
}

void select_divprune(Region& r, int64_t k, int64_t* out) {
  const Problem& p = r.p;
  r.inv.resize(static_cast<size_t>(p.n));
  r.nearest.resize(static_cast<size_t>(p.n));
  r.candidates.resize(static_cast<size_t>(p.n));
  std::iota(r.candidates.begin(), r.candidates.end(), int64_t{0});
  r.value.assign(static_cast<size_t>(p.n), -kInf);
  r.direction.assign(static_cast<size_t>(r.threads * p.d), 0.0);
  r.direction32.assign(static_cast<size_t>(r.threads * p.d), 0.0f);
  start_candidates(r);
  // First pick: the row whose nearest other row is farthest (lowest max cosine), lowest index on ties;
  // it becomes thread `tid`'s direction.
  auto first_pick = [&](int tid) {
    Pick first;
    for (int64_t i = 0; i < p.n; ++i)
      if (better(r.nearest[i], i, first)) first = {r.nearest[i], i, i};
    float* w = r.dir32(tid);
    for (int64_t i = 0; i < p.d; ++i) w[i] = r.row(first.index)[i] * r.inv[first.index];
    return first;
  };
  run_parallel(r.threads, [&](int tid) {
    row_pass(r, tid, false, false);
    r.barrier.wait();
    if (r.bad_input) return;
    nearest_pass(r, tid);
    r.barrier.wait();
    const Pick first = first_pick(tid);
    if (tid == 0) out[0] = first.index;
    retire(r, tid, first.position);
    greedy<true>(r, tid, 0, k - 1, out + 1);
  });
  if (r.bad_input) throw_bad_rows(p);
}

// cdpruner (ALGORITHM.md): greedy MAP inference of the DPP with kernel L_ij = q_i s_ij q_j. Thread
// `tid` owns the rows of share `tid`: each step it computes the kernel row of the last pick against
// its rows (one dot product each), updates their c columns and d2, and offers its best row; the
// threads meet at a barrier once per step and reduce the offers to the same pick.
struct Dpp {
  const Problem& p;
  const int64_t k;
  const int threads;
  const Kernels& kern = kernels();
  Barrier barrier;
  std::vector<float> inv;       // 1 / max(||v_i||, 1e-12)
  std::vector<double> q;        // relevance in [0, 1]
  std::vector<double> d2;       // squared residual of each row's kernel feature
  int64_t width;                // c columns a row has room for: min(k - 1, d), the kernel's rank at most
  std::vector<double> c;        // n x width: row i's c columns, one per pick that updated
  std::vector<char> taken;
  std::vector<double> text_mean; // mean of the unit text rows
  double low[kMaxThreads], high[kMaxThreads];
  Pick slots[2][kMaxThreads];
  std::atomic<bool> bad_input{false};

  Dpp(const Problem& problem, int64_t keep, int count)
      : p(problem), k(keep), threads(count), barrier(count), inv(p.n), q(p.n), d2(p.n),
        width(std::min(keep - 1, problem.d)), c(static_cast<size_t>(p.n * width)), taken(p.n, 0) {}
  const float* row(int64_t i) const { return p.v + i * p.d; }
};

constexpr double kSpanned = 1e-4;  // a d2 at or under this counts as 0
constexpr double kFlat = 1e-6;     // a relevance spread at or under this: every row equally relevant

void dpp_region(Dpp& r, int tid, int64_t* out) {
  const Problem& p = r.p;
  const auto [lo, hi] = share(p.n, tid, r.threads);
  // Pass 1: norms, the raw relevance (mean cosine to the text rows) and its range in this share.
  double low = std::numeric_limits<double>::infinity(), high = -low;
  bool finite = true;
  for (int64_t i = lo; i < hi; ++i) {
    float sqnorm = 0, unused = 0;
    r.kern.sqnorm_sqdist(r.row(i), nullptr, p.d, &sqnorm, &unused);
    finite = finite && std::isfinite(sqnorm);
    r.inv[i] = 1.0f / std::max(std::sqrt(sqnorm), 1e-12f);
    // The relevance in double: the scaling below divides its rounding by the spread of r.
    double sq = 0, dot = 0;
    const float* v = r.row(i);
    for (int64_t a = 0; a < p.d; ++a) sq += static_cast<double>(v[a]) * v[a];
    const double norm = std::sqrt(sq);
    r.d2[i] = norm >= 1e-12 ? 1.0 : sq * 1e24;  // s_ii, exactly 1 for every row but a (near) zero one
    if (p.m > 0) {
      for (int64_t a = 0; a < p.d; ++a) dot += v[a] * r.text_mean[a];
      r.q[i] = dot / std::max(norm, 1e-12);
      low = std::min(low, r.q[i]);
      high = std::max(high, r.q[i]);
    }
  }
  if (!finite) r.bad_input = true;
  r.low[tid] = low;
  r.high[tid] = high;
  r.barrier.wait();
  if (r.bad_input) return;
  for (int t = 0; t < r.threads; ++t) {
    low = std::min(low, r.low[t]);
    high = std::max(high, r.high[t]);
  }
  const bool relevance = p.m > 0 && high - low > kFlat;
  for (int64_t i = lo; i < hi; ++i) {
    r.q[i] = relevance ? (r.q[i] - low) / (high - low) : 1.0;
    r.d2[i] *= r.q[i] * r.q[i];
  }
  int64_t columns = 0;  // c columns so far (picks with d2 above kSpanned)
  for (int64_t step = 0;; ++step) {
    Pick best;
    for (int64_t i = lo; i < hi; ++i) {
      if (r.taken[i]) continue;
      const float g = r.d2[i] > kSpanned ? static_cast<float>(r.d2[i]) : 0.0f;
      if (better(-g, i, best)) best = {-g, i, i};  // the largest g
    }
    r.slots[step & 1][tid] = best;
    r.barrier.wait();
    const Pick pick = reduce_slots_of(r.slots[step & 1], r.threads);
    const int64_t j = pick.index;
    if (tid == 0) out[step] = j;
    if (j >= lo && j < hi) r.taken[j] = 1;  // only the owner reads it
    if (step + 1 == r.k) return;
    const double dj = r.d2[j];
    // Spanned (or, past the kernel's rank, as good as): no update, the rest go by index.
    if (dj <= kSpanned || columns == r.width) continue;
    const double scale = 1.0 / std::sqrt(dj), qj = r.q[j] * r.inv[j];
    const double* cj = r.c.data() + j * r.width;
    for (int64_t i = lo; i < hi; ++i) {
      if (r.taken[i]) continue;
      double* ci = r.c.data() + i * r.width;
      double known = 0;
      for (int64_t t = 0; t < columns; ++t) known += ci[t] * cj[t];
      const double kernel = qj * r.q[i] * r.inv[i] * r.kern.dot(r.row(i), r.row(j), p.d);
      const double e = (kernel - known) * scale;
      ci[columns] = e;
      r.d2[i] -= e * e;
    }
    ++columns;  // the next step's barrier orders these writes before any other thread reads them
  }
}

}  // namespace

void select_cdpruner(const Problem& p, int64_t k, int64_t* out) {
  Dpp r(p, k, thread_count(p.n * p.d));
  if (p.m > 0) {
    std::vector<double> mean(static_cast<size_t>(p.d), 0.0);
    for (int64_t j = 0; j < p.m; ++j) {
      const float* t = p.t + j * p.d;
      double sq = 0;
      for (int64_t i = 0; i < p.d; ++i) sq += static_cast<double>(t[i]) * t[i];
      const double scale = 1.0 / std::max(std::sqrt(sq), 1e-12) / static_cast<double>(p.m);
      for (int64_t i = 0; i < p.d; ++i) mean[i] += t[i] * scale;
    }
    r.text_mean.assign(mean.begin(), mean.end());
  }
  run_parallel(r.threads, [&](int tid) { dpp_region(r, tid, out); });
  if (r.bad_input) throw_bad_rows(p);
}

void alignment_scores(const Problem& p, float* out) {
  Region r(p, thread_count(p.n * p.d));
  double offset = 0;
  const std::vector<double> center = text_centroid(p, &offset);
  r.center.assign(center.begin(), center.end());
  r.inv.resize(static_cast<size_t>(p.n));
  r.sqdist.resize(static_cast<size_t>(p.n));
  run_parallel(r.threads, [&](int tid) { row_pass(r, tid, true, false); });
  if (r.bad_input) throw_bad_rows(p);
  for (int64_t i = 0; i < p.n; ++i) out[i] = static_cast<float>(-(static_cast<double>(r.sqdist[i]) + offset));
}

void select_scored(const Problem& p, Method method, int64_t k, double stage1_ratio, int64_t* out) {
  Region r(p, thread_count(p.n * p.d));
  if (method == Method::divprune) select_divprune(r, k, out);
  else select_trimtokenator(r, method, k, stage1_ratio, out);
}

double normalized_sum_sqnorm(const float* v, int64_t n, int64_t d) {
  const Problem p{v, n, d, nullptr, 0};
  Region r(p, thread_count(n * d));
  r.inv.resize(static_cast<size_t>(n));
  r.sums.assign(static_cast<size_t>(r.threads * d), 0.0);
  run_parallel(r.threads, [&](int tid) { row_pass(r, tid, false, true); });
  if (r.bad_input) throw_bad_rows(p, "");
  double sq = 0;
  for (int64_t i = 0; i < d; ++i) {
    double s = 0;
    for (int t = 0; t < r.threads; ++t) s += r.sums[t * d + i];
    sq += s * s;
  }
  return sq;
}

}  // namespace trim::cpu
