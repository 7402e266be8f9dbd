// infercept._core.paged_decode_attention: declares the CPU decode kernel's tensor adapter
// (cpu_attention.h), which checks every tensor and throws InvalidArgumentError (a ValueError)
// naming it. Tensors arrive through DLPack (dlpack_view.h): torch is not linked.
#include "bindings.h"
#include "dlpack_view.h"
#include "infercept/cpu_attention.h"

namespace py = pybind11;

namespace {

void paged_decode_attention(py::handle out, py::handle query, py::handle key_cache,
                            py::handle value_cache, py::handle block_tables,
                            py::handle context_lens, double scale) {
  const DLPackView out_view(out, "out"), query_view(query, "query"),
      key_cache_view(key_cache, "key_cache"), value_cache_view(value_cache, "value_cache"),
      block_tables_view(block_tables, "block_tables"),
      context_lens_view(context_lens, "context_lens");
  // The kernel touches no Python object: other Python threads (tool runtime, server) may run.
  // The views are released after the GIL is taken back.
  py::gil_scoped_release release;
  infercept::paged_decode_attention(out_view.view(), query_view.view(), key_cache_view.view(),
                                    value_cache_view.view(), block_tables_view.view(),
                                    context_lens_view.view(), static_cast<float>(scale));
}

}  // namespace

void bind_cpu_attention(py::module_& m) {
  m.def("paged_decode_attention", &paged_decode_attention, py::arg("out"), py::arg("query"),
        py::arg("key_cache"), py::arg("value_cache"), py::arg("block_tables"),
        py::arg("context_lens"), py::arg("scale"),
        "Decode attention of num_seqs single-token queries over a paged float32 KV cache.\n\n"
        "Tensors (torch, numpy, any DLPack producer, or DLPack capsules), CPU and contiguous: "
        "out (written) and query [num_seqs, num_heads, head_dim] float32, key/value caches "
        "[num_blocks, block_size, num_kv_heads, head_dim] float32, block_tables [num_seqs, "
        "max_blocks] int32, context_lens [num_seqs] int32. Releases the GIL. Raises "
        "InvalidArgumentError (a ValueError) naming the tensor on a wrong dtype, device, shape "
        "or layout, and on bad sizes, context lengths or block ids.");
  m.def("cpu_attention_has_openmp", &infercept::cpu_attention_has_openmp,
        "Whether paged_decode_attention was built with OpenMP (multi-threaded).");
  m.def("cpu_attention_has_avx2", &infercept::cpu_attention_has_avx2,
        "Whether this CPU can run paged_decode_attention's AVX2+FMA body (taken for a head_dim "
        "that is a multiple of 8 when the AVX-512 one does not apply).");
  m.def("cpu_attention_has_avx512", &infercept::cpu_attention_has_avx512,
        "Whether paged_decode_attention takes its AVX-512 body on this CPU (for a head_dim that "
        "is a multiple of 16).");
}
