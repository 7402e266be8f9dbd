#pragma once
// The software prefetch of the CPU decode-attention kernel's SIMD bodies
// (cpu_attention_avx2.cpp, cpu_attention_avx512.cpp). Private to the library.
#include <algorithm>
#include <cstdint>

#include "infercept/cpu_attention.h"

namespace infercept::detail {

// Asks for the 64-byte line at `address` in L2 (prefetcht1 on x86-64); a no-op elsewhere.
inline void prefetch_l2(const float* address) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(address, /*rw=*/0, /*locality=*/2);
#else
  (void)address;
#endif
}

// How far ahead of the reads RowPrefetcher runs, in bytes of K (and as many of V): 16 KiB is
// 64 rows of a 64-float head, four 16-token blocks of one KV head. On a 2-core Zen 4 at batch
// 32, from DRAM (AVX-512 body): 4 KiB ran ~15 GB/s, 8 and 16 KiB 17-18; prefetching into L1
// instead of L2 ~11, every other line only ~12. -D overrides it, for retuning on another CPU.
#ifndef INFERCEPT_PREFETCH_BYTES
#define INFERCEPT_PREFETCH_BYTES 16384
#endif
constexpr int64_t kPrefetchBytes = INFERCEPT_PREFETCH_BYTES;

// Walks one task's K and V rows in the order the SIMD bodies read them (block, KV head, token)
// a fixed distance ahead of the reads, prefetching each row of K and of V into L2. The blocks
// are scattered, so the hardware prefetcher loses the stream at every block; the block table
// says where the next one is. Issuing a row's prefetches per row read, rather than a whole
// block's at once, keeps the misses in flight steady: a plain read of the benchmark's
// scattered blocks ran at ~16 GB/s, ~21 with the next block prefetched in one burst and ~32
// (the machine's sequential read rate) with a line prefetched per line read.
class RowPrefetcher {
 public:
  RowPrefetcher(const PagedDecodeProblem& p, const int32_t* table, int64_t context_len,
                int64_t kv_begin, int64_t kv_end)
      : p_(p), table_(table), context_len_(context_len), kv_begin_(kv_begin), kv_end_(kv_end),
        num_blocks_((context_len + p.block_size - 1) / p.block_size), kv_head_(kv_begin) {
    start_block();
  }

  /// Starts kPrefetchBytes of K (and of V) ahead of the task's first row.
  void start() { advance(std::max<int64_t>(1, kPrefetchBytes / (4 * p_.head_dim))); }

  /// Prefetches the next `num_rows` rows of K and V (none past the task's last row).
  void advance(int64_t num_rows) {
    const int64_t token_stride = p_.num_kv_heads * p_.head_dim;
    for (; num_rows > 0 && block_ < num_blocks_; --num_rows) {
      for (int64_t d = 0; d < p_.head_dim; d += 16) {  // 16 floats: one 64-byte line
        prefetch_l2(p_.key_cache + row_offset_ + d);
        prefetch_l2(p_.value_cache + row_offset_ + d);
      }
      row_offset_ += token_stride;
      if (++token_ < tokens_in_block_) continue;
      token_ = 0;
      if (++kv_head_ == kv_end_) {
        kv_head_ = kv_begin_;
        ++block_;
      }
      start_block();
    }
  }

 private:
  // Points row_offset_ at token 0 of kv_head_ in block_ (when there is one).
  void start_block() {
    if (block_ >= num_blocks_) return;
    tokens_in_block_ = std::min(p_.block_size, context_len_ - block_ * p_.block_size);
    row_offset_ = (static_cast<int64_t>(table_[block_]) * p_.block_size * p_.num_kv_heads +
                   kv_head_) * p_.head_dim;
  }

  const PagedDecodeProblem& p_;
  const int32_t* table_;
  const int64_t context_len_, kv_begin_, kv_end_, num_blocks_;
  int64_t block_ = 0, kv_head_, token_ = 0, tokens_in_block_ = 0, row_offset_ = 0;
};

}  // namespace infercept::detail
