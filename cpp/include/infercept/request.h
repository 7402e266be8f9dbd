#pragma once
// A request's lifecycle and token accounting. The KV blocks live in the KvCacheManager; this
// record says what the request is doing and how many tokens of each kind it has.
#include <cstdint>
#include <vector>

#include "infercept/block_hash.h"
#include "infercept/kv_cache_manager.h"
#include "infercept/types.h"
#include "infercept/waste_ledger.h"

namespace infercept {

/// Where a request is in its life.
///
///   waiting -> running -> finished
///   waiting -> swapping_in (a prefix cached on the host) -> running
///   running -> intercepted {preserved, swapping_out, swapped, discarded} (tool call, or
///              preemption when memory runs out)
///   intercepted -> resuming {swapping_in, recomputing} -> running
///   any live state -> aborted
enum class RequestState : uint8_t {
  kWaiting,      // admitted to nothing yet; needs a (chunked) prefill
  kRunning,      // in the batch: prefill chunks, then one decode token per step
  kPreserved,    // paused; KV kept on the device
  kSwappingOut,  // paused; KV moving to the host (partly there)
  kSwapped,      // paused; KV wholly on the host
  kDiscarded,    // paused; KV freed, to be recomputed
  kSwappingIn,   // resuming; KV moving back to the device
  kRecomputing,  // resuming; discarded KV rebuilt in chunks that ride along with decodes
  kFinished,
  kAborted,
};

const char* to_string(RequestState state);
bool can_transition(RequestState from, RequestState to);
/// Preserved, swapping out, swapped or discarded.
inline bool is_intercepted(RequestState state) {
  return state == RequestState::kPreserved || state == RequestState::kSwappingOut ||
         state == RequestState::kSwapped || state == RequestState::kDiscarded;
}
/// Running or recomputing: the request takes part in the forward pass.
inline bool is_computing(RequestState state) {
  return state == RequestState::kRunning || state == RequestState::kRecomputing;
}
inline bool is_terminal(RequestState state) {
  return state == RequestState::kFinished || state == RequestState::kAborted;
}

/// Bookkeeping for one request. Token counts: prompt + generated + tool-returned = num_tokens;
/// of those, the KV of `kv->num_tokens` exists (device or host) and the rest waits to be
/// computed, `kv->num_tokens_to_recompute` of it for the second time.
struct Request {
  RequestId id = 0;
  RequestState state = RequestState::kWaiting;
  double arrival_s = 0;   // original arrival: the FCFS key, unless the policy requeues as new
  double fcfs_s = 0;      // FCFS key: arrival_s, or the resume time (ResumeOrder::kNewArrival)
  double priority_s = 0;  // queue key: fcfs_s, plus the predicted work's term when ranked
  int32_t predicted_output_tokens = -1;  // prediction of what is left to generate (< 0: none)
  int32_t caller_predicted_turn = -1;    // the turn (num_intercepts) the caller last predicted for
  /// OutputLengths' key: the hash of the prompt's first blocks (0: counts only, or no full block).
  BlockHash program_class = 0;
  std::vector<int32_t> turn_outputs;     // tokens generated in each turn that has ended (when learning)
  int32_t generated_before_turn = 0;     // num_generated_tokens when the current turn began

  int32_t num_prompt_tokens = 0;
  int32_t num_generated_tokens = 0;
  int32_t num_tool_tokens = 0;
  /// update() reports the request once num_generated_tokens reaches this (0: never).
  int32_t generated_token_limit = 0;

  bool tool_pending = false;          // intercepted and its tool has not returned
  double intercept_start_s = 0;       // when the current intercept began
  double expected_duration_s = -1;    // caller's estimate of the intercept; < 0 when unknown
  int32_t num_intercepts = 0;
  int32_t tool_id = -1;               // the current (or last) intercept's tool (ToolDurations)
  double pin_until_s = -1;            // continuum: the pinned KV is released then (< 0: not pinned)
  double resumed_at_s = -1;           // the resume, while it waits in the queue with no KV
  int32_t num_preemptions = 0;
  int64_t last_action_step = -1;      // the step that last moved or freed its blocks

  /// Token identity (prompt, sampled, tool) and block keys; empty for a counts-only request
  /// (the simulator's), which never reads or feeds the prefix cache.
  TokenBlocks tokens;
  bool cacheable = false;
  bool admitted_once = false;         // num_cached_tokens is set at the first admission
  /// Until it first samples the request takes no prefix-cache hits (it still feeds the cache):
  /// prompt logprobs need the logits of every prompt position, as in vLLM.
  bool skip_reading_prefix_cache = false;
  int32_t num_cached_tokens = 0;      // prompt tokens whose KV came from the cache at that admission
  int64_t last_lookup_step = -1;      // the step of the last admission lookup, and what it found:
  int32_t num_lookup_hit_tokens = 0;
  int32_t num_lookup_host_hit_tokens = 0;

  BlockTable* kv = nullptr;           // owned by the KvCacheManager
  WasteCounters waste;                // device memory-time this request caused to be wasted
  int32_t intercepted_index = -1;     // position in the scheduler's intercepted list
  RequestState reported_state = RequestState::kWaiting;  // the paused state the caller last heard

  int32_t num_tokens() const { return num_prompt_tokens + num_generated_tokens + num_tool_tokens; }
  /// Entered with token ids (not counts only); every prompt holds at least one token.
  bool has_token_ids() const { return tokens.num_tokens() > 0; }
  int32_t num_computed_tokens() const { return kv->num_tokens; }
  int32_t num_uncomputed_tokens() const { return num_tokens() - kv->num_tokens; }

  /// Moves to `to`; throws StateError naming both states if the move is illegal.
  void transition(RequestState to);
};

}  // namespace infercept
