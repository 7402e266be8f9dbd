#include "infercept/block_pool.h"

#include <algorithm>
#include <string>

#include "infercept/errors.h"

namespace infercept {

BlockPool::BlockPool(Tier tier, int32_t num_blocks, int32_t block_size) : tier_(tier), block_size_(block_size) {
  if (num_blocks < 0) {
    throw InvalidArgumentError(std::string(to_string(tier)) + " pool size " +
                               std::to_string(num_blocks) + " is negative");
  }
  if (block_size <= 0) {
    throw InvalidArgumentError("block_size must be positive, got " + std::to_string(block_size));
  }
  ref_counts_.assign(num_blocks, 0);
  cached_.assign(num_blocks, 0);
  hashes_.assign(num_blocks, 0);
  parents_.assign(num_blocks, 0);
  depths_.assign(num_blocks, 0);
  tokens_.assign(static_cast<size_t>(num_blocks) * block_size, 0);
  order_kind_.assign(num_blocks, 0);
  order_key_.assign(num_blocks, EvictionKey{});
  free_list_.reserve(num_blocks);
  // Push in reverse so the first allocations return 0, 1, 2, ...: easier to read in tests.
  for (BlockId block = num_blocks - 1; block >= 0; --block) free_list_.push_back(block);
}

BlockId BlockPool::allocate() {
  BlockId block;
  if (!free_list_.empty()) {
    block = free_list_.back();
    free_list_.pop_back();
  } else {
    block = next_victim();
    if (block == kNoBlock) {
      throw OutOfBlocksError(std::string(to_string(tier_)) + " pool exhausted: all " +
                             std::to_string(num_blocks()) + " blocks are in use");
    }
    leave_eviction_order(block);
    uncache(block);
    ++num_evictions_;
  }
  ref_counts_[block] = 1;
  ++num_allocations_;
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
    if (!cached_[block]) {
      throw BlockError("cannot retain free " + std::string(to_string(tier_)) + " block " +
                       std::to_string(block));
    }
    leave_eviction_order(block);  // a cache hit revives it
  } else {
    ++share_epoch_;  // a second (or further) owner
  }
  ++ref_counts_[block];
}

void BlockPool::free(BlockId block) {
  check_id(block, "free");
  if (ref_counts_[block] == 0) {
    throw BlockError("double free of " + std::string(to_string(tier_)) + " block " +
                     std::to_string(block));
  }
  if (ref_counts_[block] > 1) ++share_epoch_;  // a co-owner leaves
  if (--ref_counts_[block] > 0) return;
  if (cached_[block]) make_evictable(block, false, now_s_);
  else free_list_.push_back(block);
}

void BlockPool::free(BlockId block, double next_use_s) {
  free(block);
  if (order_kind_[block] != 0) {
    leave_eviction_order(block);
    make_evictable(block, true, next_use_s);
  }
}

void BlockPool::touch(BlockId block, double next_use_s) {
  check_id(block, "touch");
  if (order_kind_[block] == 0) return;
  leave_eviction_order(block);
  make_evictable(block, true, next_use_s);
}

void BlockPool::make_evictable(BlockId block, bool timed, double key_s) {
  // timed_ is ascending, so its farthest next use sits at begin() under the negated key.
  EvictionKey key{timed ? -key_s : key_s, -depths_[block], block};
  (timed ? timed_ : lru_).insert(key);
  order_kind_[block] = timed ? 2 : 1;
  order_key_[block] = key;
}

void BlockPool::leave_eviction_order(BlockId block) {
  if (order_kind_[block] == 1) lru_.erase(order_key_[block]);
  else if (order_kind_[block] == 2) timed_.erase(order_key_[block]);
  order_kind_[block] = 0;
}

BlockId BlockPool::next_victim() const {
  if (lru_.empty() && timed_.empty()) return kNoBlock;
  if (timed_.empty()) return std::get<2>(*lru_.begin());
  if (lru_.empty()) return std::get<2>(*timed_.begin());
  // Time to next use: since last use for a finished prefix, until the resume for a paused one.
  double lru_gap_s = now_s_ - std::get<0>(*lru_.begin());
  double timed_gap_s = -std::get<0>(*timed_.begin()) - now_s_;
  return lru_gap_s >= timed_gap_s ? std::get<2>(*lru_.begin()) : std::get<2>(*timed_.begin());
}

bool BlockPool::cache(BlockId block, BlockHash hash, BlockHash parent, const TokenId* tokens, int32_t depth) {
  check_id(block, "cache");
  if (ref_counts_[block] == 0) {
    throw BlockError("cannot cache free " + std::string(to_string(tier_)) + " block " + std::to_string(block));
  }
  if (cached_[block]) {
    throw BlockError(std::string(to_string(tier_)) + " block " + std::to_string(block) + " is already cached");
  }
  if (!index_.insert(hash, block)) return false;
  cached_[block] = 1;
  hashes_[block] = hash;
  parents_[block] = parent;
  depths_[block] = depth;
  std::copy(tokens, tokens + block_size_, tokens_.begin() + static_cast<ptrdiff_t>(block) * block_size_);
  return true;
}

void BlockPool::uncache(BlockId block) {
  if (!cached_[block]) return;
  index_.erase(hashes_[block]);
  cached_[block] = 0;
}

BlockId BlockPool::find(BlockHash hash, BlockHash parent, const TokenId* tokens) const {
  BlockId block = index_.find(hash);
  if (block == BlockIndex::kNone) return kNoBlock;
  // A 64-bit key can collide: the content decides.
  if (parents_[block] != parent || !std::equal(tokens, tokens + block_size_, tokens_of(block))) return kNoBlock;
  return block;
}

const TokenId* BlockPool::tokens_of(BlockId block) const {
  return tokens_.data() + static_cast<size_t>(check_id(block, "query")) * block_size_;
}

void BlockPool::throw_bad_id(BlockId block, const char* action) const {
  throw BlockError(std::string("cannot ") + action + " " + to_string(tier_) + " block " + std::to_string(block) +
                   ": ids are in [0, " + std::to_string(num_blocks()) + ")");
}

void BlockPool::check_invariants() const {
  const std::string tier = to_string(tier_);
  auto fail = [&](BlockId block, const std::string& what) {
    throw BlockError(tier + " block " + std::to_string(block) + ": " + what);
  };
  std::vector<char> seen(ref_counts_.size(), 0);
  for (BlockId block : free_list_) {
    if (block < 0 || block >= num_blocks() || seen[block] || ref_counts_[block] != 0 || cached_[block]) {
      throw BlockError(tier + " free list is corrupt at block " + std::to_string(block));
    }
    seen[block] = 1;
  }
  for (const auto* order : {&lru_, &timed_}) {
    for (const EvictionKey& key : *order) {
      BlockId block = std::get<2>(key);
      if (seen[block]) fail(block, "is both free and evictable, or evictable twice");
      if (ref_counts_[block] != 0 || !cached_[block]) fail(block, "is evictable but referenced or uncached");
      seen[block] = 1;
    }
  }
  int32_t num_cached = 0;
  for (BlockId block = 0; block < num_blocks(); ++block) {
    if (ref_counts_[block] < 0) fail(block, "has a negative reference count");
    if (ref_counts_[block] == 0 && !seen[block]) fail(block, "has no reference but is neither free nor evictable");
    if (ref_counts_[block] > 0 && order_kind_[block] != 0) fail(block, "is referenced but in the eviction order");
    if (!cached_[block]) continue;
    ++num_cached;
    if (index_.find(hashes_[block]) != block) fail(block, "is cached but the key index does not point at it");
    if (hash_block(parents_[block], tokens_of(block), block_size_) != hashes_[block]) {
      fail(block, "is cached under a key that does not match its tokens");
    }
  }
  if (num_cached != static_cast<int32_t>(index_.size())) {
    throw BlockError(tier + " key index holds " + std::to_string(index_.size()) + " keys but " +
                     std::to_string(num_cached) + " blocks are cached");
  }
}

}  // namespace infercept
