#include "infercept/attention_args.h"

namespace infercept {

PagedCacheSizes check_paged_caches(const char* op, const TensorView& key_cache,
                                   const TensorView& value_cache, ScalarType dtype, Device device) {
  check_ndim(op, "key_cache", key_cache, 4, "[num_blocks, block_size, num_kv_heads, head_dim]");
  const PagedCacheSizes s{key_cache.shape[0], key_cache.shape[1], key_cache.shape[2],
                          key_cache.shape[3]};
  check_tensor(op, "key_cache", key_cache, dtype, device,
               {s.num_blocks, s.block_size, s.num_kv_heads, s.head_dim});
  check_tensor(op, "value_cache", value_cache, dtype, device,
               {s.num_blocks, s.block_size, s.num_kv_heads, s.head_dim});
  return s;
}

AttentionSizes check_attention_args(const char* op, const TensorView& out, const TensorView& query,
                                    const TensorView& key_cache, const TensorView& value_cache,
                                    const TensorView& block_tables, const TensorView& context_lens,
                                    ScalarType dtype, Device device) {
  check_ndim(op, "query", query, 3, "[num_rows, num_heads, head_dim]");
  check_ndim(op, "block_tables", block_tables, 2, "[num_seqs, max_blocks]");
  AttentionSizes s;
  s.num_rows = query.shape[0];
  s.num_heads = query.shape[1];
  s.head_dim = query.shape[2];
  s.num_seqs = block_tables.shape[0];
  s.max_blocks = block_tables.shape[1];
  check_tensor(op, "query", query, dtype, device, {s.num_rows, s.num_heads, s.head_dim});
  check_tensor(op, "out", out, dtype, device, {s.num_rows, s.num_heads, s.head_dim});
  check_disjoint(op, "out", out, "query", query);
  s.cache = check_paged_caches(op, key_cache, value_cache, dtype, device);
  if (s.cache.head_dim != s.head_dim) {
    check_tensor(op, "key_cache", key_cache, dtype, device,
                 {s.cache.num_blocks, s.cache.block_size, s.cache.num_kv_heads, s.head_dim});
  }
  check_disjoint(op, "out", out, "key_cache", key_cache);
  check_disjoint(op, "out", out, "value_cache", value_cache);
  check_tensor(op, "block_tables", block_tables, ScalarType::kInt32, device,
               {s.num_seqs, s.max_blocks});
  check_tensor(op, "context_lens", context_lens, ScalarType::kInt32, device, {s.num_seqs});
  return s;
}

}  // namespace infercept
