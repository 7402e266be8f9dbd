#include "infercept/block_pool.h"

#include <string>

#include "infercept/errors.h"

namespace infercept {

BlockPool::BlockPool(Tier tier, int32_t num_blocks) : tier_(tier) {
  if (num_blocks < 0) {
    throw InvalidArgumentError(std::string(to_string(tier)) + " pool size " +
                               std::to_string(num_blocks) + " is negative");
  }
  ref_counts_.assign(num_blocks, 0);
  free_list_.reserve(num_blocks);
  // Push in reverse so the first allocations return 0, 1, 2, ...: easier to read in tests.
  for (BlockId block = num_blocks - 1; block >= 0; --block) free_list_.push_back(block);
}

BlockId BlockPool::allocate() {
  if (free_list_.empty()) {
    throw OutOfBlocksError(std::string(to_string(tier_)) + " pool exhausted: all " +
                           std::to_string(num_blocks()) + " blocks are in use");
  }
  BlockId block = free_list_.back();
  free_list_.pop_back();
  ref_counts_[block] = 1;
  return block;
}

std::vector<BlockId> BlockPool::allocate(int32_t num_blocks) {
  if (num_blocks < 0) {
    throw InvalidArgumentError("cannot allocate a negative number of blocks (" +
                               std::to_string(num_blocks) + ")");
  }
  if (!can_allocate(num_blocks)) {
    throw OutOfBlocksError(std::string(to_string(tier_)) + " pool cannot allocate " +
                           std::to_string(num_blocks) + " blocks: only " +
                           std::to_string(num_free()) + " of " + std::to_string(this->num_blocks()) +
                           " are free");
  }
  std::vector<BlockId> blocks;
  blocks.reserve(num_blocks);
  for (int32_t i = 0; i < num_blocks; ++i) blocks.push_back(allocate());
  return blocks;
}

void BlockPool::retain(BlockId block) {
  check_id(block, "retain");
  if (ref_counts_[block] == 0) {
    throw BlockError("cannot retain free " + std::string(to_string(tier_)) + " block " +
                     std::to_string(block));
  }
  ++ref_counts_[block];
}

void BlockPool::free(BlockId block) {
  check_id(block, "free");
  if (ref_counts_[block] == 0) {
    throw BlockError("double free of " + std::string(to_string(tier_)) + " block " +
                     std::to_string(block));
  }
  if (--ref_counts_[block] == 0) free_list_.push_back(block);
}

int32_t BlockPool::ref_count(BlockId block) const {
  check_id(block, "query");
  return ref_counts_[block];
}

void BlockPool::check_id(BlockId block, const char* action) const {
  if (block < 0 || block >= num_blocks()) {
    throw BlockError(std::string("cannot ") + action + " " + to_string(tier_) + " block " +
                     std::to_string(block) + ": ids are in [0, " + std::to_string(num_blocks()) +
                     ")");
  }
}

void BlockPool::check_invariants() const {
  std::vector<char> seen(ref_counts_.size(), 0);
  for (BlockId block : free_list_) {
    if (block < 0 || block >= num_blocks() || seen[block] || ref_counts_[block] != 0) {
      throw BlockError(std::string(to_string(tier_)) + " free list is corrupt at block " +
                       std::to_string(block));
    }
    seen[block] = 1;
  }
  int32_t num_zero = 0;
  for (int32_t count : ref_counts_) {
    if (count < 0) throw BlockError("negative reference count in the " + std::string(to_string(tier_)) + " pool");
    num_zero += count == 0;
  }
  if (num_zero != num_free()) {
    throw BlockError(std::string(to_string(tier_)) + " pool: " + std::to_string(num_zero) +
                     " blocks have no reference but the free list holds " +
                     std::to_string(num_free()));
  }
}

}  // namespace infercept
