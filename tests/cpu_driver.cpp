// cpu_driver.cpp — the CPU backend (csrc/select.cpp, csrc/cpu/) behind a pipe, without Python, so
// tests/test_cpu_builds.py can run it built for another processor (aarch64 under qemu-user), under
// sanitizers and under valgrind, and compare its picks with the float64 reference.
//
// stdin:  int64 n, d, m, k, method, mode (0 select, 1 alignment scores, 2 normalised sum), seed;
//         float64 stage1_ratio; float32 V (n x d); float32 T (m x d)
// stdout: mode 0: int64 count, count int64 picks (pick order); mode 1: n float32 scores;
//         mode 2: one float64. Exit 3 with the message on stderr for input the core rejects.
// `cpu_driver --isa` prints the kernels' instruction set. `cpu_driver --busy MS` first keeps one
// other thread spinning for MS milliseconds on a process held to two CPUs (Linux), as llama.cpp's
// OpenMP workers spin after the image encoder: the selection starts on the caller alone and calls in
// its threads once the spinner stops.
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif

#include "cpu/kernels.h"
#include "trim.h"

namespace {

template <class T>
bool read(T* x, size_t count) {
  return std::fread(x, sizeof(T), count, stdin) == count;
}

std::atomic<bool> done{false};

// Holds the process to its first two CPUs (where it has more) and spins a thread for `ms` (or until done).
std::thread busy(int ms) {
#if defined(__linux__)
  cpu_set_t set, two;
  if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 2) {
    CPU_ZERO(&two);
    for (int cpu = 0, kept = 0; cpu < CPU_SETSIZE && kept < 2; ++cpu)
      if (CPU_ISSET(cpu, &set)) CPU_SET(cpu, &two), ++kept;
    sched_setaffinity(0, sizeof two, &two);
  }
#endif
  std::atomic<bool> started{false};
  std::thread spinner([ms, &started] {
    const auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(ms);
    started = true;
    while (std::chrono::steady_clock::now() < end && !done) {
    }
  });
  while (!started) std::this_thread::yield();
  return spinner;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "--isa") == 0) {
    std::printf("%s\n", trim::cpu::kernels_isa());
    return 0;
  }
  const int busy_ms = argc > 2 && std::strcmp(argv[1], "--busy") == 0 ? std::atoi(argv[2]) : -1;
  int64_t head[7];
  double ratio = 0;
  if (!read(head, 7) || !read(&ratio, 1)) return 2;
  const auto [n, d, m, k, method, mode, seed] = head;
  std::vector<float> v(static_cast<size_t>(n * d)), t(static_cast<size_t>(m * d));
  if (!read(v.data(), v.size()) || !read(t.data(), t.size())) return 2;
  const trim::Problem p{v.data(), n, d, m ? t.data() : nullptr, m};
  std::thread spinner = busy_ms >= 0 ? busy(busy_ms) : std::thread();
  auto stop_spinner = [&] {
    done = true;
    if (spinner.joinable()) spinner.join();
  };
  try {
    if (mode == 1) {
      std::vector<float> scores(static_cast<size_t>(n));
      trim::alignment_scores(p, trim::Backend::cpu, scores.data());
      std::fwrite(scores.data(), sizeof(float), scores.size(), stdout);
    } else if (mode == 2) {
      const double sq = trim::cpu::normalized_sum_sqnorm(v.data(), n, d);
      std::fwrite(&sq, sizeof sq, 1, stdout);
    } else {
      std::vector<int64_t> picks(static_cast<size_t>(n));
      const int64_t count = trim::select(p, static_cast<trim::Method>(method), k, ratio, static_cast<uint64_t>(seed),
                                         trim::Backend::cpu, picks.data());
      std::fwrite(&count, sizeof count, 1, stdout);
      std::fwrite(picks.data(), sizeof(int64_t), static_cast<size_t>(count), stdout);
    }
  } catch (const trim::InputError& error) {
    stop_spinner();
    std::fprintf(stderr, "%s\n", error.what());
    return 3;
  }
  stop_spinner();
  return 0;
}
