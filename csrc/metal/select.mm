// metal/select.mm — the Metal backend: the kernels of select.metal (compiled by CMake into
// trimcpp.metallib, installed next to _core) queued by gpu/plan.h on one command buffer per call.
// Buffers use shared storage (Apple GPUs share memory with the CPU): the rows are wrapped without a
// copy when their address is page-aligned, copied once otherwise; results are read in place.
#import <Foundation/Foundation.h>
#import <Metal/Metal.h>
#include <dlfcn.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <string>

#include "../gpu/arith.h"
#include "../gpu/plan.h"
#include "../trim.h"

namespace trim::metal {

namespace {

// Mirrors `Params` in select.metal.
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

constexpr NSUInteger kGroup = 256;  // threads per threadgroup of the row and element kernels
constexpr NSUInteger kParams = 15;  // buffer index of Params

// The device, queue and pipelines, made once; `error` says why not when device is nil.
struct Context {
  id<MTLDevice> device = nil;
  id<MTLCommandQueue> queue = nil;
  NSDictionary<NSString*, id<MTLComputePipelineState>>* pipelines = nil;
  std::string error;
};

// trimcpp.metallib sits next to the _core module that holds this code.
std::string library_path() {
  Dl_info info;
  if (dladdr(reinterpret_cast<const void*>(&library_path), &info) == 0 || info.dli_fname == nullptr) return "";
  std::string path = info.dli_fname;
  return path.substr(0, path.find_last_of('/') + 1) + "trimcpp.metallib";
}

Context make_context() {
  Context c;
  @autoreleasepool {
    id<MTLDevice> device = MTLCreateSystemDefaultDevice();
    if (device == nil) {
      c.error = "no Metal device";
      return c;
    }
    NSError* error = nil;
    const std::string path = library_path();
    NSURL* url = [NSURL fileURLWithPath:[NSString stringWithUTF8String:path.c_str()]];
    id<MTLLibrary> library = [device newLibraryWithURL:url error:&error];
    if (library == nil) {
      c.error = "cannot load " + path + ": " + (error ? error.localizedDescription.UTF8String : "unknown error");
      return c;
    }
    NSMutableDictionary* pipelines = [NSMutableDictionary dictionary];
    for (NSString* name in @[ @"row_stats", @"rank_rows", @"keep_all", @"clear_values", @"column_chunks",
                              @"column_finish", @"nearest", @"scores", @"pick" ]) {
      id<MTLFunction> function = [library newFunctionWithName:name];
      id<MTLComputePipelineState> state =
          function ? [device newComputePipelineStateWithFunction:function error:&error] : nil;
      if (state == nil) {
        c.error = std::string("cannot build kernel ") + name.UTF8String;
        return c;
      }
      pipelines[name] = state;
    }
    c.device = device;
    c.queue = [device newCommandQueue];
    c.pipelines = pipelines;
  }
  return c;
}

const Context& context() {
  static const Context c = make_context();
  return c;
}

// The plan's Device on Metal: every step is a dispatch on one compute encoder (serial dispatch:
// each sees the writes of the one before); finish() commits and waits.
class Device {
 public:
  explicit Device(const Context& c) : c_(c) {}

  void upload(const Problem& p, const float* center) {
    n_ = static_cast<int>(p.n);
    d_ = static_cast<int>(p.d);
    v_ = rows(p.v, sizeof(float) * p.n * p.d);
    center_ = center ? [c_.device newBufferWithBytes:center length:sizeof(float) * p.d
                                             options:MTLResourceStorageModeShared]
                     : v_;
    inv_ = buffer(sizeof(float) * p.n);
    dist_ = buffer(sizeof(float) * p.n);
    bad_ = buffer(sizeof(int) * p.n);
    alive_ = buffer(sizeof(int) * p.n);
    value_ = buffer(sizeof(float) * p.n);
    picks_ = buffer(sizeof(int64_t) * p.n);
    w_ = buffer(sizeof(TrimKahan) * p.d);
    w32_ = buffer(sizeof(float) * p.d);
    parts_ = buffer(sizeof(TrimKahan) * TRIM_SUM_CHUNKS * p.d);
    commands_ = [c_.queue commandBuffer];
    encoder_ = [commands_ computeCommandEncoder];
    // Bound once, at the [[buffer(i)]] indices of select.metal.
    const id<MTLBuffer> slots[] = {v_, center_, inv_, dist_, bad_, alive_, value_, picks_, w_, w32_, parts_};
    for (NSUInteger i = 0; i < sizeof slots / sizeof slots[0]; ++i) [encoder_ setBuffer:slots[i] offset:0 atIndex:i];
    params_ = Params{n_, d_, 0, 0, 0, 0, 0, 0};
  }

  void row_stats(bool has_center) {
    params_.has_center = has_center;
    dispatch(@"row_stats", MTLSizeMake(static_cast<NSUInteger>(n_) * TRIM_SIMD, 1, 1), MTLSizeMake(kGroup, 1, 1));
  }

  void rank(int64_t k1, int64_t k_order) {
    params_.k1 = static_cast<int>(k1);
    params_.k_order = static_cast<int>(k_order);
    dispatch(@"rank_rows", MTLSizeMake(n_, 1, 1), MTLSizeMake(kGroup, 1, 1));
  }

  void keep_all() { dispatch(@"keep_all", MTLSizeMake(n_, 1, 1), MTLSizeMake(kGroup, 1, 1)); }

  void start_sum() {
    dispatch(@"column_chunks", MTLSizeMake(d_, TRIM_SUM_CHUNKS, 1), MTLSizeMake(kGroup, 1, 1));
    dispatch(@"column_finish", MTLSizeMake(d_, 1, 1), MTLSizeMake(kGroup, 1, 1));
  }

  void nearest() {
    set(@"nearest");
    [encoder_ dispatchThreadgroups:MTLSizeMake((n_ + TRIM_TILE - 1) / TRIM_TILE, 1, 1)
             threadsPerThreadgroup:MTLSizeMake(TRIM_TILE, TRIM_TILE, 1)];
  }

  void clear_values() { dispatch(@"clear_values", MTLSizeMake(n_, 1, 1), MTLSizeMake(kGroup, 1, 1)); }

  void scores(bool running_max) {
    params_.running_max = running_max;
    dispatch(@"scores", MTLSizeMake(static_cast<NSUInteger>(n_) * TRIM_SIMD, 1, 1), MTLSizeMake(kGroup, 1, 1));
  }

  void pick(int64_t step, bool reset) {
    params_.step = static_cast<int>(step);
    params_.reset = reset;
    id<MTLComputePipelineState> state = set(@"pick");
    NSUInteger threads = TRIM_PICK_THREADS;  // the largest power of two the pipeline allows
    while (threads > state.maxTotalThreadsPerThreadgroup) threads /= 2;
    [encoder_ dispatchThreadgroups:MTLSizeMake(1, 1, 1) threadsPerThreadgroup:MTLSizeMake(threads, 1, 1)];
  }

  bool finish(int64_t* picks, int64_t count, int* alive) {
    wait();
    std::memcpy(picks, picks_.contents, sizeof(int64_t) * count);
    if (alive) std::memcpy(alive, alive_.contents, sizeof(int) * n_);
    return any_bad();
  }

  bool finish_dist(float* dist) {
    wait();
    std::memcpy(dist, dist_.contents, sizeof(float) * n_);
    return any_bad();
  }

 private:
  id<MTLBuffer> buffer(size_t bytes) {
    return [c_.device newBufferWithLength:std::max<size_t>(bytes, 4) options:MTLResourceStorageModeShared];
  }

  // The caller's rows in place when page-aligned (the mapping ends on a page boundary, inside the
  // page that holds the last row), else one copy.
  id<MTLBuffer> rows(const float* data, size_t bytes) {
    const size_t page = static_cast<size_t>(getpagesize());
    if (reinterpret_cast<uintptr_t>(data) % page == 0) {
      id<MTLBuffer> wrapped = [c_.device newBufferWithBytesNoCopy:const_cast<float*>(data)
                                                           length:(bytes + page - 1) / page * page
                                                          options:MTLResourceStorageModeShared
                                                      deallocator:nil];
      if (wrapped) return wrapped;
    }
    return [c_.device newBufferWithBytes:data length:bytes options:MTLResourceStorageModeShared];
  }

  id<MTLComputePipelineState> set(NSString* name) {
    id<MTLComputePipelineState> state = c_.pipelines[name];
    [encoder_ setComputePipelineState:state];
    [encoder_ setBytes:&params_ length:sizeof params_ atIndex:kParams];
    return state;
  }

  void dispatch(NSString* name, MTLSize threads, MTLSize group) {
    set(name);
    [encoder_ dispatchThreads:threads threadsPerThreadgroup:group];
  }

  void wait() {
    [encoder_ endEncoding];
    [commands_ commit];
    [commands_ waitUntilCompleted];
    if (commands_.status != MTLCommandBufferStatusCompleted) {
      NSError* error = commands_.error;
      throw DeviceError(std::string("Metal command buffer failed: ") +
                        (error ? error.localizedDescription.UTF8String : "unknown error"));
    }
  }

  bool any_bad() const {
    const int* bad = static_cast<const int*>(bad_.contents);
    for (int i = 0; i < n_; ++i)
      if (bad[i]) return true;
    return false;
  }

  const Context& c_;
  int n_ = 0, d_ = 0;
  Params params_{};
  id<MTLBuffer> v_ = nil, center_ = nil, inv_ = nil, dist_ = nil, bad_ = nil, alive_ = nil, value_ = nil,
                picks_ = nil, w_ = nil, w32_ = nil, parts_ = nil;
  id<MTLCommandBuffer> commands_ = nil;
  id<MTLComputeCommandEncoder> encoder_ = nil;
};

const Context& usable_context(const Problem& p) {
  const Context& c = context();
  if (c.device == nil) throw DeviceError("no usable Metal device here (" + c.error + ")");
  if (p.n > TRIM_NO_INDEX - 1 || p.d > TRIM_NO_INDEX - 1)
    throw DeviceError("the Metal backend takes fewer than 2^31 rows and columns");
  return c;
}

}  // namespace

bool available() { return context().device != nil; }

std::string device_name() {
  const Context& c = context();
  return c.device != nil ? std::string(c.device.name.UTF8String) : c.error;
}

void alignment_scores(const Problem& p, float* out) {
  const Context& c = usable_context(p);
  @autoreleasepool {
    Device dev(c);
    gpu::alignment_scores(dev, p, out);
  }
}

void select_scored(const Problem& p, Method method, int64_t k, double stage1_ratio, int64_t* out) {
  const Context& c = usable_context(p);
  @autoreleasepool {
    Device dev(c);
    gpu::select_scored(dev, p, method, k, stage1_ratio, out);
  }
}

}  // namespace trim::metal
