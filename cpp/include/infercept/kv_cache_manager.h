#pragma once
// Per-request block tables over two pools (device, host), each pool also the tier's prefix
// cache. Bookkeeping only: the executor moves the bytes that the copies returned here describe.
//
// A request's KV is a sequence of logical blocks. The device part is always a prefix and the
// host part the suffix: swap-out moves blocks from the back of the device part to the front of
// the host part, swap-in moves them back in order. So a swap can stop after any number of
// blocks and continue in a later iteration.
//
// Blocks are shared: a request admitted with a cached prefix references the blocks of earlier
// requests (on the device, then continuing on the host). Sharing is always a prefix of a table
// (keys chain), so a request's *exclusive* blocks are a suffix: those are what swap-out moves.
#include <cstdint>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "infercept/block_hash.h"
#include "infercept/block_pool.h"
#include "infercept/types.h"

namespace infercept {

/// One block copied between tiers: swap-out copies device `src` to host `dst`, swap-in copies
/// host `src` to device `dst`.
struct BlockCopy {
  BlockId src = 0;
  BlockId dst = 0;
};

/// A request's KV blocks on both tiers.
struct BlockTable {
  std::vector<BlockId> device_blocks;  // logical blocks [0, device_blocks.size())
  std::vector<BlockId> host_blocks;    // logical blocks that follow the device part
  int32_t num_tokens = 0;              // tokens whose KV is held, on either tier
  int32_t num_tokens_to_recompute = 0; // tokens whose KV was discarded and must be rebuilt
  int32_t num_cached_blocks = 0;       // leading device blocks already offered to the cache
  RequestId request_id = -1;           // its owner (KvCacheManager::add sets it), for messages
  uint64_t version = 0;                // bumped by every KvCacheManager change to the table

  // KvCacheManager's memo of the device part's sharing (num_exclusive_blocks, shared_block_share),
  // asked for every paused context every step: valid while the table's version and the device
  // pool's share epoch stay what they were when it was taken.
  struct SharingMemo {
    uint64_t version = ~uint64_t{0};
    uint64_t share_epoch = 0;
    size_t num_blocks = 0;
    int32_t num_exclusive = 0;
    double share = 0;  // shared_block_share(table, num_exclusive)
  };
  mutable SharingMemo sharing_memo;

  int32_t num_device_tokens(int32_t block_size) const {
    int32_t capacity = static_cast<int32_t>(device_blocks.size()) * block_size;
    return num_tokens < capacity ? num_tokens : capacity;
  }
  int32_t num_host_tokens(int32_t block_size) const { return num_tokens - num_device_tokens(block_size); }
  bool is_on_device() const { return host_blocks.empty(); }
};

/// The longest cached prefix of a token sequence: full blocks on the device, then on the host.
struct CachedPrefix {
  std::vector<BlockId> device_blocks;
  std::vector<BlockId> host_blocks;
  int32_t num_evictable_device_blocks = 0;  // of device_blocks, those nobody references now

  int32_t num_blocks() const { return static_cast<int32_t>(device_blocks.size() + host_blocks.size()); }
};

/// What store_to_host() did with one device block.
enum class StoreResult : uint8_t {
  kStored,         // a copy to a fresh host block is planned
  kAlreadyStored,  // the host already holds (or this step already copies) the content
  kNoRoom,         // every host block is referenced: nothing can be evicted for it
};

/// Owns both pools and every request's block table.
///
/// Blocks that are the source of a copy planned this iteration are not freed at once: the copy
/// still reads them. They are released by commit(), which the scheduler calls once the executor
/// reports the step done.
class KvCacheManager {
 public:
  KvCacheManager(int32_t block_size, int32_t num_device_blocks, int32_t num_host_blocks);

  /// Registers a request with an empty table.
  BlockTable& add(RequestId request);
  bool contains(RequestId request) const { return tables_.count(request) != 0; }
  const BlockTable& table(RequestId request) const;

  /// Device blocks needed to append `num_tokens` tokens to the request's KV.
  int32_t num_blocks_to_append(RequestId request, int32_t num_tokens) const {
    return num_blocks_to_append(table(request), num_tokens);
  }
  /// ... to a table this manager owns (the scheduler holds its requests' tables: no lookup).
  int32_t num_blocks_to_append(const BlockTable& table, int32_t num_tokens) const {
    const int32_t num_blocks = static_cast<int32_t>(table.device_blocks.size() + table.host_blocks.size());
    const int32_t num_needed = (table.num_tokens + num_tokens + block_size_ - 1) / block_size_;
    return num_needed > num_blocks ? num_needed - num_blocks : 0;
  }
  bool can_append(RequestId request, int32_t num_tokens) const;

  /// Appends `num_tokens` tokens of KV, allocating device blocks as blocks fill. The request
  /// must be wholly on the device. Returns how many of them rebuild discarded KV (recompute).
  int32_t append_tokens(RequestId request, int32_t num_tokens) { return append_tokens(mutable_table(request), num_tokens); }
  int32_t append_tokens(BlockTable& table, int32_t num_tokens);

  /// Plans moving up to `max_blocks` of the request's exclusive blocks from the back of the
  /// device part to the host (a block another request shares is never moved for one owner).
  /// Returns the copies (device src -> host dst); fewer when the exclusive part or the host
  /// pool runs out. The device sources are released at commit(), cached ones as evictable
  /// with an expected next use at `next_use_s` (< 0: unknown).
  std::vector<BlockCopy> swap_out(RequestId request, int32_t max_blocks, double next_use_s = -1);

  /// Plans moving up to `max_blocks` blocks from the front of the host part to the device.
  /// A block whose content is still cached on the device is taken from there without a copy
  /// (not counted against `max_blocks`). Returns the copies (host src -> device dst); the host
  /// sources are released at commit().
  std::vector<BlockCopy> swap_in(RequestId request, int32_t max_blocks);

  /// Drops the request's references on both tiers and records its tokens as to be recomputed
  /// (a cache hit at re-admission takes back what was not evicted meanwhile). Cached blocks
  /// stay findable, evictable, expected back at `next_use_s` (< 0: unknown). Returns the
  /// number of tokens to recompute.
  int32_t discard(RequestId request, double next_use_s = -1);

  // ---- the prefix cache ----

  /// The longest prefix of `tokens`, at most `max_blocks` full blocks, cached on the device and
  /// continuing on the host.
  CachedPrefix find_cached_prefix(const TokenBlocks& tokens, int32_t max_blocks) const;
  /// Gives an empty table the prefix's blocks (one more reference each). Returns its tokens.
  int32_t adopt_cached_prefix(RequestId request, const CachedPrefix& prefix);
  /// Registers the request's full device blocks with the cache once their KV is written; a
  /// block whose content another block already holds is swapped for that one (one copy kept).
  void cache_full_blocks(RequestId request, const TokenBlocks& tokens) { cache_full_blocks(mutable_table(request), tokens); }
  void cache_full_blocks(BlockTable& table, const TokenBlocks& tokens) {
    // Inline, the common case (a decode whose block has not filled) returns before any call;
    // it leaves the table as it is, so its version need not move.
    if (num_full_blocks(table, tokens) > table.num_cached_blocks) cache_new_full_blocks(table, tokens);
  }
  /// Host offload: plans copying the cached device block `block` (referenced or evictable) to
  /// a host block (evicting the host's least recently used one if need be), `*copy` saying
  /// which. The copy keeps the block's content: a release of it waits for commit(), which
  /// caches the host copy under the same key, unreferenced (evictable, LRU). The caller plans
  /// stores after the step's device allocations, so an evictable source is not reused under it.
  StoreResult store_to_host(BlockId block, BlockCopy* copy);
  /// Re-estimates the next use of the evictable blocks still cached for `tokens`.
  void touch_cached(const TokenBlocks& tokens, double next_use_s);
  /// The request's blocks on `tier` that no other owner references (a suffix of that part).
  int32_t num_exclusive_blocks(RequestId request, Tier tier) const { return num_exclusive_blocks(table(request), tier); }
  int32_t num_exclusive_blocks(const BlockTable& table, Tier tier) const {
    return tier == Tier::kDevice ? device_sharing(table).num_exclusive : num_exclusive_host_blocks(table);
  }
  /// Of the table's shared device blocks (all but the last `num_exclusive`), its share: each
  /// block counts 1 / its owners.
  double shared_block_share(const BlockTable& table, int32_t num_exclusive) const {
    const BlockTable::SharingMemo& memo = device_sharing(table);
    return num_exclusive == memo.num_exclusive ? memo.share : device_share(table, num_exclusive);
  }
  void set_now(double now_s);

  /// Frees the request's blocks and forgets it.
  void free(RequestId request);

  /// Releases the sources of this iteration's copies: the copies have finished.
  void commit();

  const BlockPool& pool(Tier tier) const { return tier == Tier::kDevice ? device_pool_ : host_pool_; }
  int32_t block_size() const { return block_size_; }
  int32_t num_requests() const { return static_cast<int32_t>(tables_.size()); }
  /// Device blocks that commit() will release (sources of planned swap-outs).
  int32_t num_device_blocks_releasing() const { return static_cast<int32_t>(releasing_[0].size()); }

  /// Throws BlockError unless every used block is owned exactly once (by a table or by a
  /// pending release) and each pool's own invariants hold.
  void check_invariants() const;

 private:
  // Every change to a table goes through here or bumps `version` itself.
  BlockTable& mutable_table(RequestId request);
  // Of the table's device blocks, how many are full of KV whose tokens are known.
  int32_t num_full_blocks(const BlockTable& t, const TokenBlocks& tokens) const {
    int32_t num_full = t.num_device_tokens(block_size_) / block_size_;  // <= device_blocks.size()
    return num_full < tokens.num_full_blocks() ? num_full : tokens.num_full_blocks();
  }
  // cache_full_blocks() past its first uncached full block.
  void cache_new_full_blocks(BlockTable& table, const TokenBlocks& tokens);
  // The memo of `t`'s device sharing, brought up to date. Inline: the paused-context passes
  // ask it for every paused context every step, and it is almost always still valid.
  const BlockTable::SharingMemo& device_sharing(const BlockTable& t) const {
    const BlockTable::SharingMemo& memo = t.sharing_memo;
    if (memo.version == t.version && memo.share_epoch == device_pool_.share_epoch() &&
        memo.num_blocks == t.device_blocks.size()) {
      return memo;
    }
    return refresh_device_sharing(t);
  }
  const BlockTable::SharingMemo& refresh_device_sharing(const BlockTable& t) const;
  int32_t num_exclusive_host_blocks(const BlockTable& t) const;
  double device_share(const BlockTable& t, int32_t num_exclusive) const;
  BlockPool& mutable_pool(Tier tier) { return tier == Tier::kDevice ? device_pool_ : host_pool_; }
  // Frees now, or at commit() when a copy planned this iteration still touches the request.
  void release(RequestId request, Tier tier, BlockId block, double next_use_s);
  void free_block(Tier tier, BlockId block, double next_use_s);

  int32_t block_size_;
  BlockPool device_pool_;
  BlockPool host_pool_;
  std::unordered_map<RequestId, BlockTable> tables_;
  struct Release {
    BlockId block;
    double next_use_s;  // < 0: unknown
  };
  std::vector<Release> releasing_[2];           // [tier] blocks released at commit()
  std::vector<BlockCopy> copied_[2];            // [destination tier] copies planned this iteration
  std::unordered_set<RequestId> copying_;       // requests with copies planned this iteration
  std::unordered_set<BlockId> storing_;         // device sources of this iteration's host stores
};

}  // namespace infercept
