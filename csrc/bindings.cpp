// bindings.cpp — the private module trimcpp._core. The Python layer (trimcpp/selection.py) validates
// arguments and hands over C-contiguous float32 arrays; this file only moves pointers and the GIL.
// trim::InputError derives from std::invalid_argument, which pybind11 raises as ValueError;
// trim::DeviceError from std::runtime_error, raised as RuntimeError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "cpu/kernels.h"
#include "trim.h"

namespace py = pybind11;
using Floats = py::array_t<float, py::array::c_style | py::array::forcecast>;
using Indices = py::array_t<int64_t>;

namespace {

trim::Problem problem(const Floats& visual, const std::optional<Floats>& text) {
  trim::Problem p{visual.data(), visual.shape(0), visual.shape(1), nullptr, 0};
  if (text && text->shape(0) > 0) {
    p.t = text->data();
    p.m = text->shape(0);
  }
  return p;
}

Indices select_rows(const Floats& visual, const std::optional<Floats>& text, int64_t keep, trim::Method method,
                    double stage1_ratio, uint64_t seed, trim::Backend backend, trim::Alignment alignment,
                    trim::Stage1 stage1) {
  const trim::Problem p = problem(visual, text);
  std::vector<int64_t> picks(static_cast<size_t>(p.n));  // room for every row, whatever the method
  int64_t count = 0;
  {
    py::gil_scoped_release release;
    count = trim::select(p, method, keep, stage1_ratio, seed, backend, picks.data(), trim::Variant{alignment, stage1});
  }
  return Indices(count, picks.data());
}

py::array_t<float> alignment_scores(const Floats& visual, const Floats& text, trim::Backend backend,
                                    trim::Alignment alignment) {
  const trim::Problem p = problem(visual, text);
  py::array_t<float> out(p.n);
  float* dst = out.mutable_data();
  py::gil_scoped_release release;
  trim::alignment_scores(p, backend, dst, alignment);
  return out;
}

double normalized_sum_sqnorm(const Floats& rows) {
  const float* data = rows.data();
  const int64_t n = rows.shape(0), d = rows.shape(1);
  py::gil_scoped_release release;
  return trim::cpu::normalized_sum_sqnorm(data, n, d);
}

std::vector<int64_t> split_budget(const std::vector<int64_t>& sizes, const std::vector<double>& weights,
                                  int64_t total) {
  std::vector<int64_t> out(sizes.size());
  trim::split_budget(sizes.data(), weights.data(), static_cast<int64_t>(sizes.size()), total, out.data());
  return out;
}

std::vector<Indices> select_image(const std::vector<Floats>& chunks, const std::optional<Floats>& text,
                                  int64_t keep_count, double keep_share, trim::Method method, double stage1_ratio,
                                  uint64_t seed, trim::Alignment alignment, trim::Stage1 stage1) {
  std::vector<const float*> data;
  std::vector<int64_t> rows;
  for (const Floats& c : chunks) {
    data.push_back(c.data());
    rows.push_back(c.shape(0));
  }
  const int64_t d = chunks.empty() ? 0 : chunks[0].shape(1);
  const bool has_text = text && text->shape(0) > 0;
  std::vector<std::vector<int64_t>> kept;
  {
    py::gil_scoped_release release;
    kept = trim::select_image(data, rows, d, has_text ? text->data() : nullptr, has_text ? text->shape(0) : 0,
                              trim::Keep{keep_count, keep_share}, method, stage1_ratio, seed,
                              trim::Variant{alignment, stage1});
  }
  std::vector<Indices> out;
  for (const auto& k : kept) out.emplace_back(static_cast<py::ssize_t>(k.size()), k.data());
  return out;
}

}  // namespace

// A ggml abort callback (llama_set_abort_callback) that reads a one-byte flag its caller owns: a
// background prefill stops within one graph node when the flag is set, and ggml's compute threads
// never take Python's GIL to ask.
extern "C" bool trimcpp_abort_requested(void* flag) {
  return *static_cast<const volatile unsigned char*>(flag) != 0;
}

PYBIND11_MODULE(_core, m) {
  m.doc() = "trimcpp's selection core (private; use the functions of the trimcpp package)";
  py::enum_<trim::Method>(m, "Method")
      .value("trimtokenator", trim::Method::trimtokenator)
      .value("align", trim::Method::align)
      .value("divprune", trim::Method::divprune)
      .value("uniform", trim::Method::uniform)
      .value("random", trim::Method::random)
      .value("none", trim::Method::none)
      .value("cdpruner", trim::Method::cdpruner);
  py::enum_<trim::Backend>(m, "Backend")
      .value("cpu", trim::Backend::cpu)
      .value("cuda", trim::Backend::cuda)
      .value("metal", trim::Backend::metal);
  py::enum_<trim::Alignment>(m, "Alignment").value("l2", trim::Alignment::l2).value("cosine", trim::Alignment::cosine);
  py::enum_<trim::Stage1>(m, "Stage1").value("ratio", trim::Stage1::ratio).value("adaptive", trim::Stage1::adaptive);
  m.def("select", &select_rows, py::arg("visual"), py::arg("text"), py::arg("keep"), py::arg("method"),
        py::arg("stage1_ratio"), py::arg("seed"), py::arg("backend"), py::arg("alignment") = trim::Alignment::l2,
        py::arg("stage1") = trim::Stage1::ratio, "Selected row indices in pick order.");
  m.def("alignment_scores", &alignment_scores, py::arg("visual"), py::arg("text"), py::arg("backend"),
        py::arg("alignment") = trim::Alignment::l2, "Stage-1 scores a_i (text must have rows).");
  m.def("adaptive_stage1_count", &trim::adaptive_stage1_count, py::arg("n"), py::arg("k"),
        "K1 of the adaptive stage 1: clamp(round(sqrt(k n)), k, n).");
  m.def("normalized_sum_sqnorm", &normalized_sum_sqnorm, py::arg("rows"),
        "||sum of the L2-normalised rows||^2, in double.");
  m.def("split_budget", &split_budget, py::arg("sizes"), py::arg("weights"), py::arg("total"),
        "Largest-remainder budgets in [1, size] proportional to the weights.");
  m.def("diversity_weight", &trim::diversity_weight, py::arg("rows"), py::arg("sum_sqnorm"),
        "An image's weight in split_budget.");
  m.def("select_image", &select_image, py::arg("chunks"), py::arg("text"), py::arg("keep_count"),
        py::arg("keep_share"), py::arg("method"), py::arg("stage1_ratio"), py::arg("seed"),
        py::arg("alignment") = trim::Alignment::l2, py::arg("stage1") = trim::Stage1::ratio,
        "One image's kept rows per chunk, as the patched llama.cpp tools select them (CPU).");
  m.def(
      "abort_callback", [] { return reinterpret_cast<std::uintptr_t>(&trimcpp_abort_requested); },
      "The address of a ggml abort callback whose data is a one-byte flag (nonzero: abort).");
  m.def("cpu_available", &trim::cpu::available, "Whether the CPU backend runs here.");
  m.def("cuda_available", &trim::cuda::available, "Whether this build has CUDA and a usable device.");
  m.def("cuda_device", &trim::cuda::device_name, "The CUDA device's name, or why there is none.");
  m.def("metal_available", &trim::metal::available, "Whether this build has Metal and a usable device.");
  m.def("metal_device", &trim::metal::device_name, "The Metal device's name, or why there is none.");
  m.def("cpu_isa", &trim::cpu::kernels_isa, "The instruction set the CPU kernels run with.");
}
