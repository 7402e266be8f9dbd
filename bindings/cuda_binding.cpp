// infercept._core CUDA names (compiled only with INFERCEPT_WITH_CUDA): CudaSwapEngine and the
// KV-write / paged-attention kernels over device addresses (tensor.data_ptr() ints) and stream
// handles (torch.cuda.current_stream().cuda_stream). The Python wrappers
// (infercept.model.cuda_kernels, infercept.engine.swap) check the torch tensors; the launchers
// check sizes, pointers and alignment and throw InvalidArgumentError (a ValueError).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "attention_kernels.h"
#include "bindings.h"
#include "cuda_swap_engine.h"
#include "infercept/errors.h"

namespace py = pybind11;
using infercept::InvalidArgumentError;
using infercept::SwapEngine;
using infercept::SwapEngineConfig;
using infercept::cuda::CudaSwapEngine;
using infercept::cuda::DType;

namespace {

DType parse_dtype(const std::string& name) {
  if (name == "float32") return DType::kFloat32;
  if (name == "float16") return DType::kFloat16;
  if (name == "bfloat16") return DType::kBFloat16;
  throw InvalidArgumentError("dtype='" + name + "' is not one of 'float32', 'float16', 'bfloat16'");
}

cudaStream_t to_stream(std::uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

void write_kv_cache(std::uintptr_t key_ptr, std::uintptr_t value_ptr, std::uintptr_t key_cache_ptr,
                    std::uintptr_t value_cache_ptr, std::uintptr_t slot_mapping_ptr, int64_t num_tokens,
                    int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int64_t num_blocks,
                    const std::string& dtype, std::uintptr_t stream) {
  infercept::cuda::KvWriteProblem p;
  p.key = address<const void>(key_ptr);
  p.value = address<const void>(value_ptr);
  p.key_cache = address<void>(key_cache_ptr);
  p.value_cache = address<void>(value_cache_ptr);
  p.slot_mapping = address<const int64_t>(slot_mapping_ptr);
  p.num_tokens = num_tokens;
  p.num_kv_heads = num_kv_heads;
  p.head_dim = head_dim;
  p.block_size = block_size;
  p.num_blocks = num_blocks;
  p.dtype = parse_dtype(dtype);
  infercept::cuda::write_kv_cache(p, to_stream(stream));
}

void paged_attention(std::uintptr_t out_ptr, std::uintptr_t query_ptr, std::uintptr_t key_cache_ptr,
                     std::uintptr_t value_cache_ptr, std::uintptr_t block_tables_ptr,
                     std::uintptr_t context_lens_ptr, std::uintptr_t query_start_ptr, int64_t num_rows,
                     int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                     int64_t block_size, int64_t max_blocks, int64_t num_blocks, double scale,
                     const std::string& dtype, std::uintptr_t stream) {
  infercept::cuda::PagedAttentionProblem p;
  p.out = address<void>(out_ptr);
  p.query = address<const void>(query_ptr);
  p.key_cache = address<const void>(key_cache_ptr);
  p.value_cache = address<const void>(value_cache_ptr);
  p.block_tables = address<const int32_t>(block_tables_ptr);
  p.context_lens = address<const int32_t>(context_lens_ptr);
  p.query_start = address<const int32_t>(query_start_ptr);
  p.num_rows = num_rows;
  p.num_seqs = num_seqs;
  p.num_heads = num_heads;
  p.num_kv_heads = num_kv_heads;
  p.head_dim = head_dim;
  p.block_size = block_size;
  p.max_blocks = max_blocks;
  p.num_blocks = num_blocks;
  p.scale = static_cast<float>(scale);
  p.dtype = parse_dtype(dtype);
  infercept::cuda::paged_attention(p, to_stream(stream));
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

  m.def("cuda_write_kv_cache", &write_kv_cache, py::arg("key_ptr"), py::arg("value_ptr"),
        py::arg("key_cache_ptr"), py::arg("value_cache_ptr"), py::arg("slot_mapping_ptr"),
        py::arg("num_tokens"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("block_size"),
        py::arg("num_blocks"), py::arg("dtype"), py::arg("stream"),
        "Writes new K/V [num_tokens, num_kv_heads, head_dim] into the paged caches at int64 "
        "slot_mapping (device addresses), enqueued on `stream`.");
  m.def("cuda_paged_attention", &paged_attention, py::arg("out_ptr"), py::arg("query_ptr"),
        py::arg("key_cache_ptr"), py::arg("value_cache_ptr"), py::arg("block_tables_ptr"),
        py::arg("context_lens_ptr"), py::arg("query_start_ptr"), py::arg("num_rows"), py::arg("num_seqs"),
        py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("block_size"),
        py::arg("max_blocks"), py::arg("num_blocks"), py::arg("scale"), py::arg("dtype"), py::arg("stream"),
        "Paged attention of num_rows query rows (decode when query_start_ptr is 0, else causal "
        "prefill/recompute chunks) over the paged caches, enqueued on `stream`.");
}
