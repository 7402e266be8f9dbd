#pragma once
// Paged attention over a KV cache on the CPU, framework-free: raw float32 pointers and sizes,
// no torch. Each row is one query token (a decode token, or one token of a prefill or
// recompute chunk) that attends to its sequence's cache prefix up to its own context length,
// read block by block through the row's block table, so a chunk is causal by construction and
// no per-step gather of the context into a contiguous buffer is needed.
//
// Two layers (STYLE.md §3): PagedDecodeProblem and the paged_decode_attention taking it are the
// bottom one, raw pointers and sizes, what C++ tests and microbenchmarks call; the overload
// over TensorViews is the adapter that the binding calls, which checks every tensor's device,
// dtype, shape and strides and then fills a PagedDecodeProblem.
#include <cstdint>

#include "infercept/tensor_view.h"

namespace infercept {

/// One attention call over num_seqs rows (query tokens; several rows of one chunk share a block
/// table and differ in context length). Every array is dense, row-major, float32 or int32:
///   out          [num_seqs, num_heads, head_dim]                        written
///   query        [num_seqs, num_heads, head_dim]                        RoPE applied
///   key_cache    [num_blocks, block_size, num_kv_heads, head_dim]
///   value_cache  [num_blocks, block_size, num_kv_heads, head_dim]
///   block_tables [num_seqs, max_blocks]  block ids of each sequence in order; entries past a
///                                        sequence's ceil(context_len / block_size) are unread
///   context_lens [num_seqs]              tokens of each sequence in the cache, >= 1
/// Query heads h * group .. h * group + group - 1 share KV head h (group = num_heads /
/// num_kv_heads), as in grouped-query attention.
/// Which body computes the attention: kAuto takes AVX-512 intrinsics when the running CPU has
/// AVX-512 F and head_dim is a multiple of 16, else AVX2+FMA ones when it has those and
/// head_dim is a multiple of 8, else the portable loops; the others force one (tests and
/// microbenchmarks compare them; kAvx2 or kAvx512 where it cannot run throws).
enum class CpuAttentionImpl { kAuto, kPortable, kAvx2, kAvx512 };

struct PagedDecodeProblem {
  float* out = nullptr;
  const float* query = nullptr;
  const float* key_cache = nullptr;
  const float* value_cache = nullptr;
  const int32_t* block_tables = nullptr;
  const int32_t* context_lens = nullptr;
  int64_t num_seqs = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t block_size = 0;
  int64_t max_blocks = 0;
  int64_t num_blocks = 0;
  float scale = 1.0f;  ///< Softmax scale, usually head_dim ** -0.5.
  CpuAttentionImpl impl = CpuAttentionImpl::kAuto;
};

/// Throws InvalidArgumentError, naming the value and the limit it broke, unless the sizes are
/// positive (num_seqs may be 0), num_heads is a multiple of num_kv_heads, the pointers are
/// non-null, every context_len is in 1..max_blocks * block_size and every block id a sequence
/// reads is in [0, num_blocks). Reads context_lens and block_tables.
void check_paged_decode_problem(const PagedDecodeProblem& problem);

/// Checks `problem` (as above), then writes `out`: for each sequence s and query head q,
/// softmax(scale * K_s q_s) V_s over the sequence's context_len cached tokens, computed with a
/// streaming (online) softmax in float32. Parallel with OpenMP when the library was built with
/// it: over sequences when there are at least two per thread (the AVX2 and AVX-512 bodies),
/// else over (sequence, KV head) pairs. Throws InvalidArgumentError; on a throw `out` is
/// unchanged.
void paged_decode_attention(const PagedDecodeProblem& problem);

/// The adapter: checks the tensors, then runs the kernel above. Shapes as in
/// PagedDecodeProblem, read off `query` [num_seqs, num_heads, head_dim], `key_cache`
/// [num_blocks, block_size, num_kv_heads, head_dim] and `block_tables` [num_seqs, max_blocks];
/// every tensor CPU and contiguous, float32 but for the int32 block_tables and context_lens;
/// `out` shares no memory with query or the caches. Throws InvalidArgumentError naming the
/// tensor, what it is and what was expected, or (from the kernel) a size, context length or
/// block id out of range.
void paged_decode_attention(const TensorView& out, const TensorView& query,
                            const TensorView& key_cache, const TensorView& value_cache,
                            const TensorView& block_tables, const TensorView& context_lens,
                            float scale);

/// Whether the AVX2+FMA body can run on this CPU (for a head_dim that is a multiple of 8).
bool cpu_attention_has_avx2();

/// Whether kAuto takes the AVX-512 body on this CPU for a head_dim that is a multiple of 16.
bool cpu_attention_has_avx512();

/// Whether the kernel was built with OpenMP (and so runs its (sequence, KV head) pairs on
/// several threads).
bool cpu_attention_has_openmp();

}  // namespace infercept
