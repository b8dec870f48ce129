// cuda/no_cuda.cpp — the CUDA backend when the build has it switched off (TRIMCPP_CUDA=OFF).
#include "../trim.h"

namespace trim::cuda {

namespace {
[[noreturn]] void off() { throw DeviceError("this build of trimcpp has no CUDA backend (build with -DTRIMCPP_CUDA=ON)"); }
}  // namespace

bool available() { return false; }
std::string device_name() { return "not built (TRIMCPP_CUDA=OFF)"; }
void alignment_scores(const Problem&, float*) { off(); }
void select_scored(const Problem&, Method, int64_t, double, int64_t*) { off(); }

}  // namespace trim::cuda
