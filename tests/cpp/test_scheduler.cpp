// The scheduler's policies, memory pressure and token budget, driven by sim_test::Sim.
#include "infercept/scheduler.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "infercept/errors.h"
#include "infercept/waste_model.h"
#include "scheduler_sim.h"

namespace infercept {
namespace {

using namespace sim_test;

// ---- (a) and (b): the min-waste policy on one long context ---------------------------------

constexpr int32_t kLongBlocks = (kLongPrompt + kBlockSize - 1) / kBlockSize;
constexpr int32_t kToolTokens = 8;

class MinWasteLongContext : public ::testing::Test {
 protected:
  // A long context that has just sampled, next to a short request that keeps decoding.
  void SetUp() override {
    decoder = sim.s.add_request(16, 0);
    long_request = sim.s.add_request(kLongPrompt, 0.001);
    sim.run_until_sampled(long_request);
    ASSERT_EQ(sim.request(long_request).kv->device_blocks.size(), static_cast<size_t>(kLongBlocks));
    blocks_before = sim.request(long_request).kv->device_blocks;
  }

  Sim sim{make_config(Policy::kInfercept)};
  RequestId decoder = 0;
  RequestId long_request = 0;
  std::vector<BlockId> blocks_before;
};

TEST_F(MinWasteLongContext, ThirtySecondToolCallIsSwappedOutWithinTheBudgetOverSeveralSteps) {
  const double intercept_s = 30;
  const CostModel cost = gptj();
  // What the equations say about this context (C = 2000, M = 458,752 B):
  // preserving it for 30 s wastes far more than discarding it ...
  int64_t other_tokens = sim.s.num_running_tokens() - kLongPrompt;
  int64_t chunk_tokens = 512 - 1;  // the budget S less the one decode that rides along
  int64_t num_chunks = (kLongPrompt + chunk_tokens - 1) / chunk_tokens;
  EXPECT_GT(preserve_waste(cost, kLongPrompt, intercept_s),
            chunked_discard_waste(cost, kLongPrompt, other_tokens, num_chunks));
  // ... and the tool outlasts the round trip (2 * T_swap(2000) = 73.4 ms), so swapping pays.
  EXPECT_GT(intercept_s, 2 * cost.swap_time_s(kLongPrompt));

  sim.s.intercept(long_request, sim.now_s, intercept_s);
  // Beside a lone decode, T_fwd(1) = 10.0463 ms hides 547 tokens of copy: 34 whole blocks a step.
  constexpr size_t kBudgetBlocks = 547 / kBlockSize;
  size_t num_moved = 0;
  int num_swap_steps = 0;
  while (sim.request(long_request).state != RequestState::kSwapped) {
    ASSERT_LT(num_swap_steps, 20) << "the swap-out stopped making progress";
    Sim::Step st = sim.step();
    ++num_swap_steps;
    EXPECT_FALSE(st.plan.swap_out.empty()) << "step " << num_swap_steps << " moved nothing";
    EXPECT_LE(st.plan.swap_out.size() * kBlockSize, static_cast<size_t>(st.plan.swap_budget_tokens))
        << "step " << num_swap_steps << " copies more than its forward can hide";
    EXPECT_LE(st.plan.swap_out.size(), kBudgetBlocks);
    EXPECT_TRUE(st.plan.discarded.empty());
    EXPECT_TRUE(contains(st.out.sampled, decoder)) << "the decode must not stall behind the swap";
    num_moved += st.plan.swap_out.size();
  }
  // 125 blocks at 34 a step: 34 + 34 + 34 + 23.
  EXPECT_EQ(num_swap_steps, 4);
  EXPECT_EQ(num_moved, static_cast<size_t>(kLongBlocks));
  EXPECT_TRUE(sim.request(long_request).kv->device_blocks.empty());
  EXPECT_EQ(sim.request(long_request).kv->host_blocks.size(), static_cast<size_t>(kLongBlocks));
  EXPECT_EQ(sim.request(long_request).kv->num_tokens, kLongPrompt);  // nothing lost

  // The tool returns 30 s later; the context comes back within the budget too.
  sim.now_s += intercept_s;
  sim.s.resume(long_request, kToolTokens, sim.now_s);
  size_t num_returned = 0;
  int num_swap_in_steps = 0;
  while (sim.request(long_request).state != RequestState::kRunning) {
    ASSERT_LT(num_swap_in_steps, 20) << "the swap-in stopped making progress";
    Sim::Step st = sim.step();
    ++num_swap_in_steps;
    EXPECT_FALSE(st.plan.swap_in.empty());
    EXPECT_LE(st.plan.swap_in.size() * kBlockSize, static_cast<size_t>(st.plan.swap_budget_tokens));
    num_returned += st.plan.swap_in.size();
  }
  EXPECT_EQ(num_swap_in_steps, 4);
  EXPECT_EQ(num_returned, static_cast<size_t>(kLongBlocks));

  // It continues from its swapped KV: only the sampled token and the tool's tokens are new.
  sim.run_until_sampled(long_request, 2);
  EXPECT_EQ(sim.s.stats().num_recomputed_tokens, 0);
  EXPECT_EQ(sim.request(long_request).kv->num_tokens, kLongPrompt + 1 + kToolTokens);
}

TEST_F(MinWasteLongContext, TenthOfAMillisecondToolCallIsPreserved) {
  const double intercept_s = 0.1e-3;
  const CostModel cost = gptj();
  // Preserving for 0.1 ms (0.1e-3 * C * M) beats even one chunk of discard (>= T_fwd(C) / 2 * C * M
  // = 51 ms * C * M), and the tool returns long before a 73 ms round trip: keep the blocks.
  EXPECT_LT(preserve_waste(cost, kLongPrompt, intercept_s), chunked_discard_waste(cost, kLongPrompt, 0, 1));
  EXPECT_LT(intercept_s, 2 * cost.swap_time_s(kLongPrompt));

  sim.s.intercept(long_request, sim.now_s, intercept_s);
  Sim::Step st = sim.step();
  EXPECT_TRUE(st.plan.swap_out.empty());
  EXPECT_TRUE(st.plan.discarded.empty());
  EXPECT_EQ(sim.request(long_request).state, RequestState::kPreserved);
  EXPECT_EQ(sim.request(long_request).kv->device_blocks, blocks_before);

  sim.s.resume(long_request, kToolTokens, st.plan.now_s + intercept_s);
  sim.run_until_sampled(long_request, 2);
  const std::vector<BlockId>& blocks_after = sim.request(long_request).kv->device_blocks;
  ASSERT_GE(blocks_after.size(), blocks_before.size());
  EXPECT_TRUE(std::equal(blocks_before.begin(), blocks_before.end(), blocks_after.begin()))
      << "the preserved context must continue in the very same blocks";
  EXPECT_EQ(sim.s.stats().num_recomputed_tokens, 0);
  EXPECT_EQ(sim.s.stats().num_swap_out_blocks, 0);
}

TEST_F(MinWasteLongContext, ToolReturningMidSwapOutBringsBackOnlyTheMovedPart) {
  // The tool returns after one step of a chunked swap-out: the 34 blocks already on the host
  // come back; the 91 still on the device never moved.
  sim.s.intercept(long_request, sim.now_s, 30);
  Sim::Step out = sim.step();
  ASSERT_EQ(out.plan.swap_out.size(), 34u);
  ASSERT_EQ(sim.request(long_request).state, RequestState::kSwappingOut);
  sim.s.resume(long_request, kToolTokens, sim.now_s);
  size_t num_returned = 0;
  while (sim.request(long_request).state != RequestState::kRunning) {
    ASSERT_LT(sim.num_steps, kMaxSteps);
    num_returned += sim.step().plan.swap_in.size();
  }
  EXPECT_EQ(num_returned, 34u);
  const std::vector<BlockId>& blocks_after = sim.request(long_request).kv->device_blocks;
  ASSERT_EQ(blocks_after.size(), static_cast<size_t>(kLongBlocks));
  EXPECT_TRUE(std::equal(blocks_before.begin(), blocks_before.end() - 34, blocks_after.begin()));
  sim.run_until_sampled(long_request, 2);
  EXPECT_EQ(sim.s.stats().num_recomputed_tokens, 0);
}

TEST_F(MinWasteLongContext, WithoutHostMemoryALongToolCallDiscardsInsteadOfPreserving) {
  // Equation 5's fallback: no swap possible, and discard (105 M) < preserve (30 s * C * M).
  Sim no_host{make_config(Policy::kInfercept, 1024, /*num_host_blocks=*/0)};
  RequestId r = no_host.s.add_request(kLongPrompt, 0);
  no_host.run_until_sampled(r);
  no_host.s.intercept(r, no_host.now_s, 30);
  Sim::Step st = no_host.step();
  EXPECT_TRUE(contains(st.plan.discarded, r));
  EXPECT_EQ(no_host.request(r).state, RequestState::kDiscarded);
  EXPECT_EQ(no_host.num_free(Tier::kDevice), 1024);
  EXPECT_EQ(no_host.request(r).kv->num_tokens_to_recompute, kLongPrompt);
}

TEST(MinWaste, DemandAwareKeepsAContextNobodyNeedsAndMovesItUnderPressure) {
  // A 2 s tool and an idle device: the demand expected over it (the allocation rate, here
  // what the prefill itself took, decaying) fits in the free blocks, so nobody wants the
  // memory before the tool returns and the context stays (the paper's rule swaps it out:
  // a swap or discard would only delay its resume).
  SchedulerConfig config = make_config(Policy::kInfercept, /*num_device_blocks=*/160);
  config.demand_aware_preserve = true;
  Sim sim{config};
  RequestId paused = sim.s.add_request(2000, 0);  // 125 of the 160 blocks
  sim.run_until_sampled(paused);
  sim.s.intercept(paused, sim.now_s, 2.0);
  for (int i = 0; i < 20; ++i) sim.step();
  EXPECT_EQ(sim.request(paused).state, RequestState::kPreserved);
  EXPECT_EQ(sim.s.stats().num_swap_out_blocks, 0);

  // A request that cannot be admitted in what is left: admission is blocked, so the paused
  // context is charged in full and goes out within the budget.
  RequestId waiting = sim.s.add_request(1000, sim.now_s, 1);  // 63 blocks
  sim.run_until_sampled(waiting);
  EXPECT_GT(sim.s.stats().num_swap_out_blocks, 0);
  EXPECT_NE(sim.request(paused).state, RequestState::kPreserved);
}

TEST(MinWaste, TheMostWastefulContextTakesTheSwapBudgetAndCheaperOnesAreDiscarded) {
  Sim sim{make_config(Policy::kInfercept)};
  const CostModel cost = gptj();
  RequestId decoder = sim.s.add_request(16, 0);
  RequestId big = sim.s.add_request(2000, 0.001);   // 125 blocks
  RequestId small = sim.s.add_request(500, 0.002);  // 32 blocks
  sim.run_until([&] {
    return sim.request(big).num_generated_tokens >= 1 && sim.request(small).num_generated_tokens >= 1;
  });
  // Both have just sampled and pause for the same 30 s. min(preserve, discard) is the discard
  // term for both, and it grows with the context: the big one ranks first.
  int64_t others = sim.request(decoder).kv->num_tokens;
  auto min_waste = [&](int64_t c) {
    int64_t chunk_tokens = 512 - 1;  // one decode rides along
    return std::min(preserve_waste(cost, c, 30), chunked_discard_waste(cost, c, others, (c + chunk_tokens - 1) / chunk_tokens));
  };
  ASSERT_GT(min_waste(2000), min_waste(500));
  sim.s.intercept(big, sim.now_s, 30);
  sim.s.intercept(small, sim.now_s, 30);

  const std::vector<BlockId> big_blocks = sim.request(big).kv->device_blocks;
  Sim::Step st = sim.step();
  // The budget (34 blocks beside one decode) goes wholly to the big context, from its back ...
  ASSERT_EQ(st.plan.swap_out.size(), 34u);
  for (size_t i = 0; i < st.plan.swap_out.size(); ++i) {
    EXPECT_EQ(st.plan.swap_out[i].src, big_blocks[big_blocks.size() - 34 + i]);
  }
  EXPECT_EQ(sim.request(big).state, RequestState::kSwappingOut);
  // ... and the small one, out of budget, takes the cheaper of discard and preserve: discard.
  EXPECT_TRUE(contains(st.plan.discarded, small));
  EXPECT_EQ(sim.request(small).state, RequestState::kDiscarded);
}

// ---- (c) memory pressure ------------------------------------------------------------------

class EveryPolicy : public ::testing::TestWithParam<Policy> {};

INSTANTIATE_TEST_SUITE_P(Policies, EveryPolicy, ::testing::ValuesIn(all_policies()),
                         [](const ::testing::TestParamInfo<Policy>& info) { return test_name(info.param); });

TEST_P(EveryPolicy, TinyDevicePoolPreemptsRunningRequestsWithoutLosingAny) {
  // Four requests that each grow to 10 + 12 = 22 tokens (2 blocks of 16) in a pool of 6 blocks:
  // they cannot all hold their contexts at once.
  constexpr int32_t kNumRequests = 4;
  constexpr int32_t kNumDeviceBlocks = 6;
  constexpr int32_t kNumHostBlocks = 64;
  constexpr int32_t kGenerated = 12;
  constexpr int32_t kPrompt = 10;
  Sim sim{make_config(GetParam(), kNumDeviceBlocks, kNumHostBlocks, /*max_batched_tokens=*/32)};
  std::vector<RequestId> ids;
  for (int i = 0; i < kNumRequests; ++i) ids.push_back(sim.s.add_request(kPrompt, 0.001 * i, kGenerated));
  sim.run_until([&] { return sim.s.num_live_requests() == 0; });

  for (RequestId id : ids) {
    EXPECT_EQ(sim.request(id).state, RequestState::kFinished) << "request " << id;
    EXPECT_EQ(sim.request(id).num_generated_tokens, kGenerated) << "request " << id;
  }
  EXPECT_GT(sim.s.stats().num_preemptions, 0) << "the pool was meant to be too small";
  EXPECT_EQ(sim.num_free(Tier::kDevice), kNumDeviceBlocks);
  EXPECT_EQ(sim.num_free(Tier::kHost), kNumHostBlocks);
}

TEST_P(EveryPolicy, ARequestThatOutgrowsThePoolIsAbortedAndTheOthersFinish) {
  // A pool of 4 blocks (64 tokens). The first request fits; the second would grow to
  // 30 + 100 tokens. It is preempted while the first holds memory, and when it comes back
  // alone its context no longer fits the empty pool: it must be aborted, not wait forever.
  Sim sim{make_config(GetParam(), /*num_device_blocks=*/4, /*num_host_blocks=*/4, /*max_batched_tokens=*/64)};
  RequestId small = sim.s.add_request(20, 0, 8);
  RequestId growing = sim.s.add_request(30, 0.001, 100);
  sim.run_until([&] { return sim.s.num_live_requests() == 0; });
  EXPECT_EQ(sim.request(small).state, RequestState::kFinished);
  EXPECT_EQ(sim.request(small).num_generated_tokens, 8);
  EXPECT_EQ(sim.request(growing).state, RequestState::kAborted);
  EXPECT_EQ(sim.num_free(Tier::kDevice), 4);
  EXPECT_EQ(sim.num_free(Tier::kHost), 4);
}

TEST_P(EveryPolicy, ToolCallsUnderMemoryPressureLoseNothing) {
  // Each request calls a 50 ms tool after its 3rd token and gets 5 tokens back; the pool holds
  // about half of what they want at once.
  constexpr int32_t kNumRequests = 6;
  constexpr int32_t kNumDeviceBlocks = 8;
  constexpr int32_t kGenerated = 10;
  constexpr int32_t kInterceptAfter = 3;
  constexpr double kToolDuration_s = 0.05;
  Sim sim{make_config(GetParam(), kNumDeviceBlocks, /*num_host_blocks=*/16, /*max_batched_tokens=*/48)};
  std::vector<RequestId> ids;
  for (int i = 0; i < kNumRequests; ++i) ids.push_back(sim.s.add_request(12 + i, 0.002 * i, kGenerated));
  std::map<RequestId, double> tool_returns_at;
  std::map<RequestId, bool> intercepted;
  for (int i = 0; i < kMaxSteps && sim.s.num_live_requests() > 0; ++i) {
    for (auto it = tool_returns_at.begin(); it != tool_returns_at.end();) {
      if (it->second > sim.now_s) { ++it; continue; }
      sim.s.resume(it->first, 5, sim.now_s);
      sim.s.check_invariants();
      it = tool_returns_at.erase(it);
    }
    Sim::Step st = sim.step();
    for (RequestId id : st.out.sampled) {
      const Request& r = sim.request(id);
      if (r.state != RequestState::kRunning || r.num_generated_tokens != kInterceptAfter || intercepted[id]) continue;
      intercepted[id] = true;
      sim.s.intercept(id, sim.now_s, kToolDuration_s);
      sim.s.check_invariants();
      tool_returns_at[id] = sim.now_s + kToolDuration_s;
    }
  }
  for (RequestId id : ids) {
    EXPECT_EQ(sim.request(id).state, RequestState::kFinished) << "request " << id;
    EXPECT_EQ(sim.request(id).num_intercepts, 1) << "request " << id;
    EXPECT_EQ(sim.request(id).num_tokens(), 12 + static_cast<int32_t>(id) + kGenerated + 5) << "request " << id;
  }
  EXPECT_EQ(sim.num_free(Tier::kDevice), kNumDeviceBlocks);
  EXPECT_EQ(sim.num_free(Tier::kHost), 16);
}

TEST(MemoryPressure, IdlePreservedContextGivesWayToANewRequest) {
  // Preserve keeps a paused context only while nothing else needs the memory: with the batch
  // empty, waiting forever for the tool would deadlock the engine.
  constexpr int32_t kNumDeviceBlocks = 8;
  Sim sim{make_config(Policy::kPreserve, kNumDeviceBlocks)};
  RequestId paused = sim.s.add_request(6 * kBlockSize, 0);  // 6 of the 8 blocks, 7 with its next token
  sim.run_until_sampled(paused);
  sim.s.intercept(paused, sim.now_s, 60);
  RequestId next = sim.s.add_request(4 * kBlockSize, sim.now_s, /*generated_token_limit=*/2);
  Sim::Step st = sim.step();
  EXPECT_TRUE(contains(st.plan.discarded, paused));
  EXPECT_EQ(sim.request(paused).state, RequestState::kDiscarded);
  EXPECT_EQ(sim.request(paused).kv->num_tokens_to_recompute, 6 * kBlockSize);
  sim.run_until([&] { return sim.request(next).state == RequestState::kFinished; });
  // The tool returns; the paused request recomputes and goes on.
  sim.s.resume(paused, 3, sim.now_s);
  sim.run_until_sampled(paused, 2);
  EXPECT_EQ(sim.s.stats().num_recomputed_tokens, 6 * kBlockSize);
}

TEST(MemoryPressure, MinWasteMovesAPreservedContextToTheHostRatherThanDiscardingIt) {
  // A short tool call is preserved; when a new request then needs the memory and the host has
  // room, the context goes to the host whole and comes back without recompute.
  constexpr int32_t kNumDeviceBlocks = 8;
  Sim sim{make_config(Policy::kInfercept, kNumDeviceBlocks)};
  RequestId paused = sim.s.add_request(6 * kBlockSize, 0);
  sim.run_until_sampled(paused);
  sim.s.intercept(paused, sim.now_s, 1e-4);
  ASSERT_EQ(sim.request(paused).state, RequestState::kPreserved);
  RequestId next = sim.s.add_request(4 * kBlockSize, sim.now_s, /*generated_token_limit=*/2);
  Sim::Step st = sim.step();
  EXPECT_FALSE(contains(st.plan.discarded, paused));
  EXPECT_EQ(st.plan.swap_out.size(), 6u);  // the computed prompt; its sampled token is not computed yet
  sim.run_until([&] { return sim.request(next).state == RequestState::kFinished; });
  EXPECT_EQ(sim.request(paused).state, RequestState::kSwapped);
  sim.s.resume(paused, 3, sim.now_s);
  sim.run_until_sampled(paused, 2);
  EXPECT_EQ(sim.s.stats().num_recomputed_tokens, 0);
  EXPECT_EQ(sim.request(paused).num_preemptions, 0);
}

TEST(MemoryPressure, MinWasteFreesOnlyWhatTheStepLacksWithinTheBudget) {
  // A 4000-token context (250 blocks) preserved for a 0.1 s tool (shorter than its 147 ms round
  // trip), and a request that fills the rest of the pool and keeps decoding. When its decode
  // needs a block, min-waste swaps the paused tail out within the step's budget (the forward
  // hides it) instead of the whole context at once (which would stall the batch ~60 ms).
  constexpr int32_t kNumDeviceBlocks = 300;
  SchedulerConfig config = make_config(Policy::kInfercept, kNumDeviceBlocks);
  config.demand_aware_preserve = true;
  Sim sim{config};
  RequestId paused = sim.s.add_request(4000, 0);
  sim.run_until_sampled(paused);
  sim.s.intercept(paused, sim.now_s, 0.1);
  ASSERT_EQ(sim.request(paused).state, RequestState::kPreserved);
  RequestId filler = sim.s.add_request(49 * kBlockSize + 15, sim.now_s, /*generated_token_limit=*/8);
  bool reclaimed = false;
  for (int i = 0; i < 20 && !reclaimed; ++i) {
    Sim::Step st = sim.step();
    if (sim.request(paused).state == RequestState::kPreserved) continue;
    reclaimed = true;
    EXPECT_FALSE(contains(st.plan.discarded, paused));
    EXPECT_EQ(sim.request(paused).state, RequestState::kSwappingOut);
    EXPECT_GE(st.plan.swap_out.size(), 1u);
    EXPECT_LE(st.plan.swap_out.size() * kBlockSize, static_cast<size_t>(st.plan.swap_budget_tokens));
    EXPECT_LT(st.plan.swap_out.size(), 250u);
  }
  ASSERT_TRUE(reclaimed);
  EXPECT_EQ(sim.request(filler).num_preemptions, 0);
  sim.run_until([&] { return sim.request(filler).state == RequestState::kFinished; });
  sim.s.resume(paused, 3, sim.now_s);
  sim.run_until_sampled(paused, 2);
  EXPECT_EQ(sim.s.stats().num_recomputed_tokens, 0);
}

TEST(MemoryPressure, AResumableContextThatGivesWayGoesToTheHostRatherThanBeingDiscarded) {
  // Two paused requests return from their tools at once. The earlier arrival heads the queue
  // and needs memory that the later one's preserved context holds; with host room, that
  // context is moved to the host and comes back later without recompute.
  constexpr int32_t kNumDeviceBlocks = 8;
  Sim sim{make_config(Policy::kInfercept, kNumDeviceBlocks)};
  RequestId early = sim.s.add_request(3 * kBlockSize, 0, /*generated_token_limit=*/4);
  RequestId late = sim.s.add_request(5 * kBlockSize, 0.001, /*generated_token_limit=*/4);
  sim.run_until([&] {
    return sim.request(early).num_generated_tokens >= 1 && sim.request(late).num_generated_tokens >= 1;
  });
  sim.s.intercept(early, sim.now_s, 30);   // long enough to leave the device
  sim.s.intercept(late, sim.now_s, 1e-4);  // short: preserved
  sim.step();
  ASSERT_TRUE(sim.request(early).kv->device_blocks.empty()) << to_string(sim.request(early).state);
  ASSERT_EQ(sim.request(late).state, RequestState::kPreserved);
  const int64_t recomputed_before = sim.s.stats().num_recomputed_tokens;
  // Both return; the early one wants its context plus 20 tool tokens back: more than is free.
  sim.s.resume(early, 20, sim.now_s);
  sim.s.resume(late, 3, sim.now_s);
  sim.run_until([&] { return sim.s.num_live_requests() == 0; });
  EXPECT_EQ(sim.request(early).state, RequestState::kFinished);
  EXPECT_EQ(sim.request(late).state, RequestState::kFinished);
  EXPECT_GT(sim.s.stats().num_swap_out_blocks, 0) << "late was meant to give way";
  // Both contexts came back from the host; discarding the late one would recompute 80 tokens.
  EXPECT_EQ(sim.s.stats().num_recomputed_tokens - recomputed_before, 0);
  EXPECT_EQ(sim.num_free(Tier::kDevice), kNumDeviceBlocks);
}

// ---- (d) policy semantics -----------------------------------------------------------------

struct ResumeOrderCase {
  Policy policy;
  bool resumed_runs_before_later_arrival;
};

class ResumeOrder : public ::testing::TestWithParam<ResumeOrderCase> {};

INSTANTIATE_TEST_SUITE_P(Policies, ResumeOrder,
                         ::testing::Values(ResumeOrderCase{Policy::kVllm02, false}, ResumeOrderCase{Policy::kDiscard, true},
                                           ResumeOrderCase{Policy::kPreserve, true}, ResumeOrderCase{Policy::kSwap, true},
                                           ResumeOrderCase{Policy::kInfercept, true}),
                         [](const ::testing::TestParamInfo<ResumeOrderCase>& info) { return test_name(info.param.policy); });

TEST_P(ResumeOrder, VllmResumesAtTheBackOthersKeepTheOriginalArrival) {
  // One request runs at a time, so whoever heads the queue when the slot frees goes next.
  SchedulerConfig config = make_config(GetParam().policy);
  config.max_running_requests = 1;
  Sim sim{config};
  RequestId early = sim.s.add_request(16, 0);
  sim.run_until_sampled(early);
  sim.s.intercept(early, sim.now_s, 1.0);
  RequestId blocker = sim.s.add_request(16, sim.now_s);  // takes the slot while the tool runs
  sim.run_until_sampled(blocker);
  const double later_arrival_s = sim.now_s;
  RequestId later = sim.s.add_request(16, later_arrival_s);
  const double resume_s = later_arrival_s + 0.5;
  sim.now_s = resume_s;
  sim.s.resume(early, 4, resume_s);
  if (GetParam().policy == Policy::kVllm02) {
    // Re-entered as new: waiting, keyed by the resume time.
    EXPECT_EQ(sim.request(early).state, RequestState::kWaiting);
    EXPECT_DOUBLE_EQ(sim.request(early).priority_s, resume_s);
  } else {
    EXPECT_DOUBLE_EQ(sim.request(early).priority_s, 0);
  }
  sim.s.finish(blocker);
  Sim::Step st = sim.step();
  ASSERT_FALSE(st.plan.is_empty());
  // A swapped context is admitted by starting its swap-in, with nothing to compute yet.
  RequestId first = st.plan.scheduled.empty() ? early : st.plan.scheduled.front().request_id;
  if (st.plan.scheduled.empty()) EXPECT_FALSE(st.plan.swap_in.empty());
  EXPECT_EQ(first, GetParam().resumed_runs_before_later_arrival ? early : later);
}

TEST(PolicySemantics, DiscardFreesTheContextAtTheInterceptAndRecomputesItOnResume) {
  Sim sim{make_config(Policy::kDiscard)};
  RequestId r = sim.s.add_request(100, 0);
  sim.run_until_sampled(r);
  sim.s.intercept(r, sim.now_s, 5);
  EXPECT_EQ(sim.request(r).state, RequestState::kDiscarded);
  EXPECT_EQ(sim.num_free(Tier::kDevice), 1024);
  EXPECT_EQ(sim.request(r).kv->num_tokens_to_recompute, 100);
  sim.s.resume(r, 4, sim.now_s + 5);
  Sim::Step st = sim.step();
  ASSERT_EQ(st.plan.scheduled.size(), 1u);
  // The 100 discarded tokens, the sampled token and the 4 tool tokens in one chunk.
  EXPECT_EQ(st.plan.scheduled[0].num_new_tokens, 105);
  EXPECT_EQ(st.plan.scheduled[0].num_recompute_tokens, 100);
  EXPECT_TRUE(st.plan.scheduled[0].samples);
}

TEST(PolicySemantics, PreserveKeepsTheBlocksThroughALongToolCall) {
  Sim sim{make_config(Policy::kPreserve)};
  RequestId decoder = sim.s.add_request(16, 0);
  RequestId paused = sim.s.add_request(200, 0.001);
  sim.run_until_sampled(paused);
  const std::vector<BlockId> blocks = sim.request(paused).kv->device_blocks;
  sim.s.intercept(paused, sim.now_s, 10);
  for (int i = 0; i < 20; ++i) {
    Sim::Step st = sim.step();
    EXPECT_TRUE(st.plan.swap_out.empty());
    EXPECT_TRUE(st.plan.discarded.empty());
    EXPECT_TRUE(contains(st.out.sampled, decoder));
  }
  EXPECT_EQ(sim.request(paused).state, RequestState::kPreserved);
  EXPECT_EQ(sim.request(paused).kv->device_blocks, blocks);
  sim.now_s += 10;
  sim.s.resume(paused, 4, sim.now_s);
  sim.run_until_sampled(paused, 2);
  EXPECT_EQ(sim.s.stats().num_recomputed_tokens, 0);
  EXPECT_TRUE(std::equal(blocks.begin(), blocks.end(), sim.request(paused).kv->device_blocks.begin()));
}

TEST(PolicySemantics, SwapMovesTheWholeContextOutThenBackInIgnoringTheBudget) {
  Sim sim{make_config(Policy::kSwap)};
  sim.s.add_request(16, 0);  // a decode beside it
  RequestId paused = sim.s.add_request(1000, 0.001);  // 63 blocks, past the 34-block budget
  sim.run_until_sampled(paused);
  const std::vector<BlockId> device_blocks = sim.request(paused).kv->device_blocks;
  ASSERT_EQ(device_blocks.size(), 63u);
  sim.s.intercept(paused, sim.now_s, 5);
  EXPECT_EQ(sim.request(paused).state, RequestState::kSwappingOut);

  Sim::Step out = sim.step();
  ASSERT_EQ(out.plan.swap_out.size(), device_blocks.size());
  EXPECT_GT(out.plan.swap_out.size() * kBlockSize, static_cast<size_t>(out.plan.swap_budget_tokens));
  for (size_t i = 0; i < device_blocks.size(); ++i) EXPECT_EQ(out.plan.swap_out[i].src, device_blocks[i]);
  EXPECT_EQ(sim.request(paused).state, RequestState::kSwapped);
  const std::vector<BlockId> host_blocks = sim.request(paused).kv->host_blocks;
  ASSERT_EQ(host_blocks.size(), device_blocks.size());
  for (size_t i = 0; i < host_blocks.size(); ++i) EXPECT_EQ(host_blocks[i], out.plan.swap_out[i].dst);

  sim.now_s += 5;
  sim.s.resume(paused, 4, sim.now_s);
  Sim::Step in = sim.step();
  ASSERT_EQ(in.plan.swap_in.size(), host_blocks.size());
  for (size_t i = 0; i < host_blocks.size(); ++i) EXPECT_EQ(in.plan.swap_in[i].src, host_blocks[i]);
  EXPECT_EQ(sim.request(paused).state, RequestState::kRunning);
  EXPECT_EQ(sim.num_free(Tier::kHost), 1024);
  sim.run_until_sampled(paused, 2);
  EXPECT_EQ(sim.s.stats().num_recomputed_tokens, 0);
}

// ---- (e) the token budget -----------------------------------------------------------------

TEST(TokenBudget, ChunkedPrefillNeverExceedsMaxBatchedTokens) {
  constexpr int32_t kMaxBatched = 64;
  Sim sim{make_config(Policy::kInfercept, 1024, 1024, kMaxBatched)};
  RequestId r = sim.s.add_request(200, 0);
  std::vector<int32_t> chunks;
  while (sim.request(r).num_generated_tokens == 0) {
    Sim::Step st = sim.step();
    ASSERT_EQ(st.plan.scheduled.size(), 1u);
    EXPECT_LE(st.plan.num_batched_tokens, kMaxBatched);
    // Only the chunk that reaches the end of the prompt samples.
    EXPECT_EQ(st.plan.scheduled[0].samples, sim.request(r).num_generated_tokens == 1);
    chunks.push_back(st.plan.scheduled[0].num_new_tokens);
  }
  EXPECT_EQ(chunks, (std::vector<int32_t>{64, 64, 64, 8}));
}

TEST(TokenBudget, RecomputeChunksRideAlongWithDecodesWithinMaxBatchedTokens) {
  constexpr int32_t kMaxBatched = 64;
  constexpr int32_t kContext = 200;
  Sim sim{make_config(Policy::kDiscard, 1024, 1024, kMaxBatched)};
  RequestId decoder = sim.s.add_request(16, 0);  // arrived first: its decode goes first
  RequestId resumed = sim.s.add_request(kContext, 0.001);
  sim.run_until_sampled(resumed);
  sim.s.intercept(resumed, sim.now_s, 1);
  sim.now_s += 1;
  sim.s.resume(resumed, 10, sim.now_s);
  int32_t num_recomputed = 0;
  while (sim.request(resumed).num_generated_tokens < 2) {
    Sim::Step st = sim.step();
    EXPECT_LE(st.plan.num_batched_tokens, kMaxBatched);
    EXPECT_TRUE(contains(st.out.sampled, decoder)) << "the recompute must not stall the running decode";
    num_recomputed += st.plan.num_recompute_tokens;
  }
  EXPECT_EQ(num_recomputed, kContext);
  EXPECT_EQ(sim.s.stats().num_recomputed_tokens, kContext);
  // 200 + 1 + 10 = 211 tokens to compute, 63 a step beside the decode: 4 steps (63, 63, 63, 22).
  EXPECT_EQ(sim.request(resumed).kv->num_tokens, kContext + 1 + 10);
}

// ---- ranking by predicted work (LAMPS-style) -------------------------------------------------

struct RankingCase {
  double rank_s_per_predicted_token;
  bool short_work_first;
};

class RankByPredictedWork : public ::testing::TestWithParam<RankingCase> {};

INSTANTIATE_TEST_SUITE_P(Ranking, RankByPredictedWork,
                         ::testing::Values(RankingCase{0.0, false}, RankingCase{0.01, true}),
                         [](const ::testing::TestParamInfo<RankingCase>& info) {
                           return info.param.short_work_first ? std::string("Ranked") : std::string("Fcfs");
                         });

TEST_P(RankByPredictedWork, ShorterPredictedWorkIsAdmittedFirstOnlyWhenRanked) {
  SchedulerConfig config = make_config(Policy::kInfercept);
  config.max_running_requests = 1;
  config.rank_s_per_predicted_token = GetParam().rank_s_per_predicted_token;
  Sim sim{config};
  RequestId blocker = sim.s.add_request(16, 0);
  sim.run_until_sampled(blocker);
  RequestId long_work = sim.s.add_request(16, 0.1);
  RequestId short_work = sim.s.add_request(16, 0.2);
  sim.s.set_predicted_output_tokens(long_work, 500);  // key 0.1 + 5 s when ranked
  sim.s.set_predicted_output_tokens(short_work, 10);  // key 0.2 + 0.1 s
  sim.s.check_invariants();
  sim.s.finish(blocker);
  Sim::Step st = sim.step();
  ASSERT_EQ(st.plan.scheduled.size(), 1u);
  EXPECT_EQ(st.plan.scheduled.front().request_id, GetParam().short_work_first ? short_work : long_work);
  // Withdrawing the prediction gives back the FCFS key.
  sim.s.set_predicted_output_tokens(long_work, -1);
  EXPECT_DOUBLE_EQ(sim.request(long_work).priority_s, 0.1);
  sim.s.check_invariants();
}

TEST(RankByPredictedWork, ReRankingARunningRequestKeepsThePreemptionOrder) {
  // The running list stays sorted by key, so the request preempted first is the one ranked last.
  SchedulerConfig config = make_config(Policy::kInfercept);
  config.rank_s_per_predicted_token = 1.0;
  Sim sim{config};
  RequestId a = sim.s.add_request(16, 0);
  RequestId b = sim.s.add_request(16, 0.5);
  sim.run_until_sampled(a);
  sim.run_until_sampled(b);
  sim.s.set_predicted_output_tokens(a, 3);  // a's key 3.0 passes b's 0.5
  EXPECT_DOUBLE_EQ(sim.request(a).priority_s, 3.0);
  EXPECT_DOUBLE_EQ(sim.request(b).priority_s, 0.5);
  sim.s.check_invariants();
  sim.run_until_sampled(a, 3);
  sim.s.check_invariants();
}

TEST(RankByPredictedWork, ANegativeOrNonFiniteRateIsRejected) {
  SchedulerConfig config = make_config(Policy::kInfercept);
  config.rank_s_per_predicted_token = -0.5;
  EXPECT_THROW(config.validate(), InvalidArgumentError);
  config.rank_s_per_predicted_token = std::numeric_limits<double>::infinity();
  EXPECT_THROW(config.validate(), InvalidArgumentError);
}

}  // namespace
}  // namespace infercept
