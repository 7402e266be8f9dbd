// The step's flat records: StepPlan::batch (the forward's inputs, derived here again from the
// plan and the block tables one request at a time) and StepOutput::kv_changes (each paused
// request's KV moves, reported once each).
#include <gtest/gtest.h>

#include <numeric>
#include <vector>

#include "scheduler_sim.h"

namespace infercept {
namespace {

using sim_test::iota_tokens;
using sim_test::kBlockSize;
using sim_test::make_config;
using sim_test::Sim;

// Rebuilds the batch from per-request state, the way the Python runner used to.
void expect_batch_matches(const Scheduler& s, const StepPlan& plan) {
  const StepBatch& b = plan.batch;
  ASSERT_EQ(b.request_ids.size(), plan.scheduled.size());
  ASSERT_EQ(b.query_start.size(), plan.scheduled.size() + 1);
  ASSERT_EQ(b.input_ids.size(), static_cast<size_t>(plan.num_batched_tokens));
  size_t row = 0, sample = 0, max_blocks = 0;
  for (const ScheduledRequest& sr : plan.scheduled) max_blocks = std::max(max_blocks, s.kv().table(sr.request_id).device_blocks.size());
  ASSERT_EQ(static_cast<size_t>(b.max_blocks), max_blocks);
  for (size_t i = 0; i < plan.scheduled.size(); ++i) {
    const ScheduledRequest& sr = plan.scheduled[i];
    const Request& r = s.request(sr.request_id);
    const std::vector<BlockId>& table = s.kv().table(sr.request_id).device_blocks;
    EXPECT_EQ(b.request_ids[i], sr.request_id);
    EXPECT_EQ(b.query_start[i], static_cast<int64_t>(row));
    EXPECT_EQ(b.query_lens[i], sr.num_new_tokens);
    EXPECT_EQ(b.context_lens[i], sr.num_computed_tokens + sr.num_new_tokens);
    for (size_t j = 0; j < max_blocks; ++j) {
      EXPECT_EQ(b.block_tables[i * max_blocks + j], j < table.size() ? table[j] : 0) << "request " << i << " block " << j;
    }
    for (int32_t pos = sr.num_computed_tokens; pos < sr.num_computed_tokens + sr.num_new_tokens; ++pos, ++row) {
      EXPECT_EQ(b.positions[row], pos);
      EXPECT_EQ(b.input_ids[row], r.tokens.tokens()[pos]);
      EXPECT_EQ(b.slot_mapping[row], static_cast<int64_t>(table[pos / kBlockSize]) * kBlockSize + pos % kBlockSize);
    }
    if (sr.samples) {
      ASSERT_LT(sample, b.logit_rows.size());
      EXPECT_EQ(b.logit_rows[sample], static_cast<int64_t>(row) - 1);
      EXPECT_EQ(b.sampling_request_ids[sample], sr.request_id);
      EXPECT_EQ(b.sampling_positions[sample], sr.num_computed_tokens + sr.num_new_tokens);
      EXPECT_EQ(b.num_cached_tokens[sample], r.num_cached_tokens);
      ++sample;
    }
  }
  EXPECT_EQ(b.query_start.back(), static_cast<int64_t>(row));
  EXPECT_EQ(sample, b.logit_rows.size());
  EXPECT_EQ(static_cast<int32_t>(sample), plan.num_sampling_requests);
}

TEST(StepBatch, FlatInputsMatchThePlanAndTables) {
  // Small chunks so steps mix prefill chunks of several requests with decodes.
  Sim sim(make_config(Policy::kInfercept, 256, 256, 48));
  RequestId a = sim.s.add_request(iota_tokens(70, 1), 0.0, 4);
  RequestId b = sim.s.add_request(iota_tokens(40, 1), 0.0, 4);  // shares a's first two blocks
  RequestId c = sim.s.add_request(iota_tokens(5, 500), 0.0, 4);
  int num_steps = 0;
  while (sim.s.num_live_requests() > 0 && num_steps < 100) {
    StepPlan plan = sim.s.schedule(sim.now_s);
    expect_batch_matches(sim.s, plan);
    sim.now_s += 0.01;
    StepResult result{0.01};
    for (const ScheduledRequest& sr : plan.scheduled) {
      if (sr.samples) result.sampled_token_ids.push_back(sim.sampled_token(sr.request_id));
    }
    StepOutput out = sim.s.update(plan, result, sim.now_s);
    for (RequestId id : out.reached_limit) sim.s.finish(id);
    sim.s.check_invariants();
    ++num_steps;
  }
  EXPECT_EQ(sim.s.num_live_requests(), 0);
  EXPECT_GT(num_steps, 3);
  (void)a, (void)b, (void)c;
}

TEST(StepBatch, CountsOnlyRequestsGetZeroInputIds) {
  Sim sim(make_config(Policy::kInfercept));
  sim.s.add_request(20, 0.0, 2);
  StepPlan plan = sim.s.schedule(0.0);
  ASSERT_EQ(plan.batch.input_ids.size(), 20u);
  for (int64_t id : plan.batch.input_ids) EXPECT_EQ(id, 0);
  EXPECT_EQ(plan.batch.positions.back(), 19);
}

TEST(StepBatch, WithoutBuildBatchOnlyThePerRequestArraysAreFilled) {
  SchedulerConfig config = make_config(Policy::kInfercept);
  config.build_batch = false;  // the simulator's setting
  Sim sim(config);
  RequestId id = sim.s.add_request(iota_tokens(20, 1), 0.0, 2);
  StepPlan plan = sim.s.schedule(0.0);
  EXPECT_TRUE(plan.batch.input_ids.empty());
  EXPECT_TRUE(plan.batch.block_tables.empty());
  EXPECT_EQ(plan.batch.context_lens, std::vector<int32_t>{20});
  EXPECT_EQ(plan.batch.sampling_request_ids, std::vector<int64_t>{id});
  EXPECT_EQ(plan.batch.sampling_positions, std::vector<int32_t>{20});
}

TEST(StepOutput, ReportsEachPausedKvMoveOnce) {
  // The swap baseline: intercept says swapping_out; the step that copies the context out
  // reports swapped, and later steps report nothing more.
  Sim sim(make_config(Policy::kSwap));
  RequestId id = sim.s.add_request(iota_tokens(40, 1), 0.0);
  sim.run_until_sampled(id);
  EXPECT_EQ(sim.s.intercept(id, sim.now_s, 5.0), RequestState::kSwappingOut);
  std::vector<RequestState> reported;
  for (int i = 0; i < 5; ++i) {
    for (const KvStateChange& change : sim.step().out.kv_changes) {
      EXPECT_EQ(change.request_id, id);
      reported.push_back(change.state);
    }
  }
  EXPECT_EQ(reported, std::vector<RequestState>{RequestState::kSwapped});
  EXPECT_EQ(sim.request(id).state, RequestState::kSwapped);
}

TEST(StepOutput, InterceptReturnsTheImmediateState) {
  Sim discard(make_config(Policy::kDiscard));
  RequestId a = discard.s.add_request(iota_tokens(20, 1), 0.0);
  discard.run_until_sampled(a);
  EXPECT_EQ(discard.s.intercept(a, discard.now_s), RequestState::kDiscarded);
  EXPECT_TRUE(discard.step().out.kv_changes.empty());  // nothing moved since intercept() said so

  Sim preserve(make_config(Policy::kPreserve));
  RequestId b = preserve.s.add_request(iota_tokens(20, 1), 0.0);
  preserve.run_until_sampled(b);
  EXPECT_EQ(preserve.s.intercept(b, preserve.now_s), RequestState::kPreserved);
}

}  // namespace
}  // namespace infercept
