// The step's flat records: StepPlan::batch (the forward's inputs, derived here again from the
// plan and the block tables one request at a time) and StepOutput::kv_changes (each paused
// request's KV moves, reported once each), and a plan reused by schedule_into().
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

// Every field of two plans, for a plan made by schedule_into() over a reused plan.
void expect_same_plan(const StepPlan& a, const StepPlan& b) {
  EXPECT_EQ(a.step_id, b.step_id);
  EXPECT_EQ(a.now_s, b.now_s);
  ASSERT_EQ(a.scheduled.size(), b.scheduled.size());
  for (size_t i = 0; i < a.scheduled.size(); ++i) {
    EXPECT_EQ(a.scheduled[i].request_id, b.scheduled[i].request_id);
    EXPECT_EQ(a.scheduled[i].num_computed_tokens, b.scheduled[i].num_computed_tokens);
    EXPECT_EQ(a.scheduled[i].num_new_tokens, b.scheduled[i].num_new_tokens);
    EXPECT_EQ(a.scheduled[i].num_recompute_tokens, b.scheduled[i].num_recompute_tokens);
    EXPECT_EQ(a.scheduled[i].samples, b.scheduled[i].samples);
  }
  auto same_copies = [](const std::vector<BlockCopy>& x, const std::vector<BlockCopy>& y) {
    ASSERT_EQ(x.size(), y.size());
    for (size_t i = 0; i < x.size(); ++i) {
      EXPECT_EQ(x[i].src, y[i].src);
      EXPECT_EQ(x[i].dst, y[i].dst);
    }
  };
  same_copies(a.swap_out, b.swap_out);
  same_copies(a.swap_in, b.swap_in);
  EXPECT_EQ(a.preempted, b.preempted);
  EXPECT_EQ(a.discarded, b.discarded);
  EXPECT_EQ(a.num_batched_tokens, b.num_batched_tokens);
  EXPECT_EQ(a.num_context_tokens, b.num_context_tokens);
  EXPECT_EQ(a.num_recompute_tokens, b.num_recompute_tokens);
  EXPECT_EQ(a.num_sampling_requests, b.num_sampling_requests);
  EXPECT_EQ(a.swap_budget_tokens, b.swap_budget_tokens);
  const StepBatch &x = a.batch, &y = b.batch;
  EXPECT_EQ(x.request_ids, y.request_ids);
  EXPECT_EQ(x.input_ids, y.input_ids);
  EXPECT_EQ(x.positions, y.positions);
  EXPECT_EQ(x.slot_mapping, y.slot_mapping);
  EXPECT_EQ(x.query_start, y.query_start);
  EXPECT_EQ(x.query_lens, y.query_lens);
  EXPECT_EQ(x.context_lens, y.context_lens);
  EXPECT_EQ(x.block_tables, y.block_tables);
  EXPECT_EQ(x.max_blocks, y.max_blocks);
  EXPECT_EQ(x.logit_rows, y.logit_rows);
  EXPECT_EQ(x.sampling_request_ids, y.sampling_request_ids);
  EXPECT_EQ(x.sampling_positions, y.sampling_positions);
  EXPECT_EQ(x.num_cached_tokens, y.num_cached_tokens);
}

TEST(StepPlan, AReusedPlanEqualsAFreshOne) {
  // Two schedulers fed the same events under memory pressure (preemptions, swaps, discards,
  // a shared prefix): one makes a new plan every step, the other refills one plan. The plan
  // shrinks and grows (batch size, max_blocks, copies) so stale contents would show.
  SchedulerConfig config = make_config(Policy::kInfercept, 40, 40, 64);
  Sim fresh(config), reused(config);
  StepPlan plan;
  std::vector<std::pair<RequestId, double>> paused;  // (request, resume time)
  int64_t num_preempted = 0, num_swapped_out = 0;
  for (int i = 0; i < 12; ++i) {
    std::vector<TokenId> prompt = iota_tokens(20 + 13 * i, i % 3 == 0 ? 1 : 100 * i);
    ASSERT_EQ(fresh.s.add_request(prompt, 0.0, 12), reused.s.add_request(prompt, 0.0, 12));
  }
  for (int step = 0; step < 400 && fresh.s.num_live_requests() > 0; ++step) {
    StepPlan expected = fresh.s.schedule(fresh.now_s);
    reused.s.schedule_into(reused.now_s, plan);
    expect_same_plan(expected, plan);
    num_preempted += static_cast<int64_t>(expected.preempted.size());
    num_swapped_out += static_cast<int64_t>(expected.swap_out.size());
    fresh.now_s = reused.now_s = fresh.now_s + 0.01;
    StepResult result{0.01};
    for (const ScheduledRequest& sr : expected.scheduled) {
      if (sr.samples) result.sampled_token_ids.push_back(fresh.sampled_token(sr.request_id));
    }
    StepOutput a = fresh.s.update(expected, result, fresh.now_s);
    StepOutput b = reused.s.update(plan, result, reused.now_s);
    ASSERT_EQ(a.sampled, b.sampled);
    for (RequestId id : a.reached_limit) fresh.s.finish(id), reused.s.finish(id);
    // Every third sample calls a tool that takes 0.05 s.
    for (RequestId id : a.sampled) {
      const Request& r = fresh.s.request(id);
      if (r.state != RequestState::kRunning || r.num_generated_tokens % 3 != 0) continue;
      EXPECT_EQ(fresh.s.intercept(id, fresh.now_s, 0.05), reused.s.intercept(id, reused.now_s, 0.05));
      paused.emplace_back(id, fresh.now_s + 0.05);
    }
    for (auto it = paused.begin(); it != paused.end();) {
      if (it->second > fresh.now_s) {
        ++it;
        continue;
      }
      std::vector<TokenId> tool = iota_tokens(9, 7000 + static_cast<TokenId>(it->first));
      fresh.s.resume(it->first, tool, fresh.now_s);
      reused.s.resume(it->first, tool, reused.now_s);
      it = paused.erase(it);
    }
    fresh.s.check_invariants();
    reused.s.check_invariants();
  }
  EXPECT_EQ(fresh.s.num_live_requests(), 0);
  EXPECT_GT(num_preempted + num_swapped_out, 0) << "the pool never ran short: the test shows nothing";
}

TEST(Scheduler, ManyPausedRequestsKeepTheirDeviceFlags) {
  // More paused contexts than one 64-bit word of device flags, leaving in an order that moves
  // entries across words; check_invariants() checks each flag against the table.
  Sim sim(make_config(Policy::kDiscard, 4096, 0, 4096));
  Sim keep(make_config(Policy::kPreserve, 4096, 0, 4096));
  std::vector<RequestId> ids;
  for (int i = 0; i < 150; ++i) {
    ids.push_back(sim.s.add_request(iota_tokens(8, 1 + 8 * i), 0.0));
    ASSERT_EQ(keep.s.add_request(iota_tokens(8, 1 + 8 * i), 0.0), ids.back());
  }
  for (Sim* s : {&sim, &keep}) {
    s->run_until_sampled(ids.back());
    for (RequestId id : ids) s->s.intercept(id, s->now_s, 1.0);
    s->step();
    s->s.check_invariants();
    // Every seventh, from the back, then every fifth of the rest: removals from every word.
    for (size_t i = ids.size(); i-- > 0;) {
      if (i % 7 == 0) s->s.resume(ids[i], {5, 6}, s->now_s);
    }
    s->s.check_invariants();
    for (size_t i = 0; i < ids.size(); ++i) {
      if (i % 7 != 0 && i % 5 == 0) s->s.resume(ids[i], {5, 6}, s->now_s);
    }
    s->step();
    s->s.check_invariants();
  }
  EXPECT_EQ(sim.s.stats().num_intercepted, keep.s.stats().num_intercepted);
  EXPECT_EQ(keep.s.stats().num_preserved, keep.s.stats().num_intercepted);
  EXPECT_EQ(sim.s.stats().num_discarded, sim.s.stats().num_intercepted);
}

}  // namespace
}  // namespace infercept
