#include "infercept/block_hash.h"

#include "infercept/errors.h"

namespace infercept {
namespace {

// A 64-bit finaliser (the splitmix64 constants): every input bit reaches every output bit.
constexpr uint64_t mix(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

constexpr uint64_t kRootSeed = 0x1f2e3d4c5b6a7988ULL;
constexpr uint64_t kStep = 0x9e3779b97f4a7c15ULL;

}  // namespace

BlockHash hash_salt(const std::string& salt) {
  uint64_t h = mix(kRootSeed ^ salt.size());
  for (unsigned char c : salt) h = mix(h + kStep + c);
  return h;
}

BlockHash hash_block(BlockHash parent, const TokenId* tokens, int32_t num_tokens) {
  // Position matters: each token is folded in after the state so far has been mixed.
  uint64_t h = mix(parent ^ (kStep * static_cast<uint64_t>(num_tokens)));
  for (int32_t i = 0; i < num_tokens; ++i) h = mix(h + kStep + static_cast<uint32_t>(tokens[i]));
  return h;
}

TokenBlocks::TokenBlocks(int32_t block_size, BlockHash root) : block_size_(block_size), root_(root) {
  if (block_size <= 0) throw InvalidArgumentError("block_size must be positive, got " + std::to_string(block_size));
}

void TokenBlocks::append_and_hash(const TokenId* tokens, size_t num_tokens) {
  tokens_.insert(tokens_.end(), tokens, tokens + num_tokens);
  while (static_cast<size_t>(num_full_blocks() + 1) * block_size_ <= tokens_.size()) {
    int32_t index = num_full_blocks();
    hashes_.push_back(hash_block(parent_hash(index), block_tokens(index), block_size_));
  }
}

void TokenBlocks::truncate_back(int32_t num_tokens) {
  if (num_tokens < 0 || num_tokens > this->num_tokens()) {
    throw InvalidArgumentError("cannot drop " + std::to_string(num_tokens) + " of " +
                               std::to_string(this->num_tokens()) + " tokens");
  }
  tokens_.resize(tokens_.size() - num_tokens);
  hashes_.resize(tokens_.size() / block_size_);
}

}  // namespace infercept
