// infercept._core.paged_decode_attention: the CPU decode kernel over tensor addresses
// (tensor.data_ptr() ints). The Python wrapper (infercept.model.cpu_kernels) checks dtype,
// device, contiguity and shapes of the torch tensors; the kernel checks sizes, context lengths
// and block ids and throws InvalidArgumentError (a ValueError), naming the value and limit.
#include <cstdint>

#include "bindings.h"
#include "infercept/cpu_attention.h"

namespace py = pybind11;

namespace {

void paged_decode_attention(std::uintptr_t out_ptr, std::uintptr_t query_ptr,
                            std::uintptr_t key_cache_ptr, std::uintptr_t value_cache_ptr,
                            std::uintptr_t block_tables_ptr, std::uintptr_t context_lens_ptr,
                            int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                            int64_t head_dim, int64_t block_size, int64_t max_blocks,
                            int64_t num_blocks, double scale) {
  infercept::PagedDecodeProblem problem;
  problem.out = address<float>(out_ptr);
  problem.query = address<const float>(query_ptr);
  problem.key_cache = address<const float>(key_cache_ptr);
  problem.value_cache = address<const float>(value_cache_ptr);
  problem.block_tables = address<const int32_t>(block_tables_ptr);
  problem.context_lens = address<const int32_t>(context_lens_ptr);
  problem.num_seqs = num_seqs;
  problem.num_heads = num_heads;
  problem.num_kv_heads = num_kv_heads;
  problem.head_dim = head_dim;
  problem.block_size = block_size;
  problem.max_blocks = max_blocks;
  problem.num_blocks = num_blocks;
  problem.scale = static_cast<float>(scale);
  // The kernel touches no Python object: other Python threads (tool runtime, server) may run.
  py::gil_scoped_release release;
  infercept::paged_decode_attention(problem);
}

}  // namespace

void bind_cpu_attention(py::module_& m) {
  m.def("paged_decode_attention", &paged_decode_attention, py::arg("out_ptr"),
        py::arg("query_ptr"), py::arg("key_cache_ptr"), py::arg("value_cache_ptr"),
        py::arg("block_tables_ptr"), py::arg("context_lens_ptr"), py::arg("num_seqs"),
        py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"),
        py::arg("block_size"), py::arg("max_blocks"), py::arg("num_blocks"), py::arg("scale"),
        "Decode attention of num_seqs single-token queries over a paged float32 KV cache.\n\n"
        "Pointers are tensor.data_ptr() of dense tensors: out and query [num_seqs, num_heads, "
        "head_dim] float32, key/value caches [num_blocks, block_size, num_kv_heads, head_dim] "
        "float32, block_tables [num_seqs, max_blocks] int32, context_lens [num_seqs] int32. "
        "Releases the GIL. Raises InvalidArgumentError (a ValueError) on bad sizes, context "
        "lengths or block ids.");
  m.def("cpu_attention_has_openmp", &infercept::cpu_attention_has_openmp,
        "Whether paged_decode_attention was built with OpenMP (multi-threaded).");
}
