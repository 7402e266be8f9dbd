// infercept._core.rms_norm / add_rms_norm / silu_mul / rotary_write_kv: declares the adapters of
// cpu_layer_ops.h, which check every tensor and throw InvalidArgumentError (a ValueError)
// naming it. Tensors arrive through DLPack (dlpack_view.h): torch is not linked.
#include "bindings.h"
#include "dlpack_view.h"
#include "infercept/cpu_layer_ops.h"

namespace py = pybind11;

namespace {

// These run for microseconds, so unlike the attention kernel they keep the GIL: releasing and
// taking it back would cost about as much as the work.
void rms_norm(py::handle out, py::handle x, py::handle weight, double eps) {
  const DLPackView out_view(out, "out"), x_view(x, "x"), weight_view(weight, "weight");
  infercept::rms_norm(out_view.view(), x_view.view(), weight_view.view(), static_cast<float>(eps));
}

void add_rms_norm(py::handle x, py::handle residual, py::handle weight, double eps) {
  const DLPackView x_view(x, "x"), residual_view(residual, "residual"),
      weight_view(weight, "weight");
  infercept::add_rms_norm(x_view.view(), residual_view.view(), weight_view.view(),
                          static_cast<float>(eps));
}

void silu_mul(py::handle gate_up) {
  const DLPackView gate_up_view(gate_up, "gate_up");
  infercept::silu_mul(gate_up_view.view());
}

void rotary_write_kv(py::handle qkv, py::handle cos, py::handle sin, py::handle key_cache,
                     py::handle value_cache, py::handle slot_mapping) {
  const DLPackView qkv_view(qkv, "qkv"), cos_view(cos, "cos"), sin_view(sin, "sin"),
      key_cache_view(key_cache, "key_cache"), value_cache_view(value_cache, "value_cache"),
      slot_mapping_view(slot_mapping, "slot_mapping");
  infercept::rotary_write_kv(qkv_view.view(), cos_view.view(), sin_view.view(),
                             key_cache_view.view(), value_cache_view.view(),
                             slot_mapping_view.view());
}

}  // namespace

void bind_cpu_layer_ops(py::module_& m) {
  m.def("rms_norm", &rms_norm, py::arg("out"), py::arg("x"), py::arg("weight"), py::arg("eps"),
        "out = x / sqrt(mean(x^2, -1) + eps) * weight over rows of x [num_rows, hidden] float32 "
        "(CPU, contiguous); out may be x. Raises InvalidArgumentError (a ValueError) naming a "
        "tensor of the wrong dtype, device, shape or layout.");
  m.def("add_rms_norm", &add_rms_norm, py::arg("x"), py::arg("residual"), py::arg("weight"),
        py::arg("eps"),
        "In place: residual += x, then x = rms_norm(residual) * weight; x and residual "
        "[num_rows, hidden] float32 (CPU, contiguous, disjoint). Raises InvalidArgumentError as "
        "rms_norm.");
  m.def("silu_mul", &silu_mul, py::arg("gate_up"),
        "In place over gate_up [num_rows, 2 * intermediate] float32 (CPU, contiguous), the "
        "output of a stacked gate/up GEMM: the gate half becomes silu(gate) * up, the up half "
        "is left. Raises InvalidArgumentError naming a tensor of the wrong dtype, device, shape "
        "or layout.");
  m.def("rotary_write_kv", &rotary_write_kv, py::arg("qkv"), py::arg("cos"), py::arg("sin"),
        py::arg("key_cache"), py::arg("value_cache"), py::arg("slot_mapping"),
        "Rotates the query and key heads of qkv [num_tokens, num_heads + 2 * num_kv_heads, "
        "head_dim] in place by cos/sin [num_tokens, head_dim] (rotate-half RoPE), then copies "
        "each token's keys and values to its slot of the paged caches [num_blocks, block_size, "
        "num_kv_heads, head_dim] (slot_mapping [num_tokens] int64). float32 CPU contiguous. "
        "Raises InvalidArgumentError naming a bad tensor or a slot out of range; then nothing "
        "is written.");
}
