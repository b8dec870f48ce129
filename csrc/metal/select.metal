// metal/select.metal — the Metal kernels of gpu/plan.h; the arithmetic is gpu/arith.h's (shared with
// CUDA and with the emulator in tests/, which checks it against the reference on any machine).
// Compiled without fast math (CMakeLists.txt): IEEE rounding, so the Kahan sums stay compensated.
#include "gpu/arith.h"

// The scalars of every dispatch (setBytes at index 15).
struct Params {
  int n;
  int d;
  int has_center;
  int k1;
  int k_order;
  int running_max;
  int step;
  int reset;
};

static float simd_butterfly(float x) {
  for (ushort s = TRIM_SIMD / 2; s >= 1; s >>= 1) x += simd_shuffle_xor(x, s);
  return x;
}

// One SIMD group of 32 threads per row (the host dispatches n * 32 threads in groups of 256).
kernel void row_stats(device const float* v [[buffer(0)]], device const float* center [[buffer(1)]],
                      device float* inv [[buffer(2)]], device float* dist [[buffer(3)]], device int* bad [[buffer(4)]],
                      constant Params& p [[buffer(15)]], uint tid [[thread_position_in_grid]],
                      uint lane [[thread_index_in_simdgroup]]) {
  const int row = int(tid / TRIM_SIMD);
  if (row >= p.n) return;
  TrimStats s = trim_lane_stats(v + (trim_long)row * p.d, center, p.has_center, p.d, int(lane));
  s.sqnorm = simd_butterfly(s.sqnorm);
  s.sqdist = simd_butterfly(s.sqdist);
  if (lane == 0) {
    inv[row] = trim_inv_norm(s.sqnorm);
    dist[row] = s.sqdist;
    bad[row] = !(isfinite(s.sqnorm) && isfinite(s.sqdist));
  }
}

kernel void rank_rows(device const float* dist [[buffer(3)]], device int* alive [[buffer(5)]],
                      device long* picks [[buffer(7)]], constant Params& p [[buffer(15)]],
                      uint tid [[thread_position_in_grid]]) {
  const int i = int(tid);
  if (i >= p.n) return;
  const float own = dist[i];
  int r = 0;
  for (int j = 0; j < p.n; ++j) r += trim_ranks_before(dist[j], j, own, i);
  alive[i] = r < p.k1;
  if (r < p.k_order) picks[r] = i;
}

kernel void keep_all(device int* alive [[buffer(5)]], constant Params& p [[buffer(15)]],
                     uint tid [[thread_position_in_grid]]) {
  if (int(tid) < p.n) alive[tid] = 1;
}

kernel void clear_values(device float* value [[buffer(6)]], constant Params& p [[buffer(15)]],
                         uint tid [[thread_position_in_grid]]) {
  if (int(tid) < p.n) value[tid] = -INFINITY;
}

// Grid d x TRIM_SUM_CHUNKS: each thread sums one chunk of one column.
kernel void column_chunks(device const float* v [[buffer(0)]], device const float* inv [[buffer(2)]],
                          device const int* alive [[buffer(5)]], device TrimKahan* parts [[buffer(10)]],
                          constant Params& p [[buffer(15)]], uint2 gid [[thread_position_in_grid]]) {
  const int col = int(gid.x), c = int(gid.y);
  if (col >= p.d) return;
  parts[(trim_long)c * p.d + col] =
      trim_column_chunk(v, inv, alive, trim_chunk_start(p.n, c), trim_chunk_start(p.n, c + 1), p.d, col);
}

kernel void column_finish(device const TrimKahan* parts [[buffer(10)]], device TrimKahan* w [[buffer(8)]],
                          device float* w32 [[buffer(9)]], constant Params& p [[buffer(15)]],
                          uint tid [[thread_position_in_grid]]) {
  const int col = int(tid);
  if (col >= p.d) return;
  TrimKahan total = trim_kahan_zero();
  for (int c = 0; c < TRIM_SUM_CHUNKS; ++c) total = trim_kahan_merge(total, parts[(trim_long)c * p.d + col]);
  w[col] = total;
  w32[col] = total.sum;
}

// divprune's nearest neighbours, as in cuda/select.cu: a group of TRIM_TILE x TRIM_TILE threads owns
// TRIM_TILE rows i and walks all tiles of rows j.
kernel void nearest(device const float* v [[buffer(0)]], device const float* inv [[buffer(2)]],
                    device float* value [[buffer(6)]], constant Params& p [[buffer(15)]],
                    uint2 group [[threadgroup_position_in_grid]], uint2 local [[thread_position_in_threadgroup]]) {
  threadgroup float a[TRIM_TILE][TRIM_TILE + 1];
  threadgroup float b[TRIM_TILE][TRIM_TILE + 1];
  threadgroup float best_of[TRIM_TILE][TRIM_TILE + 1];
  const int tx = int(local.x), ty = int(local.y);
  const int i = int(group.x) * TRIM_TILE + ty;
  float best = -INFINITY;
  for (int j0 = 0; j0 < p.n; j0 += TRIM_TILE) {
    float dot = 0.0f;
    for (int e0 = 0; e0 < p.d; e0 += TRIM_TILE) {
      const int e = e0 + tx;
      a[ty][tx] = (i < p.n && e < p.d) ? v[(trim_long)i * p.d + e] : 0.0f;
      b[ty][tx] = (j0 + ty < p.n && e < p.d) ? v[(trim_long)(j0 + ty) * p.d + e] : 0.0f;
      threadgroup_barrier(mem_flags::mem_threadgroup);
      const int len = min(TRIM_TILE, p.d - e0);
      for (int kk = 0; kk < len; ++kk) dot = TRIM_FMA(a[ty][kk], b[tx][kk], dot);
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    const int j = j0 + tx;
    if (i < p.n && j < p.n && j != i) best = trim_larger(best, trim_cosine(dot, inv[i], inv[j]));
  }
  best_of[ty][tx] = best;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (tx == 0 && i < p.n) {
    float row_best = -INFINITY;
    for (int x = 0; x < TRIM_TILE; ++x) row_best = trim_larger(row_best, best_of[ty][x]);
    value[i] = row_best;
  }
}

kernel void scores(device const float* v [[buffer(0)]], device const float* inv [[buffer(2)]],
                   device const int* alive [[buffer(5)]], device float* value [[buffer(6)]],
                   device const float* w32 [[buffer(9)]], constant Params& p [[buffer(15)]],
                   uint tid [[thread_position_in_grid]], uint lane [[thread_index_in_simdgroup]]) {
  const int row = int(tid / TRIM_SIMD);
  if (row >= p.n || !alive[row]) return;  // uniform per SIMD group
  const float dot = simd_butterfly(trim_lane_dot(v + (trim_long)row * p.d, w32, p.d, int(lane)));
  if (lane == 0) value[row] = trim_step_value(dot, inv[row], value[row], p.running_max);
}

// One threadgroup (a power of two of threads): the argmin over the alive rows, then the next direction.
kernel void pick(device const float* v [[buffer(0)]], device const float* inv [[buffer(2)]],
                 device int* alive [[buffer(5)]], device const float* value [[buffer(6)]],
                 device long* picks [[buffer(7)]], device TrimKahan* w [[buffer(8)]], device float* w32 [[buffer(9)]],
                 constant Params& p [[buffer(15)]], uint t [[thread_index_in_threadgroup]],
                 uint count [[threads_per_threadgroup]]) {
  threadgroup TrimPick best[TRIM_PICK_THREADS];
  TrimPick mine = trim_no_pick();
  for (int i = int(t); i < p.n; i += int(count)) {
    if (!alive[i]) continue;
    TrimPick candidate;
    candidate.value = value[i];
    candidate.index = i;
    mine = trim_better(mine, candidate);
  }
  best[t] = mine;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint s = count / 2; s > 0; s >>= 1) {
    if (t < s) best[t] = trim_better(best[t], best[t + s]);
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  const TrimPick chosen = best[0];
  if (chosen.index == TRIM_NO_INDEX) return;  // only NaN left: the host reports the bad rows
  if (t == 0) {
    picks[p.step] = chosen.index;
    alive[chosen.index] = 0;
  }
  device const float* row = v + (trim_long)chosen.index * p.d;
  const float scale = inv[chosen.index];
  for (int e = int(t); e < p.d; e += int(count)) {
    w[e] = trim_direction(w[e], row[e] * scale, p.reset);
    w32[e] = w[e].sum;
  }
}
