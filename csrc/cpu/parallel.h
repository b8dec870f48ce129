// parallel.h — SPMD regions for the CPU backend: n threads run one body and meet at a spin barrier.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace trim::cpu {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

// A reusable barrier for a fixed number of threads. A thread that arrives early spins for about
// a greedy step, then sleeps: a sleeping thread frees its core, so the scheduler can move a late
// thread there (one that spun or yielded would keep the core while the late thread waits behind
// another process's or library's thread on the other one).
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}

  void wait() {
    if (count_ == 1) return;
    const unsigned generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == count_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_seq_cst);
      if (sleepers_.load(std::memory_order_seq_cst) > 0) {
        std::lock_guard<std::mutex> hold(lock_);
        woken_.notify_all();
      }
      return;
    }
    for (int spin = 0; spin < kSpins; ++spin) {
      if (generation_.load(std::memory_order_acquire) != generation) return;
      cpu_relax();
    }
    std::unique_lock<std::mutex> hold(lock_);
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    woken_.wait(hold, [&] { return generation_.load(std::memory_order_seq_cst) != generation; });
    sleepers_.fetch_sub(1, std::memory_order_relaxed);
  }

 private:
  static constexpr int kSpins = 2000;
  const int count_;
  std::atomic<int> arrived_{0};
  std::atomic<unsigned> generation_{0};
  std::atomic<int> sleepers_{0};
  std::mutex lock_;
  std::condition_variable woken_;
};

// The CPUs this process may run on (its affinity mask where the system has one).
int usable_cpus();
// Other threads of this process running at this moment (ids; empty where the system cannot tell).
std::vector<int> running_peers();
// Whether any of `peers` is still running.
bool any_running(const std::vector<int>& peers);

// Threads for a job touching `floats` values per pass: one per 64 Ki floats, at most the usable
// CPUs (or TRIMCPP_NUM_THREADS when set). The job is cut into that many shares whatever else runs,
// so the picks never depend on the load (cpu/select.cpp's greedy steps may still run on fewer).
inline int thread_count(int64_t floats) {
  int cores = usable_cpus();
  if (const char* env = std::getenv("TRIMCPP_NUM_THREADS")) cores = std::atoi(env);
  const int64_t useful = std::max<int64_t>(1, floats / 65536);
  return static_cast<int>(std::clamp<int64_t>(useful, 1, std::clamp(cores, 1, 64)));
}

// Runs body(tid) for tid in [0, threads) with the caller as thread 0, and rethrows the first
// exception on the caller (hnswlib's ParallelFor). Bodies that meet at a Barrier must not throw.
template <class Body>
void run_parallel(int threads, Body&& body) {
  std::exception_ptr error;
  std::mutex error_lock;
  auto guarded = [&](int tid) {
    try {
      body(tid);
    } catch (...) {
      std::lock_guard<std::mutex> hold(error_lock);
      if (!error) error = std::current_exception();
    }
  };
  std::vector<std::thread> workers;
  workers.reserve(static_cast<size_t>(threads - 1));
  for (int tid = 1; tid < threads; ++tid) workers.emplace_back(guarded, tid);
  guarded(0);
  for (auto& worker : workers) worker.join();
  if (error) std::rethrow_exception(error);
}

// [begin, end) of `count` items for thread `tid` of `threads`.
inline std::pair<int64_t, int64_t> share(int64_t count, int tid, int threads) {
  return {count * tid / threads, count * (tid + 1) / threads};
}

}  // namespace trim::cpu
