#pragma once
// CUDA kernels over the paged KV cache, framework-free: raw device pointers, sizes, a dtype tag
// and a stream (STYLE.md §3). Each launcher is the adapter layer: it checks sizes, pointers
// and alignment (throws InvalidArgumentError naming the value and limit), dispatches over
// dtype and head_dim, and launches the __global__ kernel of cuda/kernels/ on `stream`
// (throws CudaError when the launch fails). Nothing is synchronised: results are ready in
// stream order. C++ tests and benchmarks call these directly.
//
// Above them sit the tensor adapters (attention_adapter.cpp), what the pybind11 binding calls:
// they check each TensorView's device, dtype, shape and strides, make the tensors' device the
// current one for the call, fill the problem and call its launcher.
//
// Cache layout (the model's KVCache tensors):
//   key_cache, value_cache  [num_blocks, block_size, num_kv_heads, head_dim]
#include <cuda_runtime.h>

#include <cstdint>

#include "infercept/tensor_view.h"

namespace infercept::cuda {

/// Element type of queries, keys, values and outputs. Accumulation is always float32.
enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

/// Bytes of one element of `dtype`; throws InvalidArgumentError for an unknown tag.
int64_t dtype_size(DType dtype);

/// New tokens' K/V into their cache slots. slot = block_id * block_size + offset; a negative
/// slot (padding) is skipped. Slots of one call must be distinct.
///   key, value    [num_tokens, num_kv_heads, head_dim]   dense
///   slot_mapping  [num_tokens] int64, device memory
/// The copy is element-type agnostic: rows move as 16-, 4- or 2-byte words.
struct KvWriteProblem {
  const void* key = nullptr;
  const void* value = nullptr;
  void* key_cache = nullptr;
  void* value_cache = nullptr;
  const int64_t* slot_mapping = nullptr;
  int64_t num_tokens = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t block_size = 0;
  int64_t num_blocks = 0;
  DType dtype = DType::kFloat32;
};

/// Throws InvalidArgumentError unless sizes are positive (num_tokens may be 0) and pointers
/// non-null. Slots are device data: a slot >= num_blocks * block_size is skipped by the kernel.
void check_kv_write_problem(const KvWriteProblem& problem);
void write_kv_cache(const KvWriteProblem& problem, cudaStream_t stream);

/// Paged attention of a flat batch of query rows from num_seqs sequences, read straight from
/// the cache through block tables. Serves decode (one row per sequence) and prefill /
/// recompute chunks (query_lens > 1): row j of a sequence with query_len rows and
/// context_len cached tokens (its own new K/V already written) sits at position
/// context_len - query_len + j and attends to cached tokens 0 .. that position (causal).
/// Query heads h * group .. h * group + group - 1 share KV head h (group = num_heads /
/// num_kv_heads).
///   out, query    [num_rows, num_heads, head_dim]  dense, 16-byte aligned
///   block_tables  [num_seqs, max_blocks] int32     entries past ceil(context_len/block_size) unread
///   context_lens  [num_seqs] int32                 >= query_len of the sequence
///   query_start   [num_seqs + 1] int32 or null     rows of sequence s: query_start[s] ..
///                                                  query_start[s + 1]; null: one row per
///                                                  sequence (decode), num_rows == num_seqs
/// All arrays are device memory. A block id outside [0, num_blocks) or a context length out of
/// range (device data, not checked on the host) makes that row's output NaN instead of
/// reading out of bounds.
struct PagedAttentionProblem {
  void* out = nullptr;
  const void* query = nullptr;
  const void* key_cache = nullptr;
  const void* value_cache = nullptr;
  const int32_t* block_tables = nullptr;
  const int32_t* context_lens = nullptr;
  const int32_t* query_start = nullptr;
  int64_t num_rows = 0;
  int64_t num_seqs = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;  ///< 64 or 128
  int64_t block_size = 0;
  int64_t max_blocks = 0;
  int64_t num_blocks = 0;
  float scale = 1.0f;  ///< Softmax scale, usually head_dim ** -0.5.
  DType dtype = DType::kFloat32;
};

/// Throws InvalidArgumentError unless the sizes are positive (num_rows, num_seqs may be 0),
/// head_dim is 64 or 128, num_heads is a multiple of num_kv_heads, the pointers are non-null
/// and out / query / caches are 16-byte aligned, and (decode) num_rows == num_seqs.
void check_paged_attention_problem(const PagedAttentionProblem& problem);
void paged_attention(const PagedAttentionProblem& problem, cudaStream_t stream);

/// The adapter of write_kv_cache: `key_cache` [num_blocks, block_size, num_kv_heads, head_dim]
/// on a CUDA device, float32, float16 or bfloat16, sets device and dtype; `value_cache` like it,
/// `key` and `value` [num_tokens, num_kv_heads, head_dim] of that dtype, `slot_mapping`
/// [num_tokens] int64, all on that device and contiguous. Throws InvalidArgumentError naming the
/// tensor, what it is and what was expected.
void write_kv_cache(const TensorView& key, const TensorView& value, const TensorView& key_cache,
                    const TensorView& value_cache, const TensorView& slot_mapping,
                    cudaStream_t stream);

/// The adapter of paged_attention: `query` [num_rows, num_heads, head_dim] on a CUDA device,
/// float32, float16 or bfloat16, sets device and dtype; `out` like it and sharing no memory with
/// it; caches [num_blocks, block_size, num_kv_heads, head_dim] of that dtype; `block_tables`
/// [num_seqs, max_blocks] and `context_lens` [num_seqs] int32; `query_start` [num_seqs + 1]
/// int32, or null for decode. All on that device and contiguous. Throws InvalidArgumentError
/// naming the tensor, what it is and what was expected, or (from the launcher) a size, head_dim
/// or alignment it does not take.
void paged_attention(const TensorView& out, const TensorView& query, const TensorView& key_cache,
                     const TensorView& value_cache, const TensorView& block_tables,
                     const TensorView& context_lens, const TensorView* query_start, float scale,
                     cudaStream_t stream);

}  // namespace infercept::cuda
