// metal/no_metal.cpp — the Metal backend when the build does not have it (TRIMCPP_METAL=OFF, not
// an Apple system, or a failed probe: see metal.cmake, which writes the reason into trimcpp_metal_off.h).
#include "../trim.h"

#if __has_include("trimcpp_metal_off.h")
#include "trimcpp_metal_off.h"
#else
#define TRIMCPP_METAL_OFF_REASON "TRIMCPP_METAL=OFF"
#endif

namespace trim::metal {

namespace {
[[noreturn]] void off() {
  throw DeviceError("this build of trimcpp has no Metal backend (" TRIMCPP_METAL_OFF_REASON
                    "); it is built on macOS with Xcode's Metal compiler");
}
}  // namespace

bool available() { return false; }
std::string device_name() { return "not built (" TRIMCPP_METAL_OFF_REASON ")"; }
void alignment_scores(const Problem&, float*) { off(); }
void select_scored(const Problem&, Method, int64_t, double, int64_t*) { off(); }

}  // namespace trim::metal
