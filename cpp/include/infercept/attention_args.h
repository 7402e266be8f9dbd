#pragma once
// Checks of the tensor arguments that the CPU and CUDA paged-attention adapters share: the
// paged caches, and a batch of query rows read through block tables.
#include <cstdint>

#include "infercept/tensor_view.h"

namespace infercept {

/// Sizes of the paged caches, read off key_cache [num_blocks, block_size, num_kv_heads, head_dim].
struct PagedCacheSizes {
  int64_t num_blocks = 0;
  int64_t block_size = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
};

/// Throws InvalidArgumentError "op: name ..." unless key_cache has 4 dimensions and both caches
/// are on `device`, of `dtype`, of key_cache's shape and contiguous. Returns that shape.
PagedCacheSizes check_paged_caches(const char* op, const TensorView& key_cache,
                                   const TensorView& value_cache, ScalarType dtype, Device device);

/// Sizes of one attention call: query [num_rows, num_heads, head_dim], block_tables
/// [num_seqs, max_blocks], and the caches'.
struct AttentionSizes {
  int64_t num_rows = 0;
  int64_t num_heads = 0;
  int64_t head_dim = 0;
  int64_t num_seqs = 0;
  int64_t max_blocks = 0;
  PagedCacheSizes cache;
};

/// Throws InvalidArgumentError "op: name ..." unless, all on `device` and contiguous: query
/// [num_rows, num_heads, head_dim] and out of its shape, both of `dtype`, out sharing no memory
/// with query or the caches; the caches as check_paged_caches, with the query's head_dim;
/// block_tables [num_seqs, max_blocks] and context_lens [num_seqs] int32. Returns the sizes.
AttentionSizes check_attention_args(const char* op, const TensorView& out, const TensorView& query,
                                    const TensorView& key_cache, const TensorView& value_cache,
                                    const TensorView& block_tables, const TensorView& context_lens,
                                    ScalarType dtype, Device device);

/// Copies the sizes into a kernel's problem record (PagedDecodeProblem,
/// cuda::PagedAttentionProblem: the same field names).
template <typename Problem>
void copy_sizes(const AttentionSizes& sizes, Problem& problem) {
  problem.num_seqs = sizes.num_seqs;
  problem.num_heads = sizes.num_heads;
  problem.num_kv_heads = sizes.cache.num_kv_heads;
  problem.head_dim = sizes.head_dim;
  problem.block_size = sizes.cache.block_size;
  problem.max_blocks = sizes.max_blocks;
  problem.num_blocks = sizes.cache.num_blocks;
}

}  // namespace infercept
