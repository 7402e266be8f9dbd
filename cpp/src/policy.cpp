#include "infercept/policy.h"

#include "infercept/errors.h"

namespace infercept {
namespace {

using IA = InterceptAction;
using RO = ResumeOrder;
using EO = EvictionOrder;
using HO = HostOffload;

// One row per policy, in enum order. Sources per baseline: docs/baselines.md.
constexpr PolicyTraits kTable[] = {
    // vLLM 0.2 (2023): no automatic prefix caching; a tool call ends the request, the
    // continuation is a new request at the back; preemption recomputes.
    {Policy::kVllm02, "vllm-0.2", IA::kEndRequest, false, true, RO::kNewArrival, false, HO::kNone,
     EO::kLeastRecentlyUsed},
    {Policy::kDiscard, "discard", IA::kDiscard, false, true, RO::kOriginalArrival, true, HO::kNone,
     EO::kExpectedNextUse},
    {Policy::kPreserve, "preserve", IA::kPreserve, false, true, RO::kOriginalArrival, true, HO::kNone,
     EO::kExpectedNextUse},
    // The swap baseline moves whole contexts at once, whatever the forward can hide.
    {Policy::kSwap, "swap", IA::kSwap, true, false, RO::kOriginalArrival, true, HO::kNone, EO::kExpectedNextUse},
    {Policy::kInfercept, "infercept", IA::kMinWaste, true, true, RO::kOriginalArrival, true, HO::kNone,
     EO::kExpectedNextUse},
    // vLLM v1 (vllm/v1/core): the finished request's blocks go to the free queue with their
    // hashes (LRU); the continuation is a new request whose prefix hits; preemption recomputes.
    {Policy::kVllmV1, "vllm-v1", IA::kEndRequest, false, true, RO::kNewArrival, true, HO::kNone,
     EO::kLeastRecentlyUsed},
    // vLLM v1 + OffloadingConnector (CPU backend, LRU): full blocks are stored to the host as
    // they are computed; a host hit is loaded before the request runs.
    {Policy::kVllmV1Offload, "vllm-v1-offload", IA::kEndRequest, false, true, RO::kNewArrival, true,
     HO::kStoreOnCompute, EO::kLeastRecentlyUsed},
    // Continuum, built on vLLM v1: pinned for a TTL per tool, program-level FCFS.
    {Policy::kContinuum, "continuum", IA::kPinWithTtl, false, true, RO::kOriginalArrival, true, HO::kNone,
     EO::kLeastRecentlyUsed},
};

constexpr size_t kNumPolicies = sizeof(kTable) / sizeof(kTable[0]);

}  // namespace

const PolicyTraits& traits(Policy policy) {
  size_t index = static_cast<size_t>(policy);
  if (index >= kNumPolicies || kTable[index].policy != policy) {
    throw InvalidArgumentError("no policy with value " + std::to_string(index));
  }
  return kTable[index];
}

const char* to_string(Policy policy) {
  size_t index = static_cast<size_t>(policy);
  return index < kNumPolicies ? kTable[index].name : "unknown";
}

std::vector<Policy> all_policies() {
  std::vector<Policy> policies;
  for (const PolicyTraits& row : kTable) policies.push_back(row.policy);
  return policies;
}

Policy parse_policy(const std::string& name) {
  if (name == "vllm") return Policy::kVllm02;  // deprecated alias (the name before vLLM v1)
  std::string names;
  for (const PolicyTraits& row : kTable) {
    if (name == row.name) return row.policy;
    names += (names.empty() ? "" : ", ") + std::string(row.name);
  }
  throw InvalidArgumentError("unknown policy '" + name + "'; expected one of " + names);
}

}  // namespace infercept
