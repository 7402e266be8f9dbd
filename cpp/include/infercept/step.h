#pragma once
// The records that cross between the scheduler and the executor. One StepPlan per iteration:
// what to compute, which blocks to copy; one StepResult back: how long it took.
#include <cstdint>
#include <string>
#include <vector>

#include "infercept/kv_cache_manager.h"
#include "infercept/types.h"

namespace infercept {

/// One request's share of the forward pass. The chunk covers context positions
/// [num_computed_tokens, num_computed_tokens + num_new_tokens): a prefill or recompute chunk,
/// the tool's returned tokens, or the single token of a decode.
struct ScheduledRequest {
  RequestId request_id = 0;
  int32_t num_computed_tokens = 0;   // KV tokens already held: position of the first new token
  int32_t num_new_tokens = 0;        // tokens whose KV this step writes
  int32_t num_recompute_tokens = 0;  // of them, tokens whose KV existed before (recompute)
  bool samples = false;              // the chunk reaches the end of the context: sample a token
  std::vector<BlockId> block_table;  // device blocks covering the context after this step
};

/// Everything the executor does in one iteration. Swaps run alongside the forward (pipelined
/// per layer on a GPU); the blocks the copies read stay allocated until update() is called.
struct StepPlan {
  int64_t step_id = 0;
  double now_s = 0;
  std::vector<ScheduledRequest> scheduled;  // in priority order
  std::vector<BlockCopy> swap_out;          // device src -> host dst
  std::vector<BlockCopy> swap_in;           // host src -> device dst
  std::vector<RequestId> preempted;         // running requests pushed out for memory
  std::vector<RequestId> discarded;         // requests whose KV was freed this step
  int32_t num_batched_tokens = 0;           // B_i
  int64_t num_context_tokens = 0;           // tokens the batch attends over (cached + new)
  int32_t num_recompute_tokens = 0;
  int32_t num_sampling_requests = 0;
  int64_t swap_budget_tokens = 0;           // N_i per direction: what the forward can hide

  bool is_empty() const { return scheduled.empty() && swap_out.empty() && swap_in.empty(); }
};

/// What the executor reports back.
struct StepResult {
  double duration_s = 0;          // wall (or simulated) time of the step
  double swap_stall_s = 0;        // part of it the forward spent waiting on copies
  std::vector<RequestId> finished;  // requests that stopped (EOS, stop string, max tokens)
  /// [plan.num_sampling_requests]: the token each sampling request drew, in plan order. May be
  /// empty only when every sampling request is counts-only (the simulator's token-free path).
  std::vector<int32_t> sampled_token_ids;
};

/// What update() tells the caller.
struct StepOutput {
  std::vector<RequestId> sampled;          // requests that gained a generated token
  std::vector<RequestId> reached_limit;    // ... and reached their generated-token limit
  std::vector<RequestId> aborted;          // requests the scheduler had to give up on
  std::vector<std::string> abort_reasons;  // [aborted.size()]
};

}  // namespace infercept
