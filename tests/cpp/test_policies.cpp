// The policy table and today's baselines: vllm-v1 (a tool call ends the request into the LRU
// prefix cache; the continuation is new), vllm-v1-offload (blocks stored to a host LRU as they
// are computed, host hits swapped back in) and continuum (pinned for a TTL per tool, program
// FCFS). Invariants are checked after every step (sim_test::Sim).
#include <gtest/gtest.h>

#include <numeric>
#include <set>
#include <string>
#include <vector>

#include "infercept/errors.h"
#include "infercept/policy.h"
#include "infercept/tool_durations.h"
#include "scheduler_sim.h"

namespace infercept {
namespace {

using sim_test::contains;
using sim_test::iota_tokens;
using sim_test::kBlockSize;
using sim_test::make_config;
using sim_test::Sim;

const ScheduledRequest* find_scheduled(const StepPlan& plan, RequestId id) {
  for (const ScheduledRequest& s : plan.scheduled) {
    if (s.request_id == id) return &s;
  }
  return nullptr;
}

// ---- the table ----------------------------------------------------------------------------

TEST(PolicyTable, EveryPolicyRoundTripsThroughItsName) {
  std::set<std::string> names;
  for (Policy policy : all_policies()) {
    EXPECT_EQ(parse_policy(to_string(policy)), policy);
    EXPECT_EQ(traits(policy).policy, policy);
    names.insert(to_string(policy));
  }
  EXPECT_EQ(names.size(), 8u);
  EXPECT_EQ(parse_policy("vllm"), Policy::kVllm02);  // the deprecated alias
  try {
    parse_policy("vllm-v2");
    FAIL() << "parsed an unknown policy";
  } catch (const InvalidArgumentError& e) {
    std::string what = e.what();
    EXPECT_NE(what.find("'vllm-v2'"), std::string::npos) << what;
    EXPECT_NE(what.find("vllm-v1-offload"), std::string::npos) << what;
    EXPECT_NE(what.find("continuum"), std::string::npos) << what;
  }
}

TEST(PolicyTable, RowsSayWhatSetsTheBaselinesApart) {
  EXPECT_FALSE(traits(Policy::kVllm02).uses_prefix_cache);
  for (Policy p : {Policy::kVllmV1, Policy::kVllmV1Offload}) {
    EXPECT_EQ(traits(p).on_intercept, InterceptAction::kEndRequest);
    EXPECT_EQ(traits(p).resume_order, ResumeOrder::kNewArrival);
    EXPECT_EQ(traits(p).eviction_order, EvictionOrder::kLeastRecentlyUsed);
    EXPECT_TRUE(traits(p).uses_prefix_cache);
  }
  EXPECT_EQ(traits(Policy::kVllmV1Offload).host_offload, HostOffload::kStoreOnCompute);
  EXPECT_EQ(traits(Policy::kVllmV1).host_offload, HostOffload::kNone);
  EXPECT_EQ(traits(Policy::kContinuum).on_intercept, InterceptAction::kPinWithTtl);
  EXPECT_EQ(traits(Policy::kContinuum).resume_order, ResumeOrder::kOriginalArrival);
  for (Policy p : all_policies()) EXPECT_EQ(traits(p).honours_swap_budget, p != Policy::kSwap) << to_string(p);
  for (Policy p : all_policies()) {
    EXPECT_EQ(traits(p).swaps, p == Policy::kSwap || p == Policy::kInfercept) << to_string(p);
  }
}

// ---- vllm-v1 ------------------------------------------------------------------------------

// A paused turn of 64 prompt tokens and one later arrival, under a budget that fits one prompt
// per step: where the resumed turn lands in the queue shows in which one the next step runs.
class ResumeQueueing : public ::testing::TestWithParam<Policy> {};

TEST_P(ResumeQueueing, VllmV1QueuesTheContinuationBehindLaterArrivalsAndReusesItsPrefix) {
  const Policy policy = GetParam();
  Sim sim{make_config(policy, 64, 64, /*max_batched_tokens=*/64)};
  RequestId turn = sim.s.add_request(iota_tokens(64), 0, 100);
  sim.run_until_sampled(turn);
  sim.s.intercept(turn, sim.now_s, 0.5, "search");
  EXPECT_EQ(sim.request(turn).state, RequestState::kDiscarded);  // the request ended
  int32_t num_free_blocks = sim.num_free(Tier::kDevice);
  EXPECT_EQ(num_free_blocks, 64);  // its blocks are free capacity (cached, evictable)

  RequestId later = sim.s.add_request(iota_tokens(64, 5000), sim.now_s + 0.1, 100);
  sim.now_s += 0.2;
  sim.s.resume(turn, iota_tokens(8, 9000), sim.now_s);
  int64_t hits_before = sim.s.stats().prefix_cache_hits;
  Sim::Step step = sim.step();
  const ScheduledRequest* resumed = find_scheduled(step.plan, turn);
  if (policy == Policy::kVllmV1 || policy == Policy::kVllmV1Offload) {
    EXPECT_GT(sim.request(turn).priority_s, sim.request(later).arrival_s);
    ASSERT_NE(find_scheduled(step.plan, later), nullptr);
    EXPECT_EQ(step.plan.scheduled.front().request_id, later) << "the later arrival goes first";
    sim.run_until([&] { return sim.request(turn).state == RequestState::kRunning; });
  } else {
    ASSERT_NE(resumed, nullptr) << "original arrival: the resumed turn goes first";
  }
  // Its context (64 prompt + 1 sampled + 8 tool tokens) is found but for the last block.
  EXPECT_EQ(sim.s.stats().prefix_cache_hits - hits_before, 64);
  EXPECT_EQ(sim.request(turn).num_tokens() - sim.request(turn).kv->num_tokens_to_recompute,
            sim.request(turn).num_tokens());
}

INSTANTIATE_TEST_SUITE_P(Policies, ResumeQueueing,
                         ::testing::Values(Policy::kVllmV1, Policy::kVllmV1Offload, Policy::kDiscard),
                         [](const auto& info) { return sim_test::test_name(info.param); });

TEST(VllmV1, PreemptionRecomputesAndNeverSwaps) {
  Sim sim{make_config(Policy::kVllmV1, 10, 64, 512)};
  // Each alone fits the pool (150 tokens: 10 blocks); together they do not.
  RequestId a = sim.s.add_request(iota_tokens(60), 0, 90);
  RequestId b = sim.s.add_request(iota_tokens(60, 3000), 0.001, 90);
  sim.run_until([&] { return sim.s.stats().num_preemptions > 0; });
  EXPECT_EQ(sim.s.stats().num_swap_out_blocks, 0);
  sim.run_until([&] { return sim.request(a).state == RequestState::kFinished &&
                             sim.request(b).state == RequestState::kFinished; });
  EXPECT_EQ(sim.s.stats().num_swap_out_blocks, 0);
}

TEST(VllmV1, CountsOnlyRequestsRunAsVllm02) {
  // The simulator's requests carry no token ids: no cache to end into, all recomputed.
  Sim sim{make_config(Policy::kVllmV1)};
  RequestId r = sim.s.add_request(64, 0, 100);
  sim.run_until_sampled(r);
  sim.s.intercept(r, sim.now_s, 0.1);
  sim.now_s += 0.1;
  sim.s.resume(r, 8, sim.now_s);
  sim.run_until_sampled(r, 2);
  EXPECT_EQ(sim.s.stats().num_recomputed_tokens, 64);  // the KV it held: all but the sampled token
}

// ---- vllm-v1-offload ----------------------------------------------------------------------

TEST(VllmV1Offload, ComputedBlocksAreStoredToTheHostAndComeBackBySwapIn) {
  Sim sim{make_config(Policy::kVllmV1Offload, 12, 64, 512)};
  std::vector<TokenId> prompt = iota_tokens(64);
  RequestId first = sim.s.add_request(prompt, 0, 2);
  std::vector<BlockId> first_blocks;
  std::vector<BlockCopy> stores;
  sim.run_until([&] { return sim.request(first).state == RequestState::kFinished; });
  // Stores are planned the step after the blocks are computed: run until they are done.
  sim.run_until([&] {
    return sim.s.stats().num_stored_blocks == 4;
  });
  EXPECT_EQ(sim.s.kv().pool(Tier::kHost).num_cached(), 4);
  EXPECT_EQ(sim.s.kv().pool(Tier::kHost).num_evictable(), 4);  // nobody's: host LRU entries

  // Others' prompts evict the device copies (12 blocks: two 80-token prompts need 12).
  RequestId x = sim.s.add_request(iota_tokens(80, 5000), sim.now_s, 2);
  RequestId y = sim.s.add_request(iota_tokens(80, 7000), sim.now_s, 2);
  sim.run_until([&] { return sim.request(x).state == RequestState::kFinished &&
                             sim.request(y).state == RequestState::kFinished; });
  ASSERT_GT(sim.s.stats().num_device_evictions, 0);

  // The same prompt again finds it on the host and swaps it in instead of recomputing.
  std::vector<TokenId> again = prompt;
  again.push_back(4242);
  RequestId second = sim.s.add_request(again, sim.now_s, 2);
  int64_t host_hits_before = sim.s.stats().prefix_cache_host_hits;
  int64_t swap_ins_before = sim.s.stats().num_swap_in_blocks;
  int64_t recomputed_before = sim.s.stats().num_recomputed_tokens;
  // Swapped in within the step it is admitted in (the copies ride behind the forward).
  sim.run_until_sampled(second);
  EXPECT_EQ(sim.s.stats().prefix_cache_host_hits - host_hits_before, 64);
  EXPECT_GE(sim.s.stats().num_swap_in_blocks - swap_ins_before, 1);
  EXPECT_EQ(sim.s.stats().num_recomputed_tokens, recomputed_before);
}

TEST(VllmV1Offload, StoresStayWithinTheSwapBudgetAndSurviveTheirSourceBeingFreed) {
  // A long prompt computes many blocks in one step; their stores are spread over the steps
  // after it, at most the budget each, and a source freed meanwhile (the request ended) keeps
  // its content until the copy is done.
  Sim sim{make_config(Policy::kVllmV1Offload, 1024, 1024, 512)};
  RequestId r = sim.s.add_request(iota_tokens(2000), 0, 100);
  sim.run_until_sampled(r);
  int64_t stored_before = sim.s.stats().num_stored_blocks;
  sim.s.intercept(r, sim.now_s, 1.0);
  Sim::Step step = sim.step();  // nothing runs: the stores alone, within the budget of an idle step
  int64_t budget_blocks = std::max<int64_t>(1, step.plan.swap_budget_tokens / kBlockSize);
  EXPECT_LE(static_cast<int64_t>(step.plan.swap_out.size()), budget_blocks);
  EXPECT_GT(sim.s.stats().num_stored_blocks, stored_before);
  sim.run_until([&] { return sim.s.stats().num_stored_blocks == 2000 / kBlockSize; });
  EXPECT_EQ(sim.s.kv().pool(Tier::kHost).num_cached(), 2000 / kBlockSize);
}

// ---- continuum ----------------------------------------------------------------------------

TEST(ContinuumTtl, PicksTheObservedDurationThatPaysBest) {
  // All calls take 0.5 s: pin for 0.5 s when the saving outweighs 0.5 s of memory ...
  std::vector<double> steady(8, 0.5);
  EXPECT_DOUBLE_EQ(continuum_ttl_s(steady, -1, /*benefit_s=*/1.0, /*cost_s_per_s=*/0.1), 0.5);
  // ... and not at all when it does not.
  EXPECT_EQ(continuum_ttl_s(steady, -1, 1.0, 4.0), 0);
  // A long tail: waiting out the rare 100 s call costs more than its return saves.
  std::vector<double> tailed(9, 0.2);
  tailed.push_back(100);
  EXPECT_DOUBLE_EQ(continuum_ttl_s(tailed, -1, 1.0, 0.1), 0.2);
  // Cold start: exponential with the prior mean; no prior, no pin.
  EXPECT_GT(continuum_ttl_s({}, 1.0, 1.0, 0.1), 0);
  EXPECT_EQ(continuum_ttl_s({}, -1, 1.0, 0.1), 0);
  EXPECT_EQ(continuum_ttl_s({0.5}, -1, 1.0, 0.1), 0);  // one sample is not a distribution
}

class ContinuumPolicy : public ::testing::Test {
 protected:
  // Calls `tool` three times on a fresh request each, each returning after `duration_s`,
  // so the core has seen the tool's distribution.
  void observe(const std::string& tool, double duration_s) {
    for (int i = 0; i < 3; ++i) {
      RequestId id = sim.s.add_request(iota_tokens(64, 100 + 1000 * next_), sim.now_s, 100);
      ++next_;
      sim.run_until_sampled(id);
      sim.s.intercept(id, sim.now_s, -1, tool);
      sim.now_s += duration_s;
      sim.s.resume(id, iota_tokens(4, 90000), sim.now_s);
      sim.run_until_sampled(id, 2);
      sim.s.abort(id);
    }
  }

  RequestId paused_turn(const std::string& tool, double arrival_s, int32_t num_tokens = 64) {
    RequestId id = sim.s.add_request(iota_tokens(num_tokens, 50000 + 1000 * next_), arrival_s, 100);
    ++next_;
    sim.run_until_sampled(id);
    sim.s.intercept(id, sim.now_s, -1, tool);
    return id;
  }

  // 16,384 device tokens; one step prefills any prompt. With GPT-J's T_fwd a pin pays for a
  // 65-token context only if its tool returns within about 3 s (B / phi, docs/baselines.md).
  Sim sim{make_config(Policy::kContinuum, 1024, 64, 16384)};
  int next_ = 0;
};

TEST_F(ContinuumPolicy, RecordsDurationsPerToolAtResume) {
  observe("grep", 0.25);
  const ToolDurations& durations = sim.s.tool_durations();
  ASSERT_EQ(durations.num_tools(), 1);
  ASSERT_EQ(durations.samples(0).size(), 3u);
  for (double d : durations.samples(0)) EXPECT_NEAR(d, 0.25, 1e-9);
}

TEST_F(ContinuumPolicy, PinsAFastToolsContextUntilItsTtlThenReleasesItToTheCache) {
  observe("grep", 0.25);
  RequestId id = paused_turn("grep", sim.now_s);
  const Request& r = sim.request(id);
  ASSERT_EQ(r.state, RequestState::kPreserved);
  EXPECT_NEAR(r.pin_until_s - r.intercept_start_s, 0.25, 1e-9);  // the TTL is the observed duration
  EXPECT_EQ(r.kv->device_blocks.size(), 4u);
  // Before the TTL the pin holds; after it the blocks go to the prefix cache.
  sim.now_s = r.intercept_start_s + 0.2;
  sim.step();
  EXPECT_EQ(r.state, RequestState::kPreserved);
  sim.now_s = r.intercept_start_s + 0.3;
  Sim::Step step = sim.step();
  EXPECT_EQ(r.state, RequestState::kDiscarded);
  EXPECT_TRUE(contains(step.plan.discarded, id));
  EXPECT_EQ(r.kv->num_tokens, 0);
  EXPECT_GE(sim.s.kv().pool(Tier::kDevice).num_evictable(), 4);  // its full blocks, cached
}

TEST_F(ContinuumPolicy, DoesNotPinForASlowTool) {
  observe("build", 60.0);
  RequestId id = paused_turn("build", sim.now_s);
  EXPECT_EQ(sim.request(id).state, RequestState::kDiscarded);
  EXPECT_EQ(sim.request(id).kv->num_tokens, 0);
}

TEST_F(ContinuumPolicy, TtlIsChosenPerTool) {
  observe("grep", 0.25);
  observe("build", 60.0);
  RequestId fast = paused_turn("grep", sim.now_s);
  RequestId slow = paused_turn("build", sim.now_s);
  EXPECT_EQ(sim.request(fast).state, RequestState::kPreserved);
  EXPECT_EQ(sim.request(slow).state, RequestState::kDiscarded);
}

TEST_F(ContinuumPolicy, UnpinsUnderMemoryPressure) {
  observe("grep", 0.25);
  RequestId pinned = paused_turn("grep", sim.now_s, 4000);  // 251 of the 1024 blocks
  ASSERT_EQ(sim.request(pinned).state, RequestState::kPreserved);
  double pin_until_s = sim.request(pinned).pin_until_s;
  // A prompt that needs more than the other blocks: the pin gives way, before its TTL.
  RequestId big = sim.s.add_request(iota_tokens(13000, 70000), sim.now_s, 100);
  Sim::Step step = sim.step();
  EXPECT_LT(step.plan.now_s, pin_until_s);
  EXPECT_TRUE(contains(step.plan.discarded, pinned));
  EXPECT_EQ(sim.request(pinned).state, RequestState::kDiscarded);
  ASSERT_NE(find_scheduled(step.plan, big), nullptr);
}

TEST_F(ContinuumPolicy, AResumedTurnKeepsItsProgramsArrival) {
  observe("grep", 0.25);
  RequestId id = paused_turn("grep", 0.0);
  sim.now_s += 0.1;
  sim.s.resume(id, iota_tokens(4, 90000), sim.now_s);
  EXPECT_EQ(sim.request(id).priority_s, sim.request(id).arrival_s);
  EXPECT_EQ(sim.request(id).pin_until_s, -1);
  Sim::Step step = sim.step();
  const ScheduledRequest* s = find_scheduled(step.plan, id);
  ASSERT_NE(s, nullptr);
  EXPECT_EQ(s->num_recompute_tokens, 0);  // still pinned when it came back: nothing recomputed
}

}  // namespace
}  // namespace infercept
