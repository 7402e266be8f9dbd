#include "infercept/types.h"

#include "infercept/errors.h"

namespace infercept {

const char* to_string(Tier tier) { return tier == Tier::kDevice ? "device" : "host"; }

const char* to_string(Policy policy) {
  switch (policy) {
    case Policy::kVllm: return "vllm";
    case Policy::kDiscard: return "discard";
    case Policy::kPreserve: return "preserve";
    case Policy::kSwap: return "swap";
    case Policy::kInfercept: return "infercept";
  }
  return "unknown";
}

std::vector<Policy> all_policies() {
  return {Policy::kVllm, Policy::kDiscard, Policy::kPreserve, Policy::kSwap, Policy::kInfercept};
}

Policy parse_policy(const std::string& name) {
  for (Policy policy : all_policies()) {
    if (name == to_string(policy)) return policy;
  }
  throw InvalidArgumentError("unknown policy '" + name +
                             "'; expected one of vllm, discard, preserve, swap, infercept");
}

}  // namespace infercept
