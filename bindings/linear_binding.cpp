// infercept._core.pack_linear_weight / cpu_linear: declare the packed CPU linear kernel's tensor
// adapters (cpu_linear.h), which check every tensor and throw InvalidArgumentError (a
// ValueError) naming it. Tensors arrive through DLPack (dlpack_view.h): torch is not linked.
#include <memory>

#include "bindings.h"
#include "dlpack_view.h"
#include "infercept/cpu_linear.h"

namespace py = pybind11;

namespace {

void pack_linear_weight(py::handle packed, py::handle weight) {
  const DLPackView packed_view(packed, "packed"), weight_view(weight, "weight");
  py::gil_scoped_release release;
  infercept::pack_linear_weight(packed_view.view(), weight_view.view());
}

void cpu_linear(py::handle out, py::handle x, py::handle packed_weight, py::handle bias) {
  const DLPackView out_view(out, "out"), x_view(x, "x"),
      packed_view(packed_weight, "packed_weight");
  std::unique_ptr<DLPackView> bias_view;
  if (!bias.is_none()) bias_view = std::make_unique<DLPackView>(bias, "bias");
  // The kernel touches no Python object: other Python threads (tool runtime, server) may run.
  py::gil_scoped_release release;
  infercept::cpu_linear(out_view.view(), x_view.view(), packed_view.view(),
                        bias_view ? &bias_view->view() : nullptr);
}

}  // namespace

void bind_cpu_linear(py::module_& m) {
  m.def("linear_packed_shape", [](int64_t out_features, int64_t in_features) {
    return py::make_tuple(infercept::linear_num_panels(out_features), in_features,
                          infercept::kLinearPanelWidth);
  }, py::arg("out_features"), py::arg("in_features"),
        "The shape pack_linear_weight writes for a [out_features, in_features] weight: "
        "(ceil(out_features / 16), in_features, 16).");
  m.def("pack_linear_weight", &pack_linear_weight, py::arg("packed"), py::arg("weight"),
        "Writes the packed layout of a float32 weight [out_features, in_features] (CPU, rows "
        "contiguous) into `packed` [ceil(out_features / 16), in_features, 16] float32: "
        "packed[p][k][j] = weight[16 p + j][k], zero past out_features. Releases the GIL. "
        "Raises InvalidArgumentError (a ValueError) naming the tensor on a wrong dtype, "
        "device, shape or layout.");
  m.def("cpu_linear", &cpu_linear, py::arg("out"), py::arg("x"), py::arg("packed_weight"),
        py::arg("bias") = py::none(),
        "out = x W^T + bias over a weight packed by pack_linear_weight, float32 on the CPU.\n\n"
        "Tensors (torch, numpy, any DLPack producer, or DLPack capsules): x [num_rows, "
        "in_features] with contiguous rows (any row stride), packed_weight [num_panels, "
        "in_features, 16], bias [out_features] or None, out [num_rows, out_features] "
        "contiguous (written; out_features is read off it). Multi-threaded with OpenMP; "
        "releases the GIL. Raises InvalidArgumentError (a ValueError) naming the tensor on a "
        "wrong dtype, device, shape or layout.");
  m.def("cpu_linear_has_avx512", []() {
    return infercept::cpu_linear_has(infercept::CpuLinearImpl::kAvx512);
  }, "Whether cpu_linear runs its AVX-512 body on this CPU.");
}
