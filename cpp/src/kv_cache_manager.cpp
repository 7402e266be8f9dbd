#include "infercept/kv_cache_manager.h"

#include <algorithm>
#include <string>

#include "infercept/errors.h"

namespace infercept {
namespace {

int32_t blocks_for(int32_t num_tokens, int32_t block_size) {
  return (num_tokens + block_size - 1) / block_size;
}

}  // namespace

int32_t BlockTable::num_device_tokens(int32_t block_size) const {
  return std::min(num_tokens, static_cast<int32_t>(device_blocks.size()) * block_size);
}

KvCacheManager::KvCacheManager(int32_t block_size, int32_t num_device_blocks, int32_t num_host_blocks)
    : block_size_(block_size),
      device_pool_(Tier::kDevice, num_device_blocks),
      host_pool_(Tier::kHost, num_host_blocks) {
  if (block_size <= 0) {
    throw InvalidArgumentError("block_size must be positive, got " + std::to_string(block_size));
  }
}

BlockTable& KvCacheManager::add(RequestId request) {
  auto [it, inserted] = tables_.try_emplace(request);
  if (!inserted) throw StateError("request " + std::to_string(request) + " already has a block table");
  return it->second;
}

const BlockTable& KvCacheManager::table(RequestId request) const {
  auto it = tables_.find(request);
  if (it == tables_.end()) throw UnknownRequestError("no block table for request " + std::to_string(request));
  return it->second;
}

BlockTable& KvCacheManager::mutable_table(RequestId request) {
  return const_cast<BlockTable&>(static_cast<const KvCacheManager*>(this)->table(request));
}

int32_t KvCacheManager::num_blocks_to_append(RequestId request, int32_t num_tokens) const {
  const BlockTable& t = table(request);
  int32_t num_blocks = static_cast<int32_t>(t.device_blocks.size() + t.host_blocks.size());
  return std::max(0, blocks_for(t.num_tokens + num_tokens, block_size_) - num_blocks);
}

bool KvCacheManager::can_append(RequestId request, int32_t num_tokens) const {
  return device_pool_.can_allocate(num_blocks_to_append(request, num_tokens));
}

int32_t KvCacheManager::append_tokens(RequestId request, int32_t num_tokens) {
  if (num_tokens < 0) {
    throw InvalidArgumentError("cannot append " + std::to_string(num_tokens) + " tokens");
  }
  BlockTable& t = mutable_table(request);
  if (!t.is_on_device()) {
    throw StateError("request " + std::to_string(request) + " has " +
                     std::to_string(t.host_blocks.size()) +
                     " blocks on the host; swap them in before appending");
  }
  std::vector<BlockId> fresh = device_pool_.allocate(num_blocks_to_append(request, num_tokens));
  t.device_blocks.insert(t.device_blocks.end(), fresh.begin(), fresh.end());
  t.num_tokens += num_tokens;
  int32_t num_recomputed = std::min(num_tokens, t.num_tokens_to_recompute);
  t.num_tokens_to_recompute -= num_recomputed;
  return num_recomputed;
}

std::vector<BlockCopy> KvCacheManager::swap_out(RequestId request, int32_t max_blocks) {
  BlockTable& t = mutable_table(request);
  int32_t num_moves = std::min({max_blocks, static_cast<int32_t>(t.device_blocks.size()), host_pool_.num_free()});
  if (num_moves <= 0) return {};
  std::vector<BlockCopy> copies(num_moves);
  // The last device block goes first and lands at the front of the host part.
  std::vector<BlockId> moved_host(num_moves);
  for (int32_t i = 0; i < num_moves; ++i) {
    BlockId src = t.device_blocks[t.device_blocks.size() - num_moves + i];
    BlockId dst = host_pool_.allocate();
    copies[i] = {src, dst};
    moved_host[i] = dst;
    releasing_[static_cast<int>(Tier::kDevice)].push_back(src);
  }
  t.device_blocks.resize(t.device_blocks.size() - num_moves);
  t.host_blocks.insert(t.host_blocks.begin(), moved_host.begin(), moved_host.end());
  copying_.insert(request);
  return copies;
}

std::vector<BlockCopy> KvCacheManager::swap_in(RequestId request, int32_t max_blocks) {
  BlockTable& t = mutable_table(request);
  int32_t num_moves = std::min({max_blocks, static_cast<int32_t>(t.host_blocks.size()), device_pool_.num_free()});
  if (num_moves <= 0) return {};
  std::vector<BlockCopy> copies(num_moves);
  for (int32_t i = 0; i < num_moves; ++i) {
    BlockId src = t.host_blocks[i];
    BlockId dst = device_pool_.allocate();
    copies[i] = {src, dst};
    t.device_blocks.push_back(dst);
    releasing_[static_cast<int>(Tier::kHost)].push_back(src);
  }
  t.host_blocks.erase(t.host_blocks.begin(), t.host_blocks.begin() + num_moves);
  copying_.insert(request);
  return copies;
}

void KvCacheManager::release(RequestId request, Tier tier, BlockId block) {
  if (copying_.count(request)) {
    releasing_[static_cast<int>(tier)].push_back(block);
  } else {
    mutable_pool(tier).free(block);
  }
}

int32_t KvCacheManager::discard(RequestId request) {
  BlockTable& t = mutable_table(request);
  for (BlockId block : t.device_blocks) release(request, Tier::kDevice, block);
  for (BlockId block : t.host_blocks) release(request, Tier::kHost, block);
  t.device_blocks.clear();
  t.host_blocks.clear();
  t.num_tokens_to_recompute += t.num_tokens;
  t.num_tokens = 0;
  return t.num_tokens_to_recompute;
}

void KvCacheManager::free(RequestId request) {
  discard(request);
  tables_.erase(request);
}

void KvCacheManager::commit() {
  for (BlockId block : releasing_[0]) device_pool_.free(block);
  for (BlockId block : releasing_[1]) host_pool_.free(block);
  releasing_[0].clear();
  releasing_[1].clear();
  copying_.clear();
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
    for (BlockId block : releasing_[tier]) own(block, "the pending release list");
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
