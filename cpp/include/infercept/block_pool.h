#pragma once
// A fixed pool of KV blocks of one tier: a free list plus reference counts. Allocation and
// release are O(1); the pool never touches memory, it only hands out integer ids.
#include <cstdint>
#include <vector>

#include "infercept/types.h"

namespace infercept {

/// Hands out block ids [0, num_blocks) of one tier. A block is free when its reference count
/// is zero. Misuse (freeing a free block, an id out of range, allocating from an empty pool)
/// throws BlockError or OutOfBlocksError and leaves the pool unchanged.
class BlockPool {
 public:
  BlockPool(Tier tier, int32_t num_blocks);

  /// Takes one free block with reference count 1.
  BlockId allocate();

  /// Takes `num_blocks` free blocks, all or none.
  std::vector<BlockId> allocate(int32_t num_blocks);

  /// Adds a reference to an allocated block (a second owner, e.g. a shared prefix).
  void retain(BlockId block);

  /// Drops one reference; the block returns to the free list when none are left.
  void free(BlockId block);

  bool can_allocate(int32_t num_blocks) const { return num_blocks <= num_free(); }
  int32_t ref_count(BlockId block) const;
  int32_t num_blocks() const { return static_cast<int32_t>(ref_counts_.size()); }
  int32_t num_free() const { return static_cast<int32_t>(free_list_.size()); }
  int32_t num_used() const { return num_blocks() - num_free(); }
  Tier tier() const { return tier_; }

  /// Throws BlockError unless the free list holds exactly the blocks with count zero, once each.
  void check_invariants() const;

 private:
  void check_id(BlockId block, const char* action) const;

  Tier tier_;
  std::vector<BlockId> free_list_;  // a stack: the most recently freed block is reused first
  std::vector<int32_t> ref_counts_;  // [num_blocks]
};

}  // namespace infercept
