// KvCacheManager: per-request block tables over a device and a host pool. The device part of a
// table is a prefix of the request's logical blocks and the host part the suffix, so swaps can
// stop after any block and continue later.
#include "infercept/kv_cache_manager.h"

#include <gtest/gtest.h>

#include <vector>

#include "infercept/errors.h"

namespace infercept {
namespace {

constexpr int32_t kBlockSize = 4;         // tokens per block: small so block boundaries are easy to hit
constexpr int32_t kNumDeviceBlocks = 16;
constexpr int32_t kNumHostBlocks = 16;
constexpr RequestId kRequest = 7;

class KvCacheManagerTest : public ::testing::Test {
 protected:
  KvCacheManager kv{kBlockSize, kNumDeviceBlocks, kNumHostBlocks};

  const BlockPool& device() const { return kv.pool(Tier::kDevice); }
  const BlockPool& host() const { return kv.pool(Tier::kHost); }
  // Logical block order: device prefix, then host suffix.
  std::vector<BlockId> logical_blocks(RequestId request) const {
    const BlockTable& t = kv.table(request);
    std::vector<BlockId> blocks = t.device_blocks;
    blocks.insert(blocks.end(), t.host_blocks.begin(), t.host_blocks.end());
    return blocks;
  }
  std::vector<BlockId> sources(const std::vector<BlockCopy>& copies) const {
    std::vector<BlockId> ids;
    for (const BlockCopy& c : copies) ids.push_back(c.src);
    return ids;
  }
  std::vector<BlockId> destinations(const std::vector<BlockCopy>& copies) const {
    std::vector<BlockId> ids;
    for (const BlockCopy& c : copies) ids.push_back(c.dst);
    return ids;
  }
};

// ---- appending ----------------------------------------------------------------------------

TEST_F(KvCacheManagerTest, NewRequestHasAnEmptyTable) {
  kv.add(kRequest);
  const BlockTable& t = kv.table(kRequest);
  EXPECT_TRUE(t.device_blocks.empty());
  EXPECT_TRUE(t.host_blocks.empty());
  EXPECT_EQ(t.num_tokens, 0);
  EXPECT_TRUE(kv.contains(kRequest));
  EXPECT_EQ(kv.num_requests(), 1);
}

TEST_F(KvCacheManagerTest, AddingARequestTwiceIsAStateError) {
  kv.add(kRequest);
  EXPECT_THROW(kv.add(kRequest), StateError);
}

TEST_F(KvCacheManagerTest, UnknownRequestRaisesUnknownRequestError) {
  EXPECT_THROW(kv.table(kRequest), UnknownRequestError);
  EXPECT_THROW(kv.append_tokens(kRequest, 1), UnknownRequestError);
  EXPECT_THROW(kv.swap_out(kRequest, 1), UnknownRequestError);
  EXPECT_THROW(kv.swap_in(kRequest, 1), UnknownRequestError);
  EXPECT_THROW(kv.discard(kRequest), UnknownRequestError);
  EXPECT_THROW(kv.free(kRequest), UnknownRequestError);
}

TEST_F(KvCacheManagerTest, AppendAllocatesABlockOnlyWhenTheLastOneIsFull) {
  kv.add(kRequest);
  // 5 tokens: one full block and one with a single token.
  EXPECT_EQ(kv.num_blocks_to_append(kRequest, 5), 2);
  kv.append_tokens(kRequest, 5);
  EXPECT_EQ(kv.table(kRequest).device_blocks.size(), 2u);
  // 3 more fill the second block exactly: no new block.
  EXPECT_EQ(kv.num_blocks_to_append(kRequest, 3), 0);
  kv.append_tokens(kRequest, 3);
  EXPECT_EQ(kv.table(kRequest).device_blocks.size(), 2u);
  EXPECT_EQ(kv.table(kRequest).num_tokens, 8);
  // The 9th token starts a third block.
  EXPECT_EQ(kv.num_blocks_to_append(kRequest, 1), 1);
  kv.append_tokens(kRequest, 1);
  EXPECT_EQ(kv.table(kRequest).device_blocks.size(), 3u);
  EXPECT_EQ(device().num_used(), 3);
  EXPECT_NO_THROW(kv.check_invariants());
}

TEST_F(KvCacheManagerTest, AppendBeyondTheDevicePoolRaisesOutOfBlocksAndKeepsTheTable) {
  kv.add(kRequest);
  kv.append_tokens(kRequest, kNumDeviceBlocks * kBlockSize);  // the whole pool
  EXPECT_FALSE(kv.can_append(kRequest, 1));
  EXPECT_THROW(kv.append_tokens(kRequest, 1), OutOfBlocksError);
  EXPECT_EQ(kv.table(kRequest).num_tokens, kNumDeviceBlocks * kBlockSize);
  EXPECT_NO_THROW(kv.check_invariants());
}

TEST_F(KvCacheManagerTest, NegativeAppendIsAnInvalidArgument) {
  kv.add(kRequest);
  EXPECT_THROW(kv.append_tokens(kRequest, -1), InvalidArgumentError);
}

TEST_F(KvCacheManagerTest, AppendWhilePartlyOnTheHostIsAStateError) {
  // New KV goes after the last token, which lives on the host: it must come back first.
  kv.add(kRequest);
  kv.append_tokens(kRequest, 8);
  kv.swap_out(kRequest, 1);
  kv.commit();
  EXPECT_THROW(kv.append_tokens(kRequest, 1), StateError);
}

// ---- swapping -----------------------------------------------------------------------------

TEST_F(KvCacheManagerTest, SwapOutMovesBlocksFromTheBackAndKeepsLogicalOrder) {
  kv.add(kRequest);
  kv.append_tokens(kRequest, 5 * kBlockSize);  // 5 full blocks
  const std::vector<BlockId> before = kv.table(kRequest).device_blocks;

  // Two calls of two blocks each, as two iterations with a budget of two blocks would make.
  std::vector<BlockCopy> first = kv.swap_out(kRequest, 2);
  EXPECT_EQ(sources(first), (std::vector<BlockId>{before[3], before[4]}));
  kv.commit();
  std::vector<BlockCopy> second = kv.swap_out(kRequest, 2);
  EXPECT_EQ(sources(second), (std::vector<BlockId>{before[1], before[2]}));
  kv.commit();

  const BlockTable& t = kv.table(kRequest);
  EXPECT_EQ(t.device_blocks, (std::vector<BlockId>{before[0]}));
  // The host part holds logical blocks 1..4 in order: each call's copies land at its front.
  std::vector<BlockId> expected_host = destinations(second);
  for (BlockId block : destinations(first)) expected_host.push_back(block);
  EXPECT_EQ(t.host_blocks, expected_host);
  EXPECT_EQ(t.num_tokens, 5 * kBlockSize);
  EXPECT_EQ(t.num_device_tokens(kBlockSize), kBlockSize);
  EXPECT_EQ(t.num_host_tokens(kBlockSize), 4 * kBlockSize);
  EXPECT_FALSE(t.is_on_device());
  EXPECT_NO_THROW(kv.check_invariants());
}

TEST_F(KvCacheManagerTest, PartialLastBlockCountsItsTokensOnTheHost) {
  kv.add(kRequest);
  kv.append_tokens(kRequest, 9);  // blocks of 4, 4 and 1 token(s)
  kv.swap_out(kRequest, 1);       // the 1-token block goes out
  EXPECT_EQ(kv.table(kRequest).num_device_tokens(kBlockSize), 8);
  EXPECT_EQ(kv.table(kRequest).num_host_tokens(kBlockSize), 1);
}

TEST_F(KvCacheManagerTest, SwapOutSourcesAreReleasedOnlyAtCommit) {
  // The executor copies from the device blocks during the step: they must not be reused before.
  kv.add(kRequest);
  kv.append_tokens(kRequest, 3 * kBlockSize);
  std::vector<BlockCopy> copies = kv.swap_out(kRequest, 3);
  ASSERT_EQ(copies.size(), 3u);
  EXPECT_EQ(device().num_used(), 3);
  EXPECT_EQ(host().num_used(), 3);
  EXPECT_EQ(kv.num_device_blocks_releasing(), 3);
  for (const BlockCopy& c : copies) EXPECT_EQ(device().ref_count(c.src), 1) << c.src;
  EXPECT_NO_THROW(kv.check_invariants());  // the pending release list owns the sources

  kv.commit();
  for (const BlockCopy& c : copies) {
    EXPECT_EQ(device().ref_count(c.src), 0) << c.src;
    EXPECT_EQ(host().ref_count(c.dst), 1) << c.dst;
  }
  EXPECT_EQ(device().num_used(), 0);
  EXPECT_EQ(kv.num_device_blocks_releasing(), 0);
  EXPECT_NO_THROW(kv.check_invariants());
}

TEST_F(KvCacheManagerTest, SwapInMovesBlocksFromTheFrontAndAppendsThemToTheDevicePart) {
  kv.add(kRequest);
  kv.append_tokens(kRequest, 4 * kBlockSize);
  kv.swap_out(kRequest, 4);
  kv.commit();
  const std::vector<BlockId> host_before = kv.table(kRequest).host_blocks;

  // Over two iterations with a budget of three blocks, then one.
  std::vector<BlockCopy> first = kv.swap_in(kRequest, 3);
  EXPECT_EQ(sources(first), (std::vector<BlockId>{host_before[0], host_before[1], host_before[2]}));
  EXPECT_EQ(kv.table(kRequest).device_blocks, destinations(first));
  EXPECT_EQ(kv.table(kRequest).host_blocks, (std::vector<BlockId>{host_before[3]}));
  // The host sources stay allocated until the copies are done.
  for (const BlockCopy& c : first) EXPECT_EQ(host().ref_count(c.src), 1) << c.src;
  kv.commit();
  for (const BlockCopy& c : first) EXPECT_EQ(host().ref_count(c.src), 0) << c.src;

  std::vector<BlockCopy> second = kv.swap_in(kRequest, 3);
  EXPECT_EQ(sources(second), (std::vector<BlockId>{host_before[3]}));
  kv.commit();
  std::vector<BlockId> expected_device = destinations(first);
  expected_device.push_back(second[0].dst);
  EXPECT_EQ(kv.table(kRequest).device_blocks, expected_device);
  EXPECT_TRUE(kv.table(kRequest).is_on_device());
  EXPECT_EQ(host().num_used(), 0);
  EXPECT_EQ(device().num_used(), 4);
  EXPECT_NO_THROW(kv.check_invariants());

  // Wholly back on the device: appending works again.
  EXPECT_EQ(kv.append_tokens(kRequest, 1), 0);
}

TEST_F(KvCacheManagerTest, SwapRoundTripCopiesPairUpBlockForBlock) {
  // Out then in: each logical block's device copy comes back to the same logical position.
  kv.add(kRequest);
  kv.append_tokens(kRequest, 3 * kBlockSize);
  std::vector<BlockCopy> out = kv.swap_out(kRequest, 3);
  kv.commit();
  std::vector<BlockCopy> in = kv.swap_in(kRequest, 3);
  kv.commit();
  ASSERT_EQ(out.size(), in.size());
  for (size_t i = 0; i < out.size(); ++i) EXPECT_EQ(in[i].src, out[i].dst) << "logical block " << i;
}

TEST_F(KvCacheManagerTest, SwapsStopWhereTheOtherPoolRunsOut) {
  KvCacheManager small{kBlockSize, /*num_device_blocks=*/4, /*num_host_blocks=*/2};
  small.add(kRequest);
  small.append_tokens(kRequest, 4 * kBlockSize);
  // Asked for four, the host has room for two.
  EXPECT_EQ(small.swap_out(kRequest, 4).size(), 2u);
  EXPECT_TRUE(small.swap_out(kRequest, 4).empty());
  small.commit();
  // Another request takes the freed device blocks: swap-in then has nowhere to go.
  small.add(kRequest + 1);
  small.append_tokens(kRequest + 1, 2 * kBlockSize);
  EXPECT_TRUE(small.swap_in(kRequest, 2).empty());
  EXPECT_NO_THROW(small.check_invariants());
}

TEST_F(KvCacheManagerTest, ZeroOrNegativeBudgetMovesNothing) {
  kv.add(kRequest);
  kv.append_tokens(kRequest, 2 * kBlockSize);
  EXPECT_TRUE(kv.swap_out(kRequest, 0).empty());
  EXPECT_TRUE(kv.swap_out(kRequest, -3).empty());
  EXPECT_EQ(kv.num_device_blocks_releasing(), 0);
}

// ---- discarding and freeing ---------------------------------------------------------------

TEST_F(KvCacheManagerTest, DiscardFreesDeviceBlocksAndRecordsTokensToRecompute) {
  kv.add(kRequest);
  kv.append_tokens(kRequest, 10);
  EXPECT_EQ(kv.discard(kRequest), 10);
  const BlockTable& t = kv.table(kRequest);
  EXPECT_TRUE(t.device_blocks.empty());
  EXPECT_EQ(t.num_tokens, 0);
  EXPECT_EQ(t.num_tokens_to_recompute, 10);
  EXPECT_EQ(device().num_free(), kNumDeviceBlocks);
  EXPECT_TRUE(kv.contains(kRequest));  // the request lives on, only its KV is gone
  EXPECT_NO_THROW(kv.check_invariants());
}

TEST_F(KvCacheManagerTest, DiscardFreesHostBlocksToo) {
  kv.add(kRequest);
  kv.append_tokens(kRequest, 3 * kBlockSize);
  kv.swap_out(kRequest, 2);
  kv.commit();
  EXPECT_EQ(kv.discard(kRequest), 3 * kBlockSize);
  EXPECT_EQ(device().num_free(), kNumDeviceBlocks);
  EXPECT_EQ(host().num_free(), kNumHostBlocks);
  EXPECT_NO_THROW(kv.check_invariants());
}

TEST_F(KvCacheManagerTest, AppendAfterDiscardReportsHowManyTokensAreRecomputed) {
  kv.add(kRequest);
  kv.append_tokens(kRequest, 10);
  kv.discard(kRequest);
  // Rebuilt in chunks of 4, 4 and 2, then 3 tokens that are new (e.g. the tool's output).
  EXPECT_EQ(kv.append_tokens(kRequest, 4), 4);
  EXPECT_EQ(kv.table(kRequest).num_tokens_to_recompute, 6);
  EXPECT_EQ(kv.append_tokens(kRequest, 4), 4);
  EXPECT_EQ(kv.append_tokens(kRequest, 5), 2);  // 2 rebuilt, 3 new
  EXPECT_EQ(kv.table(kRequest).num_tokens_to_recompute, 0);
  EXPECT_EQ(kv.append_tokens(kRequest, 3), 0);
  EXPECT_EQ(kv.table(kRequest).num_tokens, 16);
  EXPECT_NO_THROW(kv.check_invariants());
}

TEST_F(KvCacheManagerTest, DiscardAfterPartialRecomputeAccumulates) {
  // Preempted halfway through a recompute: what was rebuilt is lost again, nothing is forgotten.
  kv.add(kRequest);
  kv.append_tokens(kRequest, 10);
  kv.discard(kRequest);
  kv.append_tokens(kRequest, 4);
  EXPECT_EQ(kv.discard(kRequest), 10);
  EXPECT_EQ(kv.table(kRequest).num_tokens_to_recompute, 10);
}

TEST_F(KvCacheManagerTest, DiscardDuringAnInFlightSwapDefersTheFreeToCommit) {
  // The copy already planned this iteration still reads the request's blocks.
  kv.add(kRequest);
  kv.append_tokens(kRequest, 4 * kBlockSize);
  std::vector<BlockCopy> copies = kv.swap_out(kRequest, 2);
  kv.discard(kRequest);
  EXPECT_EQ(device().num_used(), 4);  // two copy sources + two blocks the copy does not touch
  EXPECT_EQ(host().num_used(), 2);    // the copy destinations are still being written
  EXPECT_NO_THROW(kv.check_invariants());
  kv.commit();
  EXPECT_EQ(device().num_used(), 0);
  EXPECT_EQ(host().num_used(), 0);
  EXPECT_NO_THROW(kv.check_invariants());
}

TEST_F(KvCacheManagerTest, FreeReturnsEveryBlockAndForgetsTheRequest) {
  kv.add(kRequest);
  kv.append_tokens(kRequest, 5 * kBlockSize);
  kv.swap_out(kRequest, 3);
  kv.commit();
  kv.free(kRequest);
  EXPECT_FALSE(kv.contains(kRequest));
  EXPECT_EQ(kv.num_requests(), 0);
  EXPECT_EQ(device().num_free(), kNumDeviceBlocks);
  EXPECT_EQ(host().num_free(), kNumHostBlocks);
  EXPECT_THROW(kv.table(kRequest), UnknownRequestError);
  EXPECT_NO_THROW(kv.check_invariants());
}

TEST_F(KvCacheManagerTest, RequestsNeverShareABlock) {
  constexpr int32_t kNumRequests = 4;
  for (RequestId id = 0; id < kNumRequests; ++id) {
    kv.add(id);
    kv.append_tokens(id, 3 * kBlockSize);
  }
  kv.swap_out(1, 2);
  kv.swap_out(3, 1);
  kv.commit();
  kv.discard(2);
  std::vector<int> device_owners(kNumDeviceBlocks, 0), host_owners(kNumHostBlocks, 0);
  for (RequestId id = 0; id < kNumRequests; ++id) {
    for (BlockId b : kv.table(id).device_blocks) ++device_owners[b];
    for (BlockId b : kv.table(id).host_blocks) ++host_owners[b];
  }
  for (int n : device_owners) EXPECT_LE(n, 1);
  for (int n : host_owners) EXPECT_LE(n, 1);
  EXPECT_NO_THROW(kv.check_invariants());
}

TEST(KvCacheManager, NonPositiveBlockSizeIsAnInvalidArgument) {
  EXPECT_THROW(KvCacheManager(0, kNumDeviceBlocks, kNumHostBlocks), InvalidArgumentError);
}

}  // namespace
}  // namespace infercept
