// metal/no_metal.cpp — the Metal backend when the build has it switched off (TRIMCPP_METAL=OFF).
#include "../trim.h"

namespace trim::metal {

namespace {
[[noreturn]] void off() { throw DeviceError("this build of trimcpp has no Metal backend (it is built on macOS with -DTRIMCPP_METAL=ON)"); }
}  // namespace

bool available() { return false; }
std::string device_name() { return "not built (TRIMCPP_METAL=OFF)"; }
void alignment_scores(const Problem&, float*) { off(); }
void select_scored(const Problem&, Method, int64_t, double, int64_t*) { off(); }

}  // namespace trim::metal
