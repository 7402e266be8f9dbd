#pragma once
// Small shared vocabulary: ids, memory tiers (and the intercept policies, from policy.h).
#include <cstdint>
#include <string>
#include <vector>

#include "infercept/policy.h"

namespace infercept {

using RequestId = int64_t;
using BlockId = int32_t;

/// Where a KV block lives: device memory (GPU, or the CPU backend's "device" tensors) or the
/// host pool that swapped-out blocks move to.
enum class Tier : uint8_t { kDevice = 0, kHost = 1 };

const char* to_string(Tier tier);

}  // namespace infercept
