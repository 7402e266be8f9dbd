#pragma once
// A pool's content index: BlockHash -> the block cached under it. Open addressing with linear
// probing over one flat array (a lookup is usually one cache line, where a node-based map
// chases a bucket and a node, dividing by a prime on the way), backward-shift deletion (no
// tombstones), doubling when half full. Keys are already mixed 64-bit hashes; the slot index
// mixes them once more, so chosen small keys (tests) spread too.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "infercept/block_hash.h"
#include "infercept/types.h"

namespace infercept {

class BlockIndex {
 public:
  static constexpr BlockId kNone = -1;

  BlockIndex() : slots_(kMinSlots), mask_(kMinSlots - 1) {}

  /// Adds key -> block; false (and nothing changes) when the key is already there.
  bool insert(BlockHash key, BlockId block) {
    if (2 * (size_ + 1) > slots_.size()) grow();
    size_t i = home(key);
    for (; slots_[i].block != kNone; i = (i + 1) & mask_) {
      if (slots_[i].key == key) return false;
    }
    slots_[i] = {key, block};
    ++size_;
    return true;
  }

  /// The block under `key`, kNone when absent.
  BlockId find(BlockHash key) const {
    for (size_t i = home(key); slots_[i].block != kNone; i = (i + 1) & mask_) {
      if (slots_[i].key == key) return slots_[i].block;
    }
    return kNone;
  }

  /// Removes `key` if present.
  void erase(BlockHash key) {
    size_t i = home(key);
    for (; slots_[i].block != kNone; i = (i + 1) & mask_) {
      if (slots_[i].key == key) break;
    }
    if (slots_[i].block == kNone) return;
    // Backward shift: pull later entries of the probe run into the hole unless they sit
    // between their home slot and the hole (cyclically), where lookups still reach them.
    size_t hole = i;
    for (size_t j = (hole + 1) & mask_; slots_[j].block != kNone; j = (j + 1) & mask_) {
      size_t h = home(slots_[j].key);
      bool reachable = hole <= j ? (hole < h && h <= j) : (hole < h || h <= j);
      if (reachable) continue;
      slots_[hole] = slots_[j];
      hole = j;
    }
    slots_[hole] = Slot{};
    --size_;
  }

  size_t size() const { return size_; }

 private:
  static constexpr size_t kMinSlots = 16;
  struct Slot {
    BlockHash key = 0;
    BlockId block = kNone;
  };

  size_t home(BlockHash key) const {
    // Fibonacci hashing: the top bits of key * 2^64 / phi.
    return static_cast<size_t>((key * 0x9e3779b97f4a7c15ULL) >> shift_);
  }

  void grow() {
    std::vector<Slot> old;
    old.swap(slots_);
    slots_.assign(old.size() * 2, Slot{});
    mask_ = slots_.size() - 1;
    --shift_;
    for (const Slot& s : old) {
      if (s.block == kNone) continue;
      size_t i = home(s.key);
      while (slots_[i].block != kNone) i = (i + 1) & mask_;
      slots_[i] = s;
    }
  }

  std::vector<Slot> slots_;
  size_t mask_;
  int shift_ = 64 - 4;  // log2(kMinSlots) bits of index
  size_t size_ = 0;
};

}  // namespace infercept
