#pragma once
// Content identity of KV blocks (the prefix cache's keys). A full block's hash chains its
// parent's hash with its own token ids; the chain's root is the request's cache salt, so two
// tenants with different salts never share a key. 64 bits: a lookup that hits also compares the
// block's tokens and parent hash, so a collision can cost a miss but never a wrong KV.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace infercept {

using BlockHash = uint64_t;
using TokenId = int32_t;

/// The root of a hash chain: a fixed seed mixed with the salt ("" is the shared, unsalted root).
BlockHash hash_salt(const std::string& salt);

/// The key of a full block: `parent` (the previous block's key, or the root) and its tokens.
BlockHash hash_block(BlockHash parent, const TokenId* tokens, int32_t num_tokens);

/// A request's token ids and the key of each of its full blocks, extended as tokens arrive:
/// each block is hashed once, when it fills.
class TokenBlocks {
 public:
  TokenBlocks() = default;
  TokenBlocks(int32_t block_size, BlockHash root);

  /// Appends tokens; hashes every block they complete.
  void append(const TokenId* tokens, size_t num_tokens) {
    // Inline, a sampled token that leaves its block short of full (most steps) is one push.
    if (num_tokens == 1 && tokens_.size() + 1 < (hashes_.size() + 1) * static_cast<size_t>(block_size_)) {
      tokens_.push_back(*tokens);
      return;
    }
    append_and_hash(tokens, num_tokens);
  }
  void append(const std::vector<TokenId>& tokens) { append(tokens.data(), tokens.size()); }
  /// Drops the last `num_tokens` tokens (and the keys of blocks no longer full).
  void truncate_back(int32_t num_tokens);

  const std::vector<TokenId>& tokens() const { return tokens_; }
  /// [num_full_blocks()]: key of logical block i.
  const std::vector<BlockHash>& block_hashes() const { return hashes_; }
  int32_t num_tokens() const { return static_cast<int32_t>(tokens_.size()); }
  int32_t num_full_blocks() const { return static_cast<int32_t>(hashes_.size()); }
  /// The key block `index` chains from: the root for block 0.
  BlockHash parent_hash(int32_t index) const { return index == 0 ? root_ : hashes_[index - 1]; }
  /// Tokens of full block `index`: [block_size()] starting here.
  const TokenId* block_tokens(int32_t index) const { return tokens_.data() + static_cast<size_t>(index) * block_size_; }
  int32_t block_size() const { return block_size_; }
  BlockHash root() const { return root_; }

 private:
  // append() when the tokens may complete a block.
  void append_and_hash(const TokenId* tokens, size_t num_tokens);

  int32_t block_size_ = 1;
  BlockHash root_ = 0;
  std::vector<TokenId> tokens_;
  std::vector<BlockHash> hashes_;
};

}  // namespace infercept
