// The step's flat forward inputs (StepBatch) and the paused-state report: the two records that
// let the executor and the engine work without asking the scheduler about single requests.
#include <algorithm>

#include "infercept/scheduler.h"

namespace infercept {

void Scheduler::build_batch(StepPlan& plan) const {
  StepBatch& b = plan.batch;
  const size_t num_seqs = plan.scheduled.size();
  const size_t num_sampling = static_cast<size_t>(plan.num_sampling_requests);
  const int32_t block_size = config_.block_size;
  // add_chunk() recorded each scheduled request's record in plan order: no lookups here.
  const std::vector<Request*>& reqs = scheduled_requests_;
  // Per request (always: O(B), and the simulator samples from the sampling rows). Every array
  // is sized once and written by index.
  b.request_ids.resize(num_seqs);
  b.query_start.resize(num_seqs + 1);
  b.query_lens.resize(num_seqs);
  b.context_lens.resize(num_seqs);
  b.logit_rows.resize(num_sampling);
  b.sampling_request_ids.resize(num_sampling);
  b.sampling_positions.resize(num_sampling);
  b.num_cached_tokens.resize(num_sampling);
  int32_t max_blocks = 0;
  size_t sample = 0;
  b.query_start[0] = 0;
  for (size_t i = 0; i < num_seqs; ++i) {
    const ScheduledRequest& s = plan.scheduled[i];
    const Request& r = *reqs[i];
    const int32_t end = s.num_computed_tokens + s.num_new_tokens;
    b.request_ids[i] = s.request_id;
    b.query_lens[i] = s.num_new_tokens;
    b.context_lens[i] = end;
    b.query_start[i + 1] = b.query_start[i] + s.num_new_tokens;
    max_blocks = std::max(max_blocks, static_cast<int32_t>(r.kv->device_blocks.size()));
    if (s.samples) {
      b.logit_rows[sample] = b.query_start[i + 1] - 1;
      b.sampling_request_ids[sample] = s.request_id;
      b.sampling_positions[sample] = end;
      b.num_cached_tokens[sample] = r.num_cached_tokens;
      ++sample;
    }
  }
  if (!config_.build_batch) return;

  // Per token and per block: the forward's inputs, read from the tables where they live.
  b.input_ids.resize(static_cast<size_t>(plan.num_batched_tokens));
  b.positions.resize(b.input_ids.size());
  b.slot_mapping.resize(b.input_ids.size());
  b.max_blocks = max_blocks;
  // Each row written once: the table, then its zero padding.
  b.block_tables.clear();
  b.block_tables.reserve(num_seqs * static_cast<size_t>(max_blocks));
  int64_t row = 0;
  for (size_t i = 0; i < num_seqs; ++i) {
    const ScheduledRequest& s = plan.scheduled[i];
    const Request& r = *reqs[i];
    const std::vector<BlockId>& table = r.kv->device_blocks;
    const TokenId* tokens = r.has_token_ids() ? r.tokens.tokens().data() : nullptr;
    for (int32_t pos = s.num_computed_tokens; pos < b.context_lens[i]; ++pos, ++row) {
      b.input_ids[row] = tokens ? tokens[pos] : 0;
      b.positions[row] = pos;
      b.slot_mapping[row] = static_cast<int64_t>(table[pos / block_size]) * block_size + pos % block_size;
    }
    b.block_tables.insert(b.block_tables.end(), table.begin(), table.end());
    b.block_tables.insert(b.block_tables.end(), static_cast<size_t>(max_blocks) - table.size(), 0);
  }
}

void Scheduler::report_kv_changes(StepOutput& out) {
  // Paused states change only through move_paused(): no move since the last report, no change.
  if (!paused_moved_) return;
  paused_moved_ = false;
  for (Request* r : intercepted_) {
    if (r->state == r->reported_state) continue;
    out.kv_changes.push_back({r->id, r->state});
    r->reported_state = r->state;
  }
}

}  // namespace infercept
