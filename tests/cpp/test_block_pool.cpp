// BlockPool: a free list plus reference counts over integer block ids of one tier.
#include "infercept/block_pool.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <set>
#include <string>
#include <vector>

#include "infercept/errors.h"

namespace infercept {
namespace {

constexpr int32_t kNumBlocks = 8;  // small enough to exhaust by hand

// free + owned = total, and the pool's own consistency check agrees.
void expect_conserved(const BlockPool& pool) {
  EXPECT_EQ(pool.num_free() + pool.num_used(), pool.num_blocks());
  int32_t num_referenced = 0;
  for (BlockId block = 0; block < pool.num_blocks(); ++block) num_referenced += pool.ref_count(block) > 0;
  EXPECT_EQ(num_referenced, pool.num_used());
  EXPECT_NO_THROW(pool.check_invariants());
}

TEST(BlockPool, StartsWithEveryBlockFree) {
  BlockPool pool(Tier::kDevice, kNumBlocks);
  EXPECT_EQ(pool.tier(), Tier::kDevice);
  EXPECT_EQ(pool.num_blocks(), kNumBlocks);
  EXPECT_EQ(pool.num_free(), kNumBlocks);
  EXPECT_EQ(pool.num_used(), 0);
  for (BlockId block = 0; block < kNumBlocks; ++block) EXPECT_EQ(pool.ref_count(block), 0);
  expect_conserved(pool);
}

TEST(BlockPool, AllocatesDistinctIdsInRangeWithOneReference) {
  BlockPool pool(Tier::kHost, kNumBlocks);
  std::set<BlockId> seen;
  for (int32_t i = 0; i < kNumBlocks; ++i) {
    BlockId block = pool.allocate();
    EXPECT_GE(block, 0);
    EXPECT_LT(block, kNumBlocks);
    EXPECT_EQ(pool.ref_count(block), 1);
    EXPECT_TRUE(seen.insert(block).second) << "block " << block << " handed out twice";
    expect_conserved(pool);
  }
  EXPECT_EQ(pool.num_free(), 0);
}

TEST(BlockPool, FirstAllocationsCountUpFromZero) {
  // The constructor orders the free list so a fresh pool reads 0, 1, 2, ... in tests and logs.
  BlockPool pool(Tier::kDevice, kNumBlocks);
  EXPECT_EQ(pool.allocate(3), (std::vector<BlockId>{0, 1, 2}));
}

TEST(BlockPool, ReusesTheMostRecentlyFreedBlockFirst) {
  // The free list is a stack: O(1) push and pop, and a just-freed block is hot in caches.
  BlockPool pool(Tier::kDevice, kNumBlocks);
  std::vector<BlockId> blocks = pool.allocate(4);
  pool.free(blocks[1]);
  pool.free(blocks[3]);
  EXPECT_EQ(pool.allocate(), blocks[3]);
  EXPECT_EQ(pool.allocate(), blocks[1]);
}

TEST(BlockPool, BulkAllocationIsAllOrNothing) {
  BlockPool pool(Tier::kDevice, kNumBlocks);
  pool.allocate(kNumBlocks - 2);
  EXPECT_TRUE(pool.can_allocate(2));
  EXPECT_FALSE(pool.can_allocate(3));
  EXPECT_THROW(pool.allocate(3), OutOfBlocksError);
  // The failed call took nothing.
  EXPECT_EQ(pool.num_free(), 2);
  expect_conserved(pool);
  EXPECT_EQ(pool.allocate(2).size(), 2u);
  EXPECT_TRUE(pool.allocate(0).empty());
}

TEST(BlockPool, ExhaustedPoolRaisesOutOfBlocksNamingTheTier) {
  BlockPool pool(Tier::kHost, kNumBlocks);
  pool.allocate(kNumBlocks);
  try {
    pool.allocate();
    FAIL() << "allocating from an empty pool must throw";
  } catch (const OutOfBlocksError& e) {
    EXPECT_NE(std::string(e.what()).find("host"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(std::to_string(kNumBlocks)), std::string::npos) << e.what();
  }
  expect_conserved(pool);
}

TEST(BlockPool, NegativeBulkAllocationIsAnInvalidArgument) {
  BlockPool pool(Tier::kDevice, kNumBlocks);
  EXPECT_THROW(pool.allocate(-1), InvalidArgumentError);
  EXPECT_EQ(pool.num_free(), kNumBlocks);
}

TEST(BlockPool, NegativeSizeIsAnInvalidArgument) {
  EXPECT_THROW(BlockPool(Tier::kDevice, -1), InvalidArgumentError);
}

TEST(BlockPool, EmptyPoolIsValidButCannotAllocate) {
  BlockPool pool(Tier::kHost, 0);  // a setup with no host memory for swaps
  EXPECT_TRUE(pool.can_allocate(0));
  EXPECT_FALSE(pool.can_allocate(1));
  EXPECT_THROW(pool.allocate(), OutOfBlocksError);
  expect_conserved(pool);
}

TEST(BlockPool, FreeReturnsTheBlock) {
  BlockPool pool(Tier::kDevice, kNumBlocks);
  BlockId block = pool.allocate();
  pool.free(block);
  EXPECT_EQ(pool.ref_count(block), 0);
  EXPECT_EQ(pool.num_free(), kNumBlocks);
  expect_conserved(pool);
}

TEST(BlockPool, RetainedBlockStaysAllocatedUntilTheLastReferenceIsDropped) {
  // Two owners (e.g. a shared prefix): the block is free only after both let go.
  BlockPool pool(Tier::kDevice, kNumBlocks);
  BlockId block = pool.allocate();
  pool.retain(block);
  EXPECT_EQ(pool.ref_count(block), 2);
  pool.free(block);
  EXPECT_EQ(pool.ref_count(block), 1);
  EXPECT_EQ(pool.num_used(), 1);
  expect_conserved(pool);
  pool.free(block);
  EXPECT_EQ(pool.ref_count(block), 0);
  EXPECT_EQ(pool.num_used(), 0);
  expect_conserved(pool);
}

TEST(BlockPool, DoubleFreeRaisesBlockErrorAndChangesNothing) {
  BlockPool pool(Tier::kDevice, kNumBlocks);
  BlockId block = pool.allocate();
  pool.free(block);
  try {
    pool.free(block);
    FAIL() << "a double free must throw";
  } catch (const BlockError& e) {
    EXPECT_NE(std::string(e.what()).find("double free"), std::string::npos) << e.what();
  }
  EXPECT_EQ(pool.num_free(), kNumBlocks);
  expect_conserved(pool);
}

TEST(BlockPool, FreeingABlockNobodyOwnsRaisesBlockError) {
  BlockPool pool(Tier::kDevice, kNumBlocks);
  pool.allocate();  // block 0 is owned; block 5 was never handed out
  EXPECT_THROW(pool.free(5), BlockError);
  expect_conserved(pool);
}

TEST(BlockPool, RetainingAFreeBlockRaisesBlockError) {
  BlockPool pool(Tier::kDevice, kNumBlocks);
  EXPECT_THROW(pool.retain(0), BlockError);
  EXPECT_EQ(pool.ref_count(0), 0);
  expect_conserved(pool);
}

TEST(BlockPool, IdsOutOfRangeRaiseBlockErrorNamingTheRange) {
  BlockPool pool(Tier::kDevice, kNumBlocks);
  for (BlockId bad : {-1, kNumBlocks, kNumBlocks + 100}) {
    EXPECT_THROW(pool.free(bad), BlockError) << bad;
    EXPECT_THROW(pool.retain(bad), BlockError) << bad;
    EXPECT_THROW(pool.ref_count(bad), BlockError) << bad;
  }
  try {
    pool.free(kNumBlocks);
  } catch (const BlockError& e) {
    EXPECT_NE(std::string(e.what()).find("[0, 8)"), std::string::npos) << e.what();
  }
}

TEST(BlockPool, StaysConsistentThroughAMixOfOperations) {
  // A deterministic interleaving of allocations, shares and frees; conservation after each.
  BlockPool pool(Tier::kDevice, kNumBlocks);
  std::vector<BlockId> owned;  // one entry per reference we hold
  for (int round = 0; round < 50; ++round) {
    if (round % 3 != 2 && pool.can_allocate(1)) {
      owned.push_back(pool.allocate());
    } else if (round % 5 == 0 && !owned.empty()) {
      pool.retain(owned.front());
      owned.push_back(owned.front());
    } else if (!owned.empty()) {
      pool.free(owned.back());
      owned.pop_back();
    }
    expect_conserved(pool);
  }
  for (BlockId block : owned) pool.free(block);
  EXPECT_EQ(pool.num_free(), kNumBlocks);
  expect_conserved(pool);
}

}  // namespace
}  // namespace infercept
