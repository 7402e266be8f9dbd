// BlockIndex, the pools' content index: the same answers as a std::unordered_map under random
// inserts, lookups and erases, including keys that crowd one probe run and wrap the array.
#include <gtest/gtest.h>

#include <random>
#include <unordered_map>

#include "infercept/block_index.h"

using namespace infercept;

TEST(BlockIndex, InsertFindEraseByKey) {
  BlockIndex index;
  EXPECT_EQ(index.find(42), BlockIndex::kNone);
  EXPECT_TRUE(index.insert(42, 7));
  EXPECT_FALSE(index.insert(42, 8));  // the key is taken: the first block stays
  EXPECT_EQ(index.find(42), 7);
  EXPECT_EQ(index.size(), 1u);
  index.erase(43);  // absent: no-op
  EXPECT_EQ(index.size(), 1u);
  index.erase(42);
  EXPECT_EQ(index.find(42), BlockIndex::kNone);
  EXPECT_EQ(index.size(), 0u);
  EXPECT_TRUE(index.insert(42, 9));
  EXPECT_EQ(index.find(42), 9);
}

// Random operations over a small key space (many repeats, long probe runs, growth from the
// minimum size, erases in the middle of runs), checked against the standard map each step.
TEST(BlockIndex, MatchesUnorderedMapUnderRandomOperations) {
  for (uint64_t key_space : {8ULL, 64ULL, 5000ULL}) {
    std::mt19937_64 rng(key_space);
    BlockIndex index;
    std::unordered_map<BlockHash, BlockId> reference;
    for (int op = 0; op < 40000; ++op) {
      // Keys that differ only in high bits, only in low bits, or at random.
      uint64_t k = rng() % key_space;
      BlockHash key = op % 3 == 0 ? k << 56 : op % 3 == 1 ? k : k * 0x9e3779b97f4a7c15ULL + 1;
      switch (rng() % 3) {
        case 0: {
          BlockId block = static_cast<BlockId>(rng() % 100000);
          EXPECT_EQ(index.insert(key, block), reference.emplace(key, block).second);
          break;
        }
        case 1:
          index.erase(key);
          reference.erase(key);
          break;
        default: {
          auto it = reference.find(key);
          EXPECT_EQ(index.find(key), it == reference.end() ? BlockIndex::kNone : it->second);
        }
      }
      ASSERT_EQ(index.size(), reference.size());
    }
    for (const auto& [key, block] : reference) EXPECT_EQ(index.find(key), block);
  }
}
