// cpu/peers.cpp — what the cores are doing: the CPUs this process may use and which of its other
// threads are running right now (llama.cpp's OpenMP or thread-pool workers spinning after a graph,
// OpenBLAS workers spinning after a NumPy call). Linux reads /proc/self/task; elsewhere nothing is
// known, so no thread is reported and the CPU backend behaves as if the cores were free.
#include "parallel.h"

#if defined(__linux__)
#include <dirent.h>
#include <fcntl.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>

namespace trim::cpu {

namespace {

// The scheduler state of thread `tid` ('R' running or runnable, 'S' sleeping, ...), or 0.
char thread_state(int tid) {
  char path[64];
  std::snprintf(path, sizeof path, "/proc/self/task/%d/stat", tid);
  const int fd = ::open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  char buffer[512];
  const ssize_t size = ::read(fd, buffer, sizeof buffer - 1);
  ::close(fd);
  if (size <= 0) return 0;
  buffer[size] = '\0';
  const char* end = std::strrchr(buffer, ')');  // the name may hold spaces and parentheses
  return end && end[1] == ' ' ? end[2] : 0;
}

}  // namespace

int usable_cpus() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
}

std::vector<int> running_peers() {
  std::vector<int> found;
  const int self = static_cast<int>(::syscall(SYS_gettid));
  DIR* dir = ::opendir("/proc/self/task");
  if (dir == nullptr) return found;
  while (const dirent* entry = ::readdir(dir)) {
    const int tid = std::atoi(entry->d_name);
    if (tid > 0 && tid != self && thread_state(tid) == 'R') found.push_back(tid);
  }
  ::closedir(dir);
  return found;
}

bool any_running(const std::vector<int>& peers) {
  for (const int tid : peers)
    if (thread_state(tid) == 'R') return true;
  return false;
}

}  // namespace trim::cpu

#else

namespace trim::cpu {

int usable_cpus() { return std::max(1, static_cast<int>(std::thread::hardware_concurrency())); }
std::vector<int> running_peers() { return {}; }
bool any_running(const std::vector<int>&) { return false; }

}  // namespace trim::cpu

#endif
