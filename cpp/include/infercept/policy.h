#pragma once
// The intercept policies and the one table of what sets them apart. The scheduler asks
// traits(policy) instead of testing which policy it runs under, so a policy is its row here
// (docs/baselines.md says where each baseline's row comes from).
#include <cstdint>
#include <string>
#include <vector>

namespace infercept {

/// What the scheduler does with a request's KV cache while its tool runs.
enum class Policy : uint8_t {
  kVllm02,        // vLLM 0.2 (2023): the request ends; no prefix cache, so all is recomputed
  kDiscard,       // discard; on resume keep the original arrival order, recompute in chunks
  kPreserve,      // keep the blocks on the device
  kSwap,          // whole context out at the intercept, back in at resume (no budget)
  kInfercept,     // min-waste: per request and per iteration (DESIGN.md §2, equation 5)
  kVllmV1,        // vLLM v1: the request ends into the LRU prefix cache; continuation is new
  kVllmV1Offload, // ... plus vLLM's CPU offloading: full blocks stored to a host LRU as computed
  kContinuum,     // Continuum (arXiv 2511.02230): pin on the device for a per-tool TTL
};

/// What happens to a paused context's device KV at the intercept.
enum class InterceptAction : uint8_t {
  kEndRequest,  // the request ends there: its blocks go to the prefix cache (if any) at once
  kDiscard,     // freed at once, the blocks' expected next use being the tool's return
  kPreserve,    // kept on the device until the request runs again
  kSwap,        // moved to the host whole by the next schedule()
  kMinWaste,    // decided every iteration by equation 5 (preserve, discard or swap)
  kPinWithTtl,  // kept on the device for a TTL chosen per tool, then as kEndRequest
};

/// Where a resumed request goes in the FCFS queue.
enum class ResumeOrder : uint8_t {
  kOriginalArrival,  // the program's first arrival: its turns keep their place
  kNewArrival,       // the resume time: at the back, as a new request
};

/// How the prefix cache picks which evictable block to evict first.
enum class EvictionOrder : uint8_t {
  kLeastRecentlyUsed,  // the oldest freed first (vLLM v1's free queue)
  kExpectedNextUse,    // farthest expected next use first (docs/prefix_cache.md)
};

/// Whether device blocks are also written to the host tier besides paused contexts' swaps.
enum class HostOffload : uint8_t {
  kNone,
  kStoreOnCompute,  // each full block once its KV is computed (vLLM's OffloadingConnector)
};

/// One policy's row of the table.
struct PolicyTraits {
  Policy policy;
  const char* name;        // what parse_policy() accepts and to_string() returns
  InterceptAction on_intercept;
  bool swaps;                // evicting a paused or preempted context moves it to the host
  bool honours_swap_budget;  // copies stay within N_i per step (hidden behind the forward)
  ResumeOrder resume_order;
  bool uses_prefix_cache;    // blocks stay findable by content after their owners let go
  HostOffload host_offload;
  EvictionOrder eviction_order;
};

/// The row of `policy`.
const PolicyTraits& traits(Policy policy);

const char* to_string(Policy policy);

/// Parses a policy's name (all_policies() lists them); "vllm", the name vllm-0.2 had before
/// the vLLM v1 baselines came, is still accepted. Throws InvalidArgumentError naming the value
/// and the accepted names otherwise.
Policy parse_policy(const std::string& name);

/// Every policy: the paper's five in the order it compares them, then today's baselines.
std::vector<Policy> all_policies();

}  // namespace infercept
