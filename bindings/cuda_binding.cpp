// infercept._core CUDA names (compiled only with INFERCEPT_WITH_CUDA): CudaSwapEngine and
// declarations of the KV-write / paged-attention tensor adapters (attention_kernels.h), over
// tensors taken through DLPack (dlpack_view.h) and stream handles
// (torch.cuda.current_stream().cuda_stream). The adapters check every tensor and throw
// InvalidArgumentError (a ValueError) naming it.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <optional>

#include "attention_kernels.h"
#include "bindings.h"
#include "cuda_swap_engine.h"
#include "dlpack_view.h"

namespace py = pybind11;
using infercept::SwapEngine;
using infercept::SwapEngineConfig;
using infercept::cuda::CudaSwapEngine;

namespace {

cudaStream_t to_stream(std::uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

void write_kv_cache(py::handle key, py::handle value, py::handle key_cache, py::handle value_cache,
                    py::handle slot_mapping, std::uintptr_t stream) {
  const DLPackView key_view(key, "key"), value_view(value, "value"),
      key_cache_view(key_cache, "key_cache"), value_cache_view(value_cache, "value_cache"),
      slot_mapping_view(slot_mapping, "slot_mapping");
  infercept::cuda::write_kv_cache(key_view.view(), value_view.view(), key_cache_view.view(),
                                  value_cache_view.view(), slot_mapping_view.view(),
                                  to_stream(stream));
}

void paged_attention(py::handle out, py::handle query, py::handle key_cache, py::handle value_cache,
                     py::handle block_tables, py::handle context_lens, py::handle query_start,
                     double scale, std::uintptr_t stream) {
  const DLPackView out_view(out, "out"), query_view(query, "query"),
      key_cache_view(key_cache, "key_cache"), value_cache_view(value_cache, "value_cache"),
      block_tables_view(block_tables, "block_tables"),
      context_lens_view(context_lens, "context_lens");
  std::optional<DLPackView> query_start_view;
  if (!query_start.is_none()) query_start_view.emplace(query_start, "query_start");
  infercept::cuda::paged_attention(out_view.view(), query_view.view(), key_cache_view.view(),
                                   value_cache_view.view(), block_tables_view.view(),
                                   context_lens_view.view(),
                                   query_start_view ? &query_start_view->view() : nullptr,
                                   static_cast<float>(scale), to_stream(stream));
}

}  // namespace

void bind_cuda(py::module_& m) {
  py::class_<CudaSwapEngine, SwapEngine>(m, "CudaSwapEngine")
      .def(py::init([](int32_t num_layers, int64_t block_bytes, int32_t num_device_blocks,
                       int32_t num_host_blocks, int32_t max_copy_ctas) {
             SwapEngineConfig config;
             config.num_layers = num_layers;
             config.block_bytes = block_bytes;
             config.num_device_blocks = num_device_blocks;
             config.num_host_blocks = num_host_blocks;
             return new CudaSwapEngine(config, max_copy_ctas);
           }),
           py::arg("num_layers"), py::arg("block_bytes"), py::arg("num_device_blocks"),
           py::arg("num_host_blocks"), py::arg("max_copy_ctas") = 0,
           py::call_guard<py::gil_scoped_release>())
      .def("set_compute_stream", &CudaSwapEngine::set_compute_stream, py::arg("stream"))
      .def_property_readonly("compute_stream", &CudaSwapEngine::compute_stream)
      .def_property_readonly("device", &CudaSwapEngine::device)
      .def_property_readonly("max_copy_ctas", &CudaSwapEngine::max_copy_ctas);

  m.def("cuda_write_kv_cache", &write_kv_cache, py::arg("key"), py::arg("value"),
        py::arg("key_cache"), py::arg("value_cache"), py::arg("slot_mapping"), py::arg("stream"),
        "Writes new K/V [num_tokens, num_kv_heads, head_dim] into the paged caches [num_blocks, "
        "block_size, num_kv_heads, head_dim] at slot_mapping [num_tokens] int64 (negative: "
        "skipped), enqueued on `stream` (a cudaStream_t as int). Tensors (DLPack producers or "
        "capsules) on one CUDA device, contiguous, one of float32/float16/bfloat16. Raises "
        "InvalidArgumentError (a ValueError) naming the tensor that breaks this.");
  m.def("cuda_paged_attention", &paged_attention, py::arg("out"), py::arg("query"),
        py::arg("key_cache"), py::arg("value_cache"), py::arg("block_tables"),
        py::arg("context_lens"), py::arg("query_start"), py::arg("scale"), py::arg("stream"),
        "Paged attention of query [num_rows, num_heads, head_dim] into out (same shape, 16-byte "
        "aligned, not overlapping query) over the paged caches, block_tables [num_seqs, "
        "max_blocks] and context_lens [num_seqs] int32: decode when query_start is None, else "
        "causal prefill/recompute chunks at query_start [num_seqs + 1] int32 row offsets. "
        "Enqueued on `stream`. Tensors as for cuda_write_kv_cache; raises InvalidArgumentError "
        "(a ValueError) naming the tensor, or an unsupported head_dim or head grouping.");
}
