#pragma once
// A fixed pool of KV blocks of one tier: reference counts, a free list, and the tier's prefix
// cache. A block whose content is known (a full block, registered under its BlockHash) keeps
// that content when its last reference goes: it is then *evictable*, still found by lookups,
// and counted as free capacity. Allocation takes a truly free block first, else evicts.
//
// Eviction order: the evictable block whose next use is expected farthest away goes first
// (its memory is idle longest; a block costs about the same to rebuild wherever it sits).
// Two kinds of estimate: a finished prefix's next use is unknown, so the time since its last
// use stands for the time to its next (the paper's estimate for an intercept of unknown
// length); a paused context that gave its blocks up expects them back when its tool returns.
// Ties go deepest block first, so a chain is eaten from its leaf and its shared root stays.
#include <cstdint>
#include <set>
#include <tuple>
#include <vector>

#include "infercept/block_hash.h"
#include "infercept/block_index.h"
#include "infercept/types.h"

namespace infercept {

/// Hands out block ids [0, num_blocks) of one tier. Misuse (freeing a free block, an id out of
/// range, allocating from an empty pool) throws BlockError or OutOfBlocksError and leaves the
/// pool unchanged.
class BlockPool {
 public:
  static constexpr BlockId kNoBlock = -1;

  /// `block_size`: tokens per block, what a cached block's content is compared over.
  BlockPool(Tier tier, int32_t num_blocks, int32_t block_size = 16);

  /// Takes one block with reference count 1: a free one, else the next evictable one (which
  /// then leaves the cache).
  BlockId allocate();

  /// Takes `num_blocks` blocks, all or none.
  std::vector<BlockId> allocate(int32_t num_blocks);

  /// Adds a reference (another owner, or a cache hit that revives an evictable block).
  void retain(BlockId block);

  /// Drops one reference. At zero a cached block becomes evictable with an unknown next use
  /// (time since now stands for it); any other block is free.
  void free(BlockId block);
  /// ... with an expected next use at `next_use_s` (a paused context's resume).
  void free(BlockId block, double next_use_s);

  // ---- the prefix cache ----

  /// The pool's clock for eviction order (the scheduler sets it every step).
  void set_now(double now_s) { now_s_ = now_s; }
  /// Registers a referenced block's content under `hash`. Returns false (and registers
  /// nothing) when another block already holds that key: the caller keeps its copy private.
  bool cache(BlockId block, BlockHash hash, BlockHash parent, const TokenId* tokens, int32_t depth);
  /// The block cached under `hash` whose parent key and tokens are these; kNoBlock on a miss.
  BlockId find(BlockHash hash, BlockHash parent, const TokenId* tokens) const;
  /// Re-estimates an evictable block's next use (its owner's tool returned); no-op otherwise.
  void touch(BlockId block, double next_use_s);

  bool is_cached(BlockId block) const { return cached_[check_id(block, "query")] != 0; }
  bool is_evictable(BlockId block) const { return is_cached(block) && ref_counts_[block] == 0; }
  BlockHash hash_of(BlockId block) const { return hashes_[check_id(block, "query")]; }
  BlockHash parent_of(BlockId block) const { return parents_[check_id(block, "query")]; }
  int32_t depth_of(BlockId block) const { return depths_[check_id(block, "query")]; }
  const TokenId* tokens_of(BlockId block) const;

  bool can_allocate(int32_t num_blocks) const { return num_blocks <= num_free(); }
  int32_t ref_count(BlockId block) const { return ref_counts_[check_id(block, "query")]; }
  int32_t num_blocks() const { return static_cast<int32_t>(ref_counts_.size()); }
  /// Free capacity: truly free blocks plus evictable cached ones.
  int32_t num_free() const { return static_cast<int32_t>(free_list_.size()) + num_evictable(); }
  int32_t num_evictable() const { return static_cast<int32_t>(lru_.size() + timed_.size()); }
  int32_t num_used() const { return num_blocks() - num_free(); }
  int32_t num_cached() const { return static_cast<int32_t>(index_.size()); }
  int64_t num_evictions() const { return num_evictions_; }
  int64_t num_allocations() const { return num_allocations_; }
  /// Changes whenever a referenced block gains or loses a co-owner (a reference count moves
  /// from or to above one): while it stands, every table's shared and exclusive parts stand
  /// too, unless the table itself changed.
  uint64_t share_epoch() const { return share_epoch_; }
  int32_t block_size() const { return block_size_; }
  Tier tier() const { return tier_; }

  /// Throws BlockError unless every block with no reference is free or evictable (once),
  /// evictable iff cached, and the key index matches the blocks' registered content.
  void check_invariants() const;

 private:
  // (key, -depth, block): lru_ keys by last use (oldest first), timed_ by -next use (farthest first).
  using EvictionKey = std::tuple<double, int32_t, BlockId>;

  BlockId check_id(BlockId block, const char* action) const {
    if (block < 0 || block >= num_blocks()) throw_bad_id(block, action);
    return block;
  }
  [[noreturn]] void throw_bad_id(BlockId block, const char* action) const;
  void make_evictable(BlockId block, bool timed, double key_s);
  void leave_eviction_order(BlockId block);
  void uncache(BlockId block);
  BlockId next_victim() const;

  Tier tier_;
  int32_t block_size_;
  double now_s_ = 0;
  std::vector<BlockId> free_list_;   // a stack: the most recently freed block is reused first
  std::vector<int32_t> ref_counts_;  // [num_blocks]
  // Registered content, [num_blocks] (tokens: [num_blocks * block_size]).
  std::vector<char> cached_;
  std::vector<BlockHash> hashes_;
  std::vector<BlockHash> parents_;
  std::vector<int32_t> depths_;
  std::vector<TokenId> tokens_;
  BlockIndex index_;
  // Evictable blocks: where each sits (0 none, 1 lru_, 2 timed_) and under which key.
  std::vector<char> order_kind_;
  std::vector<EvictionKey> order_key_;
  std::set<EvictionKey> lru_;
  std::set<EvictionKey> timed_;
  int64_t num_evictions_ = 0;
  int64_t num_allocations_ = 0;
  uint64_t share_epoch_ = 0;
};

}  // namespace infercept
