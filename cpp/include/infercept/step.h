#pragma once
// The records that cross between the scheduler and the executor. One StepPlan per iteration:
// what to compute, which blocks to copy, and the forward's inputs as flat arrays; one
// StepResult back: the sampled tokens and how long it took; one StepOutput from update():
// what changed for the caller.
#include <cstdint>
#include <string>
#include <vector>

#include "infercept/kv_cache_manager.h"
#include "infercept/request.h"
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
};

/// The forward's inputs for one step, flat and in plan order, built once at the end of
/// schedule() so the executor reads them without a per-request walk (Python sees numpy views
/// of these vectors, no copy). B scheduled requests, T new tokens, S sampling requests. The
/// [T] and [B, max_blocks] arrays are left empty when SchedulerConfig::build_batch is off.
struct StepBatch {
  std::vector<int64_t> request_ids;     // [B]
  std::vector<int64_t> input_ids;       // [T] token ids of the new tokens; 0 for counts-only requests
  std::vector<int64_t> positions;       // [T] context position of each new token
  std::vector<int64_t> slot_mapping;    // [T] block_id * block_size + offset its K/V is written to
  std::vector<int64_t> query_start;     // [B + 1] request i's new tokens are rows [query_start[i], query_start[i+1])
  std::vector<int32_t> query_lens;      // [B] new tokens per request
  std::vector<int32_t> context_lens;    // [B] tokens with KV after this step (cached + new)
  std::vector<int32_t> block_tables;    // [B, max_blocks] row-major device block ids, padded with 0
  int32_t max_blocks = 0;
  std::vector<int64_t> logit_rows;            // [S] flat row of each sampling request's last new token
  std::vector<int64_t> sampling_request_ids;  // [S]
  std::vector<int32_t> sampling_positions;    // [S] context position the sampled token takes
  std::vector<int32_t> num_cached_tokens;     // [S] prompt tokens the prefix cache served at admission

  /// Empties every array, keeping its capacity (a plan handed back to Scheduler::schedule_into).
  void clear() {
    for (auto* v : {&request_ids, &input_ids, &positions, &slot_mapping, &query_start, &logit_rows,
                    &sampling_request_ids}) {
      v->clear();
    }
    for (auto* v : {&query_lens, &context_lens, &block_tables, &sampling_positions, &num_cached_tokens}) v->clear();
    max_blocks = 0;
  }
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
  StepBatch batch;

  bool is_empty() const { return scheduled.empty() && swap_out.empty() && swap_in.empty(); }
  /// Back to a default plan, keeping the arrays' capacity.
  void clear() {
    step_id = 0;
    now_s = 0;
    scheduled.clear();
    swap_out.clear();
    swap_in.clear();
    preempted.clear();
    discarded.clear();
    num_batched_tokens = 0;
    num_context_tokens = 0;
    num_recompute_tokens = 0;
    num_sampling_requests = 0;
    swap_budget_tokens = 0;
    batch.clear();
  }
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

/// A paused request whose KV moved since it was last reported (by intercept() or update()).
struct KvStateChange {
  RequestId request_id = 0;
  RequestState state = RequestState::kPreserved;  // preserved, swapping_out, swapped or discarded
};

/// What update() tells the caller: everything it needs, so it never polls request states.
struct StepOutput {
  std::vector<RequestId> sampled;          // requests that gained a generated token
  std::vector<RequestId> reached_limit;    // ... and reached their generated-token limit
  std::vector<RequestId> aborted;          // requests the scheduler had to give up on
  std::vector<std::string> abort_reasons;  // [aborted.size()]
  std::vector<KvStateChange> kv_changes;   // paused requests' KV moves this step
};

}  // namespace infercept
