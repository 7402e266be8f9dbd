#include "infercept/kv_cache_manager.h"

#include <algorithm>
#include <string>

#include "infercept/errors.h"

namespace infercept {
namespace {

int32_t blocks_for(int32_t num_tokens, int32_t block_size) {
  return (num_tokens + block_size - 1) / block_size;
}

// The blocks no other owner references: a suffix of `blocks`. Sharing is a prefix of the
// table (keys chain, and cache_full_blocks keeps one copy of each content), so reference
// counts never rise along it: binary search for the first block held once. O(log n).
int32_t count_exclusive(const std::vector<BlockId>& blocks, const BlockPool& p) {
  if (blocks.empty() || p.ref_count(blocks.front()) == 1) return static_cast<int32_t>(blocks.size());  // nothing shared
  if (p.ref_count(blocks.back()) > 1) return 0;  // all shared
  auto first_exclusive = std::partition_point(blocks.begin(), blocks.end(),
                                              [&](BlockId block) { return p.ref_count(block) > 1; });
  return static_cast<int32_t>(blocks.end() - first_exclusive);
}

// Of the shared blocks (all but the last `num_exclusive`), the share: each counts 1 / its
// owners. Reference counts form a few runs of equal values: one binary search per run.
double share_of(const std::vector<BlockId>& blocks, int32_t num_exclusive, const BlockPool& p) {
  int32_t num_shared = static_cast<int32_t>(blocks.size()) - num_exclusive;
  double share = 0;
  auto it = blocks.begin(), end = blocks.begin() + num_shared;
  while (it != end) {
    int32_t count = p.ref_count(*it);
    auto run_end = std::partition_point(it, end, [&](BlockId block) { return p.ref_count(block) >= count; });
    share += static_cast<double>(run_end - it) / count;
    it = run_end;
  }
  return share;
}

}  // namespace

KvCacheManager::KvCacheManager(int32_t block_size, int32_t num_device_blocks, int32_t num_host_blocks)
    : block_size_(block_size),
      device_pool_(Tier::kDevice, num_device_blocks, block_size),
      host_pool_(Tier::kHost, num_host_blocks, block_size) {}

BlockTable& KvCacheManager::add(RequestId request) {
  auto [it, inserted] = tables_.try_emplace(request);
  if (!inserted) throw StateError("request " + std::to_string(request) + " already has a block table");
  it->second.request_id = request;
  return it->second;
}

const BlockTable& KvCacheManager::table(RequestId request) const {
  auto it = tables_.find(request);
  if (it == tables_.end()) throw UnknownRequestError("no block table for request " + std::to_string(request));
  return it->second;
}

BlockTable& KvCacheManager::mutable_table(RequestId request) {
  BlockTable& t = const_cast<BlockTable&>(static_cast<const KvCacheManager*>(this)->table(request));
  ++t.version;
  return t;
}

bool KvCacheManager::can_append(RequestId request, int32_t num_tokens) const {
  return device_pool_.can_allocate(num_blocks_to_append(request, num_tokens));
}

int32_t KvCacheManager::append_tokens(BlockTable& t, int32_t num_tokens) {
  if (num_tokens < 0) {
    throw InvalidArgumentError("cannot append " + std::to_string(num_tokens) + " tokens");
  }
  ++t.version;
  if (!t.is_on_device()) {
    throw StateError("request " + std::to_string(t.request_id) + " has " +
                     std::to_string(t.host_blocks.size()) +
                     " blocks on the host; swap them in before appending");
  }
  int32_t num_fresh = num_blocks_to_append(t, num_tokens);
  if (num_fresh == 1 && device_pool_.num_free() > 0) {
    t.device_blocks.push_back(device_pool_.allocate());  // a decode's new block: no temporary vector
  } else if (num_fresh > 0) {
    std::vector<BlockId> fresh = device_pool_.allocate(num_fresh);
    t.device_blocks.insert(t.device_blocks.end(), fresh.begin(), fresh.end());
  }
  t.num_tokens += num_tokens;
  int32_t num_recomputed = std::min(num_tokens, t.num_tokens_to_recompute);
  t.num_tokens_to_recompute -= num_recomputed;
  return num_recomputed;
}

std::vector<BlockCopy> KvCacheManager::swap_out(RequestId request, int32_t max_blocks, double next_use_s) {
  BlockTable& t = mutable_table(request);
  int32_t num_moves = std::min({max_blocks, num_exclusive_blocks(request, Tier::kDevice), host_pool_.num_free()});
  if (num_moves <= 0) return {};
  std::vector<BlockCopy> copies(num_moves);
  // The last device block goes first and lands at the front of the host part.
  std::vector<BlockId> moved_host(num_moves);
  for (int32_t i = 0; i < num_moves; ++i) {
    BlockId src = t.device_blocks[t.device_blocks.size() - num_moves + i];
    if (device_pool_.ref_count(src) != 1) {
      throw BlockError("request " + std::to_string(request) + " would swap out device block " + std::to_string(src) +
                       " that " + std::to_string(device_pool_.ref_count(src)) + " owners share");
    }
    BlockId dst = host_pool_.allocate();
    copies[i] = {src, dst};
    moved_host[i] = dst;
    releasing_[static_cast<int>(Tier::kDevice)].push_back({src, next_use_s});
  }
  t.device_blocks.resize(t.device_blocks.size() - num_moves);
  t.num_cached_blocks = std::min<int32_t>(t.num_cached_blocks, static_cast<int32_t>(t.device_blocks.size()));
  t.host_blocks.insert(t.host_blocks.begin(), moved_host.begin(), moved_host.end());
  copied_[static_cast<int>(Tier::kHost)].insert(copied_[static_cast<int>(Tier::kHost)].end(), copies.begin(),
                                                 copies.end());
  copying_.insert(request);
  return copies;
}

std::vector<BlockCopy> KvCacheManager::swap_in(RequestId request, int32_t max_blocks) {
  BlockTable& t = mutable_table(request);
  std::vector<BlockCopy> copies;
  size_t num_taken = 0;
  for (; num_taken < t.host_blocks.size(); ++num_taken) {
    BlockId src = t.host_blocks[num_taken];
    // Still on the device from before the swap-out (or another request's): no copy needed.
    BlockId cached = host_pool_.is_cached(src) ? device_pool_.find(host_pool_.hash_of(src), host_pool_.parent_of(src),
                                                                  host_pool_.tokens_of(src))
                                               : BlockPool::kNoBlock;
    if (cached != BlockPool::kNoBlock) {
      device_pool_.retain(cached);
      t.device_blocks.push_back(cached);
    } else {
      if (static_cast<int32_t>(copies.size()) >= max_blocks || device_pool_.num_free() == 0) break;
      BlockId dst = device_pool_.allocate();
      copies.push_back({src, dst});
      t.device_blocks.push_back(dst);
    }
    releasing_[static_cast<int>(Tier::kHost)].push_back({src, -1});
  }
  if (num_taken == 0) return {};
  t.host_blocks.erase(t.host_blocks.begin(), t.host_blocks.begin() + static_cast<ptrdiff_t>(num_taken));
  copied_[static_cast<int>(Tier::kDevice)].insert(copied_[static_cast<int>(Tier::kDevice)].end(), copies.begin(),
                                                   copies.end());
  copying_.insert(request);
  return copies;
}

void KvCacheManager::free_block(Tier tier, BlockId block, double next_use_s) {
  if (next_use_s >= 0) mutable_pool(tier).free(block, next_use_s);
  else mutable_pool(tier).free(block);
}

void KvCacheManager::release(RequestId request, Tier tier, BlockId block, double next_use_s) {
  if (copying_.count(request) || (tier == Tier::kDevice && storing_.count(block))) {
    releasing_[static_cast<int>(tier)].push_back({block, next_use_s});
  } else {
    free_block(tier, block, next_use_s);
  }
}

int32_t KvCacheManager::discard(RequestId request, double next_use_s) {
  BlockTable& t = mutable_table(request);
  // The leaf first: it becomes evictable last-in, so equal keys evict it before its parents.
  for (auto it = t.device_blocks.rbegin(); it != t.device_blocks.rend(); ++it) {
    release(request, Tier::kDevice, *it, next_use_s);
  }
  for (auto it = t.host_blocks.rbegin(); it != t.host_blocks.rend(); ++it) {
    release(request, Tier::kHost, *it, next_use_s);
  }
  t.device_blocks.clear();
  t.host_blocks.clear();
  t.num_cached_blocks = 0;
  t.num_tokens_to_recompute += t.num_tokens;
  t.num_tokens = 0;
  return t.num_tokens_to_recompute;
}

void KvCacheManager::free(RequestId request) {
  discard(request);
  tables_.erase(request);
}

void KvCacheManager::commit() {
  // The copies have landed: each destination now holds its source's content.
  for (int dst_tier = 0; dst_tier < 2; ++dst_tier) {
    BlockPool& dst_pool = mutable_pool(static_cast<Tier>(dst_tier));
    const BlockPool& src_pool = pool(static_cast<Tier>(1 - dst_tier));
    for (const BlockCopy& copy : copied_[dst_tier]) {
      if (!src_pool.is_cached(copy.src) || dst_pool.ref_count(copy.dst) == 0 || dst_pool.is_cached(copy.dst)) continue;
      dst_pool.cache(copy.dst, src_pool.hash_of(copy.src), src_pool.parent_of(copy.src), src_pool.tokens_of(copy.src),
                     src_pool.depth_of(copy.src));
    }
    copied_[dst_tier].clear();
  }
  for (int tier = 0; tier < 2; ++tier) {
    for (const Release& r : releasing_[tier]) free_block(static_cast<Tier>(tier), r.block, r.next_use_s);
    releasing_[tier].clear();
  }
  copying_.clear();
  storing_.clear();
}

StoreResult KvCacheManager::store_to_host(BlockId block, BlockCopy* copy) {
  if (!device_pool_.is_cached(block)) {
    throw BlockError("cannot store device block " + std::to_string(block) + " to the host: its content is not cached");
  }
  if (storing_.count(block) ||
      host_pool_.find(device_pool_.hash_of(block), device_pool_.parent_of(block), device_pool_.tokens_of(block)) !=
          BlockPool::kNoBlock) {
    return StoreResult::kAlreadyStored;
  }
  if (host_pool_.num_free() == 0) return StoreResult::kNoRoom;
  BlockId dst = host_pool_.allocate();
  *copy = {block, dst};
  copied_[static_cast<int>(Tier::kHost)].push_back(*copy);
  // The host block is nobody's: commit() caches it, then this release makes it evictable.
  releasing_[static_cast<int>(Tier::kHost)].push_back({dst, -1});
  storing_.insert(block);
  return StoreResult::kStored;
}

// ---- the prefix cache ---------------------------------------------------------------------

void KvCacheManager::set_now(double now_s) {
  device_pool_.set_now(now_s);
  host_pool_.set_now(now_s);
}

CachedPrefix KvCacheManager::find_cached_prefix(const TokenBlocks& tokens, int32_t max_blocks) const {
  CachedPrefix prefix;
  int32_t limit = std::min(max_blocks, tokens.num_full_blocks());
  int32_t index = 0;
  for (const BlockPool* p : {&device_pool_, &host_pool_}) {
    auto& blocks = p == &device_pool_ ? prefix.device_blocks : prefix.host_blocks;
    for (; index < limit; ++index) {
      BlockId block = p->find(tokens.block_hashes()[index], tokens.parent_hash(index), tokens.block_tokens(index));
      if (block == BlockPool::kNoBlock) break;
      blocks.push_back(block);
      if (p == &device_pool_ && p->ref_count(block) == 0) ++prefix.num_evictable_device_blocks;
    }
  }
  return prefix;
}

int32_t KvCacheManager::adopt_cached_prefix(RequestId request, const CachedPrefix& prefix) {
  BlockTable& t = mutable_table(request);
  if (t.num_tokens != 0 || !t.device_blocks.empty() || !t.host_blocks.empty()) {
    throw StateError("request " + std::to_string(request) + " holds KV for " + std::to_string(t.num_tokens) +
                     " tokens; only an empty table can adopt a cached prefix");
  }
  for (BlockId block : prefix.device_blocks) device_pool_.retain(block);
  for (BlockId block : prefix.host_blocks) host_pool_.retain(block);
  t.device_blocks = prefix.device_blocks;
  t.host_blocks = prefix.host_blocks;
  t.num_cached_blocks = static_cast<int32_t>(prefix.device_blocks.size());
  t.num_tokens = prefix.num_blocks() * block_size_;
  // What comes back from the cache needs no recompute.
  t.num_tokens_to_recompute -= std::min(t.num_tokens_to_recompute, t.num_tokens);
  return t.num_tokens;
}

void KvCacheManager::cache_new_full_blocks(BlockTable& t, const TokenBlocks& tokens) {
  ++t.version;
  int32_t num_full = num_full_blocks(t, tokens);
  for (int32_t index = t.num_cached_blocks; index < num_full; ++index) {
    BlockId& block = t.device_blocks[index];
    if (device_pool_.is_cached(block)) continue;
    BlockHash hash = tokens.block_hashes()[index];
    BlockHash parent = tokens.parent_hash(index);
    const TokenId* block_tokens = tokens.block_tokens(index);
    if (device_pool_.cache(block, hash, parent, block_tokens, index)) continue;
    BlockId existing = device_pool_.find(hash, parent, block_tokens);
    if (existing == BlockPool::kNoBlock || device_pool_.ref_count(block) != 1) continue;  // a collision: stays private
    // Two requests computed the same block: keep one copy, so sharing stays a prefix of tables.
    device_pool_.retain(existing);
    device_pool_.free(block);
    block = existing;
  }
  t.num_cached_blocks = std::max(t.num_cached_blocks, num_full);
}

void KvCacheManager::touch_cached(const TokenBlocks& tokens, double next_use_s) {
  for (int32_t index = 0; index < tokens.num_full_blocks(); ++index) {
    BlockId block = device_pool_.find(tokens.block_hashes()[index], tokens.parent_hash(index), tokens.block_tokens(index));
    if (block == BlockPool::kNoBlock) return;
    device_pool_.touch(block, next_use_s);
  }
}

int32_t KvCacheManager::num_exclusive_host_blocks(const BlockTable& t) const {
  return count_exclusive(t.host_blocks, host_pool_);
}

double KvCacheManager::device_share(const BlockTable& t, int32_t num_exclusive) const {
  return share_of(t.device_blocks, num_exclusive, device_pool_);
}

const BlockTable::SharingMemo& KvCacheManager::refresh_device_sharing(const BlockTable& t) const {
  BlockTable::SharingMemo& memo = t.sharing_memo;
  memo.version = t.version;
  memo.share_epoch = device_pool_.share_epoch();
  memo.num_blocks = t.device_blocks.size();
  memo.num_exclusive = count_exclusive(t.device_blocks, device_pool_);
  memo.share = share_of(t.device_blocks, memo.num_exclusive, device_pool_);
  return memo;
}

void KvCacheManager::check_invariants() const {
  device_pool_.check_invariants();
  host_pool_.check_invariants();
  for (int tier = 0; tier < 2; ++tier) {
    const BlockPool& p = pool(static_cast<Tier>(tier));
    std::vector<int32_t> owners(p.num_blocks(), 0);
    auto own = [&](BlockId block, const std::string& who) {
      if (block < 0 || block >= p.num_blocks()) {
        throw BlockError(who + " holds " + to_string(p.tier()) + " block " + std::to_string(block) +
                         " outside [0, " + std::to_string(p.num_blocks()) + ")");
      }
      ++owners[block];
    };
    for (const auto& [request, t] : tables_) {
      const auto& blocks = tier == 0 ? t.device_blocks : t.host_blocks;
      for (BlockId block : blocks) own(block, "request " + std::to_string(request));
    }
    for (const Release& r : releasing_[tier]) own(r.block, "the pending release list");
    for (BlockId block = 0; block < p.num_blocks(); ++block) {
      if (owners[block] != p.ref_count(block)) {
        throw BlockError(std::string(to_string(p.tier())) + " block " + std::to_string(block) +
                         " has " + std::to_string(owners[block]) + " owners but reference count " +
                         std::to_string(p.ref_count(block)));
      }
    }
  }
  for (const auto& [request, t] : tables_) {
    int32_t num_blocks = static_cast<int32_t>(t.device_blocks.size() + t.host_blocks.size());
    if (num_blocks != blocks_for(t.num_tokens, block_size_)) {
      throw BlockError("request " + std::to_string(request) + " holds " + std::to_string(num_blocks) +
                       " blocks for " + std::to_string(t.num_tokens) + " tokens");
    }
  }
}

}  // namespace infercept
