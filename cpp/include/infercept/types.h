#pragma once
// Small shared vocabulary: ids, memory tiers, intercept policies.
#include <cstdint>
#include <string>
#include <vector>

namespace infercept {

using RequestId = int64_t;
using BlockId = int32_t;

/// Where a KV block lives: device memory (GPU, or the CPU backend's "device" tensors) or the
/// host pool that swapped-out blocks move to.
enum class Tier : uint8_t { kDevice = 0, kHost = 1 };

/// What the scheduler does with a request's KV cache while its tool runs.
enum class Policy : uint8_t {
  kVllm,       // discard; on resume the request re-enters at the back of the queue as new
  kDiscard,    // discard; on resume keep the original arrival order, recompute in chunks
  kPreserve,   // keep the blocks on the device
  kSwap,       // whole context out at the intercept, back in at resume (no budget)
  kInfercept,  // min-waste: per request and per iteration (DESIGN.md §2, equation 5)
};

const char* to_string(Tier tier);
const char* to_string(Policy policy);

/// Parses "vllm", "discard", "preserve", "swap" or "infercept"; throws InvalidArgumentError
/// naming the value and the accepted names otherwise.
Policy parse_policy(const std::string& name);

/// Every policy, in the order the paper compares them.
std::vector<Policy> all_policies();

}  // namespace infercept
