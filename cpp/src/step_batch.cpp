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
  // Raw pointers below: through the vectors themselves the compiler reloads each one's data
  // pointer after every store (it cannot rule out that a store hit it).
  const ScheduledRequest* scheduled = plan.scheduled.data();
  Request* const* records = reqs.data();
  int64_t* request_ids = b.request_ids.data();
  int64_t* query_start = b.query_start.data();
  int32_t* query_lens = b.query_lens.data();
  int32_t* context_lens = b.context_lens.data();
  int64_t* logit_rows = b.logit_rows.data();
  int64_t* sampling_request_ids = b.sampling_request_ids.data();
  int32_t* sampling_positions = b.sampling_positions.data();
  int32_t* num_cached_tokens = b.num_cached_tokens.data();
  int32_t max_blocks = 0;
  size_t sample = 0;
  query_start[0] = 0;
  for (size_t i = 0; i < num_seqs; ++i) {
    const ScheduledRequest& s = scheduled[i];
    const Request& r = *records[i];
    const int32_t end = s.num_computed_tokens + s.num_new_tokens;
    request_ids[i] = s.request_id;
    query_lens[i] = s.num_new_tokens;
    context_lens[i] = end;
    query_start[i + 1] = query_start[i] + s.num_new_tokens;
    max_blocks = std::max(max_blocks, static_cast<int32_t>(r.kv->device_blocks.size()));
    if (s.samples) {
      logit_rows[sample] = query_start[i + 1] - 1;
      sampling_request_ids[sample] = s.request_id;
      sampling_positions[sample] = end;
      num_cached_tokens[sample] = r.num_cached_tokens;
      ++sample;
    }
  }
  if (!config_.build_batch) return;

  // Per token and per block: the forward's inputs, read from the tables where they live.
  b.input_ids.resize(static_cast<size_t>(plan.num_batched_tokens));
  b.positions.resize(b.input_ids.size());
  b.slot_mapping.resize(b.input_ids.size());
  b.max_blocks = max_blocks;
  int64_t* input_ids = b.input_ids.data();
  int64_t* positions = b.positions.data();
  int64_t* slot_mapping = b.slot_mapping.data();
  // Each row written once: the table, then its zero padding.
  b.block_tables.clear();
  b.block_tables.reserve(num_seqs * static_cast<size_t>(max_blocks));
  int64_t row = 0;
  for (size_t i = 0; i < num_seqs; ++i) {
    const ScheduledRequest& s = scheduled[i];
    const Request& r = *records[i];
    const std::vector<BlockId>& table = r.kv->device_blocks;
    const TokenId* tokens = r.has_token_ids() ? r.tokens.tokens().data() : nullptr;
    auto write_token = [&](int32_t pos) {
      input_ids[row] = tokens ? tokens[pos] : 0;
      positions[row] = pos;
      slot_mapping[row] = static_cast<int64_t>(table[pos / block_size]) * block_size + pos % block_size;
      ++row;
    };
    if (s.num_new_tokens == 1) {
      write_token(s.num_computed_tokens);  // a decode: most rows, and no loop to set up
    } else {
      for (int32_t pos = s.num_computed_tokens; pos < context_lens[i]; ++pos) write_token(pos);
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
