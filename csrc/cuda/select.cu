// cuda/select.cu — the CUDA backend: the kernels of gpu/plan.h on one stream of device 0. The
// arithmetic is gpu/arith.h's (shared with Metal and the emulator in tests/); this file adds threads,
// warps, shared memory and the buffers. The rows are uploaded on every call (libmtmd hands them over
// in host memory), and nothing comes back before finish().
#include <cuda_runtime.h>

#include <mutex>
#include <string>
#include <vector>

#include "../gpu/arith.h"
#include "../gpu/plan.h"
#include "../trim.h"

namespace trim::cuda {

namespace {

constexpr int kRowsPerBlock = 8;  // warps (one row each) per block of the row kernels
constexpr int kThreads = 256;     // threads per block of the element-wise kernels

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw DeviceError(std::string("CUDA ") + what + ": " + cudaGetErrorString(status));
}

int blocks(int64_t count, int per_block) { return static_cast<int>((count + per_block - 1) / per_block); }

__device__ float warp_sum(float x) {
  for (int s = TRIM_SIMD / 2; s >= 1; s >>= 1) x += __shfl_xor_sync(0xffffffffu, x, s);
  return x;
}

__global__ void row_stats_kernel(const float* v, const float* center, int has_center, int n, int d, float* inv,
                                 float* dist, int* bad) {
  const int row = blockIdx.x * kRowsPerBlock + threadIdx.x / TRIM_SIMD;
  const int lane = threadIdx.x % TRIM_SIMD;
  if (row >= n) return;  // the whole warp leaves together
  TrimStats s = trim_lane_stats(v + (trim_long)row * d, center, has_center, d, lane);
  s.sqnorm = warp_sum(s.sqnorm);
  s.sqdist = warp_sum(s.sqdist);
  if (lane == 0) {
    inv[row] = trim_inv_norm(s.sqnorm);
    dist[row] = s.sqdist;
    bad[row] = !(isfinite(s.sqnorm) && isfinite(s.sqdist));
  }
}

__global__ void rank_kernel(const float* dist, int n, int k1, int k_order, int* alive, long long* picks) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float own = dist[i];
  int r = 0;
  for (int j = 0; j < n; ++j) r += trim_ranks_before(dist[j], j, own, i);
  alive[i] = r < k1;
  if (r < k_order) picks[r] = i;
}

template <class T>
__global__ void fill_kernel(T* x, int n, T value) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) x[i] = value;
}

__global__ void column_chunks_kernel(const float* v, const float* inv, const int* alive, int n, int d,
                                     TrimKahan* parts) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  const int c = blockIdx.y;
  if (col >= d) return;
  parts[(trim_long)c * d + col] =
      trim_column_chunk(v, inv, alive, trim_chunk_start(n, c), trim_chunk_start(n, c + 1), d, col);
}

__global__ void column_finish_kernel(const TrimKahan* parts, int d, TrimKahan* w, float* w32) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= d) return;
  TrimKahan total = trim_kahan_zero();
  for (int c = 0; c < TRIM_SUM_CHUNKS; ++c) total = trim_kahan_merge(total, parts[(trim_long)c * d + col]);
  w[col] = total;
  w32[col] = total.sum;
}

// divprune's nearest neighbours: block (tx, ty) of TRIM_TILE^2 threads owns rows i = blockIdx.x * TILE + ty
// and walks every tile of rows j; each thread keeps the largest cosine of the j = tx (mod TILE) it saw.
__global__ void nearest_kernel(const float* v, const float* inv, int n, int d, float* value) {
  __shared__ float a[TRIM_TILE][TRIM_TILE + 1], b[TRIM_TILE][TRIM_TILE + 1], best_of[TRIM_TILE][TRIM_TILE + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int i = blockIdx.x * TRIM_TILE + ty;
  float best = -INFINITY;
  for (int j0 = 0; j0 < n; j0 += TRIM_TILE) {
    float dot = 0.0f;
    for (int e0 = 0; e0 < d; e0 += TRIM_TILE) {
      const int e = e0 + tx;
      a[ty][tx] = (i < n && e < d) ? v[(trim_long)i * d + e] : 0.0f;
      b[ty][tx] = (j0 + ty < n && e < d) ? v[(trim_long)(j0 + ty) * d + e] : 0.0f;
      __syncthreads();
      const int len = min(TRIM_TILE, d - e0);
      for (int kk = 0; kk < len; ++kk) dot = TRIM_FMA(a[ty][kk], b[tx][kk], dot);
      __syncthreads();
    }
    const int j = j0 + tx;
    if (i < n && j < n && j != i) best = trim_larger(best, trim_cosine(dot, inv[i], inv[j]));
  }
  best_of[ty][tx] = best;
  __syncthreads();
  if (tx == 0 && i < n) {
    float row_best = -INFINITY;
    for (int x = 0; x < TRIM_TILE; ++x) row_best = trim_larger(row_best, best_of[ty][x]);
    value[i] = row_best;
  }
}

__global__ void scores_kernel(const float* v, const float* inv, const int* alive, const float* w, int n, int d,
                              int running_max, float* value) {
  const int row = blockIdx.x * kRowsPerBlock + threadIdx.x / TRIM_SIMD;
  const int lane = threadIdx.x % TRIM_SIMD;
  if (row >= n || !alive[row]) return;  // uniform per warp
  const float dot = warp_sum(trim_lane_dot(v + (trim_long)row * d, w, d, lane));
  if (lane == 0) value[row] = trim_step_value(dot, inv[row], value[row], running_max);
}

// One block: the argmin over the alive rows (tree in shared memory), then the next direction.
__global__ void pick_kernel(const float* v, const float* inv, int* alive, const float* value, int n, int d, int step,
                            int reset, long long* picks, TrimKahan* w, float* w32) {
  __shared__ TrimPick best[TRIM_PICK_THREADS];
  const int t = threadIdx.x;
  TrimPick mine = trim_no_pick();
  for (int i = t; i < n; i += blockDim.x) {
    if (!alive[i]) continue;
    TrimPick candidate;
    candidate.value = value[i];
    candidate.index = i;
    mine = trim_better(mine, candidate);
  }
  best[t] = mine;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (t < s) best[t] = trim_better(best[t], best[t + s]);
    __syncthreads();
  }
  const TrimPick p = best[0];
  if (p.index == TRIM_NO_INDEX) return;  // only NaN left: finish() reports the bad rows
  if (t == 0) {
    picks[step] = p.index;
    alive[p.index] = 0;
  }
  const float* row = v + (trim_long)p.index * d;
  const float scale = inv[p.index];
  for (int e = t; e < d; e += blockDim.x) {
    w[e] = trim_direction(w[e], row[e] * scale, reset);
    w32[e] = w[e].sum;
  }
}

// A device buffer that only grows (kept between calls: cudaMalloc costs more than a small selection).
template <class T>
class Buffer {
 public:
  T* get(int64_t count) {
    if (count > size_) {
      if (data_) cudaFree(data_);
      data_ = nullptr;
      size_ = 0;
      check(cudaMalloc(&data_, sizeof(T) * static_cast<size_t>(std::max<int64_t>(count, 1))), "cudaMalloc");
      size_ = count;
    }
    return data_;
  }

 private:
  T* data_ = nullptr;
  int64_t size_ = 0;
};

// The plan's Device on CUDA. One at a time (the buffers are shared): callers hold `mutex`.
class Device {
 public:
  void upload(const Problem& p, const float* center) {
    n_ = static_cast<int>(p.n);
    d_ = static_cast<int>(p.d);
    if (!stream_) check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "stream");
    v_ = v_buf_.get(p.n * p.d);
    center_ = center_buf_.get(p.d);
    inv_ = inv_buf_.get(p.n);
    dist_ = dist_buf_.get(p.n);
    bad_ = bad_buf_.get(p.n);
    alive_ = alive_buf_.get(p.n);
    value_ = value_buf_.get(p.n);
    picks_ = picks_buf_.get(p.n);
    w_ = w_buf_.get(p.d);
    w32_ = w32_buf_.get(p.d);
    parts_ = parts_buf_.get(TRIM_SUM_CHUNKS * p.d);
    check(cudaMemcpyAsync(v_, p.v, sizeof(float) * p.n * p.d, cudaMemcpyHostToDevice, stream_), "upload");
    if (center)
      check(cudaMemcpyAsync(center_, center, sizeof(float) * p.d, cudaMemcpyHostToDevice, stream_), "upload");
  }

  void row_stats(bool has_center) {
    row_stats_kernel<<<blocks(n_, kRowsPerBlock), kRowsPerBlock * TRIM_SIMD, 0, stream_>>>(
        v_, center_, has_center, n_, d_, inv_, dist_, bad_);
    launched();
  }

  void rank(int64_t k1, int64_t k_order) {
    rank_kernel<<<blocks(n_, kThreads), kThreads, 0, stream_>>>(dist_, n_, static_cast<int>(k1),
                                                                static_cast<int>(k_order), alive_, picks_);
    launched();
  }

  void keep_all() {
    fill_kernel<int><<<blocks(n_, kThreads), kThreads, 0, stream_>>>(alive_, n_, 1);
    launched();
  }

  void start_sum() {
    column_chunks_kernel<<<dim3(blocks(d_, kThreads), TRIM_SUM_CHUNKS), kThreads, 0, stream_>>>(v_, inv_, alive_, n_,
                                                                                               d_, parts_);
    column_finish_kernel<<<blocks(d_, kThreads), kThreads, 0, stream_>>>(parts_, d_, w_, w32_);
    launched();
  }

  void nearest() {
    nearest_kernel<<<blocks(n_, TRIM_TILE), dim3(TRIM_TILE, TRIM_TILE), 0, stream_>>>(v_, inv_, n_, d_, value_);
    launched();
  }

  void clear_values() {
    fill_kernel<float><<<blocks(n_, kThreads), kThreads, 0, stream_>>>(value_, n_, -INFINITY);
    launched();
  }

  void scores(bool running_max) {
    scores_kernel<<<blocks(n_, kRowsPerBlock), kRowsPerBlock * TRIM_SIMD, 0, stream_>>>(v_, inv_, alive_, w32_, n_,
                                                                                       d_, running_max, value_);
    launched();
  }

  void pick(int64_t step, bool reset) {
    pick_kernel<<<1, TRIM_PICK_THREADS, 0, stream_>>>(v_, inv_, alive_, value_, n_, d_, static_cast<int>(step), reset,
                                                      picks_, w_, w32_);
    launched();
  }

  bool finish(int64_t* picks, int64_t count, int* alive) {
    static_assert(sizeof(long long) == sizeof(int64_t), "picks are copied as int64");
    if (count > 0) download(picks, picks_, count);
    if (alive) download(alive, alive_, n_);
    return finish_bad();
  }

  bool finish_dist(float* dist) {
    download(dist, dist_, n_);
    return finish_bad();
  }

 private:
  void launched() { check(cudaGetLastError(), "kernel launch"); }

  template <class T, class U>
  void download(T* host, const U* device, int64_t count) {
    check(cudaMemcpyAsync(host, device, sizeof(U) * count, cudaMemcpyDeviceToHost, stream_), "download");
  }

  bool finish_bad() {
    std::vector<int> bad(static_cast<size_t>(n_));
    download(bad.data(), bad_, n_);
    check(cudaStreamSynchronize(stream_), "selection");
    for (int b : bad)
      if (b) return true;
    return false;
  }

  int n_ = 0, d_ = 0;
  cudaStream_t stream_ = nullptr;
  float *v_ = nullptr, *center_ = nullptr, *inv_ = nullptr, *dist_ = nullptr, *value_ = nullptr, *w32_ = nullptr;
  int *bad_ = nullptr, *alive_ = nullptr;
  long long* picks_ = nullptr;
  TrimKahan *w_ = nullptr, *parts_ = nullptr;
  Buffer<float> v_buf_, center_buf_, inv_buf_, dist_buf_, value_buf_, w32_buf_;
  Buffer<int> bad_buf_, alive_buf_;
  Buffer<long long> picks_buf_;
  Buffer<TrimKahan> w_buf_, parts_buf_;
};

std::mutex mutex;

Device& device() {
  static Device* one = new Device();  // never destroyed: the driver may be gone at exit
  return *one;
}

void check_size(const Problem& p) {
  if (p.n > TRIM_NO_INDEX - 1 || p.d > TRIM_NO_INDEX - 1)
    throw DeviceError("the CUDA backend takes fewer than 2^31 rows and columns");
  if (!available()) throw DeviceError("no CUDA device is usable here (" + device_name() + ")");
}

}  // namespace

bool available() {
  static const bool usable = [] {
    int count = 0;
    const bool ok = cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
    cudaGetLastError();  // clear the error of a machine without a driver
    return ok;
  }();
  return usable;
}

std::string device_name() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  cudaGetLastError();
  if (status != cudaSuccess) return cudaGetErrorString(status);
  if (count == 0) return "no CUDA device";
  cudaDeviceProp prop;
  if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) return "device 0 unreadable";
  return prop.name;
}

void alignment_scores(const Problem& p, float* out) {
  check_size(p);
  std::lock_guard<std::mutex> lock(mutex);
  gpu::alignment_scores(device(), p, out);
}

void select_scored(const Problem& p, Method method, int64_t k, double stage1_ratio, int64_t* out) {
  check_size(p);
  std::lock_guard<std::mutex> lock(mutex);
  gpu::select_scored(device(), p, method, k, stage1_ratio, out);
}

}  // namespace trim::cuda
