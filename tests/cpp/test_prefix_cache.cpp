// The prefix cache: content keys, shared blocks with reference counts, eviction order, and the
// scheduler admitting requests onto cached prefixes (device, then host) without ever moving or
// freeing a block on one owner's behalf while others use it.
#include <gtest/gtest.h>

#include <numeric>
#include <vector>

#include "infercept/block_hash.h"
#include "infercept/block_pool.h"
#include "infercept/errors.h"
#include "scheduler_sim.h"

namespace infercept {
namespace {

using sim_test::iota_tokens;
using sim_test::kBlockSize;
using sim_test::make_config;
using sim_test::Sim;

std::vector<TokenId> concat(std::vector<TokenId> a, const std::vector<TokenId>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

TEST(BlockHash, ChainsParentTokensAndSalt) {
  TokenBlocks a(4, hash_salt("")), b(4, hash_salt("")), salted(4, hash_salt("tenant-b"));
  a.append(iota_tokens(12));
  b.append(iota_tokens(12));
  salted.append(iota_tokens(12));
  ASSERT_EQ(a.num_full_blocks(), 3);
  EXPECT_EQ(a.block_hashes(), b.block_hashes());
  for (int i = 0; i < 3; ++i) EXPECT_NE(a.block_hashes()[i], salted.block_hashes()[i]) << "block " << i;

  // One token different in block 1 splits the chain there and after, not before.
  std::vector<TokenId> other = iota_tokens(12);
  other[5] = 999;
  TokenBlocks c(4, hash_salt(""));
  c.append(other);
  EXPECT_EQ(c.block_hashes()[0], a.block_hashes()[0]);
  EXPECT_NE(c.block_hashes()[1], a.block_hashes()[1]);
  EXPECT_NE(c.block_hashes()[2], a.block_hashes()[2]);  // block 2's tokens are equal: the parent differs
}

TEST(BlockHash, IncrementalAppendHashesEachBlockOnceAsItFills) {
  TokenBlocks whole(4, hash_salt("s")), piecewise(4, hash_salt("s"));
  std::vector<TokenId> tokens = iota_tokens(11);
  whole.append(tokens);
  for (TokenId t : tokens) piecewise.append(&t, 1);
  EXPECT_EQ(whole.block_hashes(), piecewise.block_hashes());
  EXPECT_EQ(piecewise.num_full_blocks(), 2);  // 11 tokens: the third block is partial
  piecewise.truncate_back(4);
  EXPECT_EQ(piecewise.num_full_blocks(), 1);
  EXPECT_THROW(piecewise.truncate_back(8), InvalidArgumentError);
}

TEST(BlockPoolCache, AFreedCachedBlockStaysFindableUntilEvicted) {
  BlockPool pool(Tier::kDevice, 2, 4);
  std::vector<TokenId> tokens = iota_tokens(4);
  BlockHash key = hash_block(hash_salt(""), tokens.data(), 4);
  BlockId a = pool.allocate();
  ASSERT_TRUE(pool.cache(a, key, hash_salt(""), tokens.data(), 0));
  pool.free(a);
  EXPECT_TRUE(pool.is_evictable(a));
  EXPECT_EQ(pool.num_free(), 2);  // cached blocks are free capacity
  EXPECT_EQ(pool.find(key, hash_salt(""), tokens.data()), a);
  // Same key, other tokens (a forged collision): a miss, never the wrong block.
  std::vector<TokenId> other = iota_tokens(4, 50);
  EXPECT_EQ(pool.find(key, hash_salt(""), other.data()), BlockPool::kNoBlock);

  BlockId b = pool.allocate();  // the truly free block goes first
  EXPECT_NE(b, a);
  EXPECT_EQ(pool.find(key, hash_salt(""), tokens.data()), a);
  BlockId c = pool.allocate();  // then the cached one is evicted
  EXPECT_EQ(c, a);
  EXPECT_EQ(pool.find(key, hash_salt(""), tokens.data()), BlockPool::kNoBlock);
  EXPECT_EQ(pool.num_evictions(), 1);
  pool.check_invariants();
}

TEST(BlockPoolCache, EvictsTheBlockWhoseNextUseIsFarthestLeafFirst) {
  BlockPool pool(Tier::kDevice, 4, 1);
  std::vector<BlockId> blocks = pool.allocate(4);
  for (int i = 0; i < 4; ++i) {
    TokenId t = i;
    ASSERT_TRUE(pool.cache(blocks[i], hash_block(0, &t, 1), 0, &t, i));
  }
  pool.set_now(10);
  pool.free(blocks[0]);  // a finished prefix's root, last used at 10
  pool.free(blocks[1]);  // its child, same time: deeper, so it goes first
  pool.free(blocks[2], 30);  // a paused context expecting it back at 30
  pool.free(blocks[3], 12);  // ... and one back at 12
  pool.set_now(15);
  // Gaps at 15: finished 5 s since use; paused: 15 s and (overdue) 0 s away.
  EXPECT_EQ(pool.allocate(), blocks[2]);
  EXPECT_EQ(pool.allocate(), blocks[1]);
  EXPECT_EQ(pool.allocate(), blocks[0]);
  EXPECT_EQ(pool.allocate(), blocks[3]);
  pool.check_invariants();
}

TEST(BlockPoolCache, RetainRevivesAnEvictableBlockAndRegisteringADuplicateKeyIsRefused) {
  BlockPool pool(Tier::kHost, 3, 1);
  TokenId t = 5;
  BlockHash key = hash_block(0, &t, 1);
  BlockId a = pool.allocate(), b = pool.allocate();
  ASSERT_TRUE(pool.cache(a, key, 0, &t, 0));
  EXPECT_FALSE(pool.cache(b, key, 0, &t, 0));  // one block per key: b stays private
  pool.free(a);
  pool.retain(a);
  EXPECT_FALSE(pool.is_evictable(a));
  EXPECT_EQ(pool.ref_count(a), 1);
  pool.free(b);
  EXPECT_THROW(pool.retain(b), BlockError);  // b was private: free means gone
  pool.check_invariants();
}

// ---- the scheduler over a shared system prompt ----

constexpr int32_t kSystem = 4 * kBlockSize;  // a 64-token shared prefix

std::vector<TokenId> system_prompt() { return iota_tokens(kSystem, 1); }
std::vector<TokenId> user_turn(int32_t n, TokenId first) { return concat(system_prompt(), iota_tokens(n, first)); }

TEST(PrefixCacheScheduler, AFinishedRequestsPrefixIsReusedByTheNext) {
  Sim sim(make_config(Policy::kInfercept, 64, 64));
  RequestId a = sim.s.add_request(user_turn(10, 500), 0, 2);
  sim.run_until([&] { return sim.request(a).state == RequestState::kFinished; });
  RequestId b = sim.s.add_request(user_turn(20, 700), sim.now_s, 2);
  sim.step();
  EXPECT_EQ(sim.request(b).num_cached_tokens, kSystem);
  const SchedulerStats stats = sim.s.stats();
  EXPECT_EQ(stats.prefix_cache_hits, kSystem);
  EXPECT_EQ(stats.prefix_cache_queries, 2 * kSystem + 30);
}

TEST(PrefixCacheScheduler, HitsStopAtTheLastFullBlockBeforeTheFinalToken) {
  Sim sim(make_config(Policy::kInfercept, 64, 64));
  RequestId a = sim.s.add_request(iota_tokens(3 * kBlockSize), 0, 1);
  sim.run_until([&] { return sim.request(a).state == RequestState::kFinished; });
  // The same 48 tokens: its last token must be computed to sample, so 2 of 3 blocks hit.
  RequestId b = sim.s.add_request(iota_tokens(3 * kBlockSize), sim.now_s, 1);
  sim.step();
  EXPECT_EQ(sim.request(b).num_cached_tokens, 2 * kBlockSize);
  // One token more: all three blocks hit.
  RequestId c = sim.s.add_request(iota_tokens(3 * kBlockSize + 1), sim.now_s, 1);
  sim.step();
  EXPECT_EQ(sim.request(c).num_cached_tokens, 3 * kBlockSize);
  // A salt keeps another tenant out.
  RequestId d = sim.s.add_request(iota_tokens(3 * kBlockSize + 1), sim.now_s, 1, "tenant-b");
  sim.step();
  EXPECT_EQ(sim.request(d).num_cached_tokens, 0);
}

TEST(PrefixCacheScheduler, SkippingReadsComputesThePromptAndStillFeedsTheCache) {
  Sim sim(make_config(Policy::kInfercept, 64, 64));
  RequestId a = sim.s.add_request(iota_tokens(3 * kBlockSize + 1), 0, 1);
  sim.run_until([&] { return sim.request(a).state == RequestState::kFinished; });
  // Prompt logprobs: the same prompt is computed whole, and its blocks are cached anyway.
  RequestId b = sim.s.add_request(iota_tokens(3 * kBlockSize + 1), sim.now_s, 1, "", true);
  sim.step();
  EXPECT_EQ(sim.request(b).num_cached_tokens, 0);
  EXPECT_EQ(sim.s.stats().prefix_cache_hits, 0);
  RequestId c = sim.s.add_request(iota_tokens(4 * kBlockSize + 1), sim.now_s, 1, "tenant-b", true);
  sim.run_until([&] { return sim.request(c).state == RequestState::kFinished; });
  RequestId d = sim.s.add_request(iota_tokens(4 * kBlockSize + 1), sim.now_s, 1, "tenant-b");
  sim.step();
  EXPECT_EQ(sim.request(d).num_cached_tokens, 4 * kBlockSize);
}

TEST(PrefixCacheScheduler, ConcurrentSharersHoldOneCopyWithReferenceCounts) {
  Sim sim(make_config(Policy::kPreserve, 64, 64));
  RequestId a = sim.s.add_request(user_turn(5, 500), 0, 50);
  sim.run_until_sampled(a);
  RequestId b = sim.s.add_request(user_turn(7, 600), sim.now_s, 50);
  sim.run_until_sampled(b);
  const auto& da = sim.request(a).kv->device_blocks;
  const auto& db = sim.request(b).kv->device_blocks;
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(da[i], db[i]) << "block " << i;
    EXPECT_EQ(sim.s.kv().pool(Tier::kDevice).ref_count(da[i]), 2);
  }
  EXPECT_NE(da[4], db[4]);  // the private tails
  // Aborting one sharer leaves the other intact.
  sim.s.abort(a);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(sim.s.kv().pool(Tier::kDevice).ref_count(db[i]), 1);
  sim.run_until_sampled(b, 3);
  sim.s.check_invariants();
}

TEST(PrefixCacheScheduler, TwoIdenticalPromptsAdmittedTogetherEndWithOneCopy) {
  Sim sim(make_config(Policy::kInfercept, 64, 64));
  RequestId a = sim.s.add_request(user_turn(5, 500), 0, 50);
  RequestId b = sim.s.add_request(user_turn(5, 500), 0, 50);
  sim.step();  // both prefill in one step: nothing to hit yet
  const auto& da = sim.request(a).kv->device_blocks;
  const auto& db = sim.request(b).kv->device_blocks;
  for (int i = 0; i < 4; ++i) EXPECT_EQ(da[i], db[i]) << "block " << i << " was not deduplicated";
}

TEST(PrefixCacheScheduler, ASharedBlockIsNeverSwappedOrDiscardedForOneOwner) {
  for (Policy policy : {Policy::kSwap, Policy::kInfercept, Policy::kDiscard}) {
    SCOPED_TRACE(to_string(policy));
    Sim sim(make_config(policy, 64, 64));
    RequestId runner = sim.s.add_request(user_turn(5, 500), 0, 400);
    sim.run_until_sampled(runner);
    RequestId paused = sim.s.add_request(user_turn(40, 600), sim.now_s, 400);
    sim.run_until_sampled(paused);
    std::vector<BlockId> shared(sim.request(paused).kv->device_blocks.begin(),
                                sim.request(paused).kv->device_blocks.begin() + 4);
    sim.s.intercept(paused, sim.now_s, 100.0);  // a long tool: swap or discard pays
    for (int i = 0; i < 20; ++i) sim.step();
    const Request& p = sim.request(paused);
    const BlockPool& device = sim.s.kv().pool(Tier::kDevice);
    for (BlockId block : shared) {
      EXPECT_EQ(device.ref_count(block), policy == Policy::kDiscard ? 1 : 2) << "block " << block;
      EXPECT_TRUE(device.is_cached(block));
    }
    if (policy == Policy::kSwap) {
      EXPECT_EQ(p.state, RequestState::kSwapped);
      EXPECT_EQ(p.kv->device_blocks, shared);  // only the exclusive suffix went to the host
      EXPECT_EQ(static_cast<int32_t>(p.kv->host_blocks.size()), 3);  // 64 + 40 + 1 tokens: 7 blocks
    }
    sim.s.resume(paused, std::vector<TokenId>{9, 9, 9}, sim.now_s);
    sim.run_until_sampled(paused, 3);
    sim.s.check_invariants();
  }
}

TEST(PrefixCacheScheduler, DiscardKeepsTheBlocksCachedAndTheResumeRecomputesOnlyWhatWasEvicted) {
  Sim sim(make_config(Policy::kDiscard, 64, 64));
  RequestId r = sim.s.add_request(iota_tokens(100), 0, 400);
  sim.run_until_sampled(r);
  sim.s.intercept(r, sim.now_s, 1.0);
  EXPECT_EQ(sim.request(r).kv->num_tokens, 0);
  EXPECT_EQ(sim.s.stats().num_cached_device_blocks, 6);  // 100 tokens: 6 full blocks cached, the tail freed
  sim.s.resume(r, std::vector<TokenId>{7, 7}, sim.now_s);
  int64_t recomputed_before = sim.s.stats().num_recomputed_tokens;
  sim.run_until_sampled(r, 2);
  // KV of 100 prompt tokens held before: 96 come back from the cache, 4 are rebuilt.
  EXPECT_EQ(sim.s.stats().num_recomputed_tokens - recomputed_before, 4);
}

TEST(PrefixCacheScheduler, AHostHitIsPlannedAsASwapInWithinTheBudget) {
  // A tiny device pool: the first request's blocks get evicted from it but stay on the host.
  SchedulerConfig config = make_config(Policy::kSwap, 8, 64);
  Sim sim(config);
  RequestId a = sim.s.add_request(iota_tokens(6 * kBlockSize + 3), 0, 400);
  sim.run_until_sampled(a);
  sim.s.intercept(a, sim.now_s, 100.0);
  sim.step();  // swapped out: the device copies stay cached, evictable
  ASSERT_EQ(sim.request(a).state, RequestState::kSwapped);
  RequestId filler = sim.s.add_request(iota_tokens(7 * kBlockSize, 5000), sim.now_s, 1);  // evicts them
  sim.run_until([&] { return sim.request(filler).state == RequestState::kFinished; });
  sim.s.abort(a);  // its host blocks stay cached on the host
  EXPECT_GT(sim.s.stats().num_cached_host_blocks, 0);

  // The filler evicted a's device copies deepest first: only block 0 is left there.
  RequestId b = sim.s.add_request(iota_tokens(6 * kBlockSize + 10), sim.now_s, 2);
  Sim::Step st = sim.step();
  EXPECT_EQ(st.plan.swap_in.size(), 5u);  // blocks 1-5 come from the host, within the budget
  EXPECT_LE(static_cast<int64_t>(st.plan.swap_in.size()), std::max<int64_t>(1, st.plan.swap_budget_tokens / kBlockSize));
  EXPECT_EQ(st.plan.num_recompute_tokens, 0);
  sim.run_until_sampled(b);
  EXPECT_EQ(sim.request(b).num_cached_tokens, 6 * kBlockSize);
  EXPECT_EQ(sim.s.stats().prefix_cache_host_hits, 5 * kBlockSize);
}

TEST(PrefixCacheScheduler, SwapInTakesBlocksStillCachedOnTheDeviceWithoutACopy) {
  Sim sim(make_config(Policy::kSwap, 64, 64));
  RequestId r = sim.s.add_request(iota_tokens(5 * kBlockSize + 2), 0, 400);
  sim.run_until_sampled(r);
  sim.s.intercept(r, sim.now_s, 100.0);
  sim.step();
  ASSERT_EQ(sim.request(r).state, RequestState::kSwapped);
  sim.s.resume(r, std::vector<TokenId>{3}, sim.now_s);
  Sim::Step st = sim.step();
  // The five full blocks come back from the device cache; only the private tail is copied.
  EXPECT_EQ(st.plan.swap_in.size(), 1u);
  sim.run_until_sampled(r, 2);
}

TEST(PrefixCacheScheduler, OffMeansNoHitsAndTheVllm02PolicyNeverCaches) {
  SchedulerConfig off = make_config(Policy::kInfercept, 64, 64);
  off.enable_prefix_caching = false;
  for (const SchedulerConfig& config : {off, make_config(Policy::kVllm02, 64, 64)}) {
    Sim sim(config);
    RequestId a = sim.s.add_request(user_turn(5, 500), 0, 1);
    sim.run_until([&] { return sim.request(a).state == RequestState::kFinished; });
    RequestId b = sim.s.add_request(user_turn(5, 500), sim.now_s, 1);
    sim.step();
    EXPECT_EQ(sim.request(b).num_cached_tokens, 0);
    EXPECT_EQ(sim.s.stats().num_cached_device_blocks, 0);
  }
}

TEST(PrefixCacheScheduler, BadTokenIdsAndMismatchedResultsAreRefusedLeavingNothingBehind) {
  SchedulerConfig config = make_config(Policy::kInfercept, 64, 64);
  config.vocab_size = 100;
  Scheduler s(config, sim_test::gptj());
  EXPECT_THROW(s.add_request(std::vector<TokenId>{1, 2, 100}, 0), InvalidArgumentError);
  EXPECT_THROW(s.add_request(std::vector<TokenId>{-1}, 0), InvalidArgumentError);
  EXPECT_EQ(s.num_live_requests(), 0);
  RequestId r = s.add_request(std::vector<TokenId>{1, 2, 3}, 0);
  StepPlan plan = s.schedule(0);
  EXPECT_THROW(s.update(plan, StepResult{0.01}, 0.01), InvalidArgumentError);  // no sampled id
  StepResult bad{0.01};
  bad.sampled_token_ids = {100};
  EXPECT_THROW(s.update(plan, bad, 0.01), InvalidArgumentError);  // outside the vocabulary
  StepResult good{0.01};
  good.sampled_token_ids = {42};
  s.update(plan, good, 0.01);
  EXPECT_EQ(s.request(r).num_generated_tokens, 1);
  EXPECT_EQ(s.request(r).tokens.tokens().back(), 42);
  s.abort(r);
  s.remove(r);
  s.check_invariants();
  EXPECT_EQ(s.kv().pool(Tier::kDevice).num_free(), 64);
}

}  // namespace
}  // namespace infercept
