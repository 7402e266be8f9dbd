// The paper's waste equations (DESIGN.md §2) against numbers worked out by hand, and the
// scheduler's per-step waste accounting that reports them.
#include "infercept/waste_model.h"

#include <gtest/gtest.h>

#include "infercept/scheduler.h"

namespace infercept {
namespace {

constexpr double kTolerance = 1e-9;  // relative; every expected value below is exact in decimal

// Round numbers so the arithmetic fits in a comment:
//   T_fwd(n)  = 10 ms + 0.1 ms * n
//   T_swap(n) = 0.2 ms * n
//   M         = 1000 bytes per token
CostModel round_model() {
  CostModel model;
  model.forward.intercept_s = 10e-3;
  model.forward.slope_s_per_token = 0.1e-3;
  model.swap.slope_s_per_token = 0.2e-3;
  model.kv_bytes_per_token = 1000;
  model.saturation_tokens = 512;
  model.kv_capacity_tokens = 1 << 20;
  return model;
}

void expect_near_relative(double actual, double expected) {
  EXPECT_NEAR(actual, expected, kTolerance * (expected == 0 ? 1 : expected));
}

// ---- equations 1-4 ------------------------------------------------------------------------

TEST(WasteEquations, DiscardIsOwnMemoryPlusOthersHeldUpWhileRecomputing) {
  // C = 100, C_other = 300: T_fwd(100) = 20 ms.
  // 0.020 s * 100 * 1000 B + 0.020 s * 300 * 1000 B = 2,000 + 6,000 = 8,000 B*s.
  expect_near_relative(discard_waste(round_model(), 100, 300), 8000);
  // Alone, only its own memory counts: 2,000 B*s.
  expect_near_relative(discard_waste(round_model(), 100, 0), 2000);
}

TEST(WasteEquations, PreserveIsTheContextHeldForTheWholeIntercept) {
  // 2.5 s * 100 tokens * 1000 B = 250,000 B*s.
  expect_near_relative(preserve_waste(round_model(), 100, 2.5), 250000);
  EXPECT_EQ(preserve_waste(round_model(), 100, 0), 0);
}

TEST(WasteEquations, SwapIsTheBatchStalledForTheRoundTrip) {
  // T_swap(100) = 20 ms; 2 * 0.020 s * 400 batch tokens * 1000 B = 16,000 B*s.
  expect_near_relative(swap_waste(round_model(), 100, 400), 16000);
  // Nothing to move, nothing stalls (the swap fit's fixed cost does not apply).
  EXPECT_EQ(swap_waste(round_model(), 0, 400), 0);
}

TEST(WasteEquations, ChunkedDiscardHalvesOwnMemoryAndPaysPerChunk) {
  // C = 100, C_other = 300, n = 4 chunks of 25 tokens:
  //   own:    T_fwd(100) * 100 * 1000 / 2 = 0.020 * 100,000 / 2 = 1,000
  //   others: 4 * T_fwd(25) * 300 * 1000  = 4 * 0.0125 * 300,000 = 15,000
  expect_near_relative(chunked_discard_waste(round_model(), 100, 300, 4), 16000);
}

TEST(WasteEquations, OneChunkDiffersFromPlainDiscardOnlyByHalfTheOwnTerm) {
  // n = 1: 1,000 + 1 * T_fwd(100) * 300,000 = 1,000 + 6,000 = 7,000 = 8,000 - 2,000 / 2.
  expect_near_relative(chunked_discard_waste(round_model(), 100, 300, 1), 7000);
}

TEST(WasteEquations, NonPositiveChunkCountMeansOneChunk) {
  expect_near_relative(chunked_discard_waste(round_model(), 100, 300, 0), 7000);
  expect_near_relative(chunked_discard_waste(round_model(), 100, 300, -2), 7000);
}

TEST(WasteEquations, MoreChunksCostTheOthersTheFixedForwardTimeAgain) {
  // n = 10 chunks of 10 tokens: 1,000 + 10 * T_fwd(10) * 300,000 = 1,000 + 10 * 0.011 * 300,000
  // = 34,000, more than four chunks (16,000): each chunk pays T_fwd's 10 ms intercept again.
  expect_near_relative(chunked_discard_waste(round_model(), 100, 300, 10), 34000);
  EXPECT_GT(chunked_discard_waste(round_model(), 100, 300, 10), chunked_discard_waste(round_model(), 100, 300, 4));
}

TEST(WasteEquations, AnAttentionTermLengthensTheRecomputeByTheContextItRereads) {
  // a = 0.01 ms per context token attended. C = 100, C_other = 300.
  CostModel model = round_model();
  model.attention_s_per_context_token = 0.01e-3;
  // One go: T_fwd(100) + a*100 = 20 ms + 1 ms = 21 ms; 0.021 * (100 + 300) * 1000 = 8,400.
  expect_near_relative(discard_waste(model, 100, 300), 8400);
  // n = 4 chunks of 25: they read 25 + 50 + 75 + 100 = 250 = 100 * 5 / 2 tokens, A = 2.5 ms.
  //   own:    (20 + 2.5) ms * 100 * 1000 / 2 = 1,125
  //   others: (4 * 12.5 + 2.5) ms * 300 * 1000 = 0.0525 * 300,000 = 15,750
  expect_near_relative(chunked_discard_waste(model, 100, 300, 4), 16875);
  // One chunk reads the context once, as the one-go discard does.
  expect_near_relative(chunked_discard_waste(model, 100, 300, 1), 0.021 * 100 * 1000 / 2 + 0.021 * 300 * 1000);
}

TEST(WasteEquations, ShortInterceptsFavourPreserveAndLongOnesDiscard) {
  // Preserve beats 4-chunk discard (16,000 B*s) while T_INT * 100 * 1000 < 16,000: T_INT < 0.16 s.
  const double discard = chunked_discard_waste(round_model(), 100, 300, 4);
  EXPECT_LT(preserve_waste(round_model(), 100, 0.1), discard);
  EXPECT_GT(preserve_waste(round_model(), 100, 1.0), discard);
}

TEST(WasteEquations, GptjThirtySecondToolCallOnAThousandTokenContext) {
  // The paper's setting: M = 458,752 B, T_fwd(1000) = 10 ms + 46.3 ms = 56.3 ms.
  CostModel gptj = CostModel::builtin("gptj-6b-a100");
  // Discard, alone: 0.0563 s * 1000 * 458,752 B = 25,827,737.6 B*s.
  expect_near_relative(discard_waste(gptj, 1000, 0), 25827737.6);
  // Preserve for 30 s: 30 * 1000 * 458,752 = 13,762,560,000 B*s, over 500x the discard.
  expect_near_relative(preserve_waste(gptj, 1000, 30), 13762560000.0);
  // Swap behind a 512-token batch: T_swap(1000) = 1000 * 18.35008 us = 18.35008 ms;
  // 2 * 0.01835008 * 512 * 458,752 = 8,620,126,846.976 B*s, if nothing hid the copy.
  expect_near_relative(swap_waste(gptj, 1000, 512), 2 * 0.01835008 * 512 * 458752.0);
}

// ---- accounting in the scheduler ----------------------------------------------------------

constexpr int32_t kBlockSize = 16;
constexpr int32_t kNumDeviceBlocks = 64;  // 1024 tokens of KV
constexpr int32_t kPromptTokens = 32;     // two full blocks

SchedulerConfig config_for(Policy policy) {
  SchedulerConfig config;
  config.policy = policy;
  config.block_size = kBlockSize;
  config.num_device_blocks = kNumDeviceBlocks;
  config.num_host_blocks = kNumDeviceBlocks;
  return config;
}

TEST(WasteAccounting, PreservedContextIsChargedItsMemoryForTheIdleTime) {
  Scheduler s(config_for(Policy::kPreserve), round_model());
  RequestId r = s.add_request(kPromptTokens, 0);
  StepPlan prefill = s.schedule(0);
  s.update(prefill, {/*duration_s=*/0.01}, 0.01);
  s.intercept(r, 0.01);
  // One idle second: 32 tokens * 1000 B * 1 s = 32,000 B*s.
  StepPlan idle = s.schedule(1.01);
  EXPECT_TRUE(idle.is_empty());
  s.update(idle, {0}, 1.01);
  expect_near_relative(s.ledger().waste.preserved_idle_byte_s, 32000);
  expect_near_relative(s.request(r).waste.preserved_idle_byte_s, 32000);
  // Against the whole pool over 1.01 s: 1024 tokens * 1000 B * 1.01 s = 1,034,240 B*s.
  expect_near_relative(s.ledger().capacity_byte_s, 1034240);
  expect_near_relative(s.ledger().waste_fraction(), 32000.0 / 1034240);
}

TEST(WasteAccounting, BlocksBeingCopiedOutAreChargedUntilTheStepThatMovesThemEnds) {
  // Swapping does not free memory at once: the blocks stay occupied while the step copies
  // them, so a swap-out costs one step of the context, like preserving it for that step.
  Scheduler s(config_for(Policy::kSwap), round_model());
  RequestId r = s.add_request(kPromptTokens + 3, 0);  // two full blocks and a partial one
  StepPlan prefill = s.schedule(0);
  s.update(prefill, {0.01}, 0.01);
  s.intercept(r, 0.01);
  StepPlan step = s.schedule(0.01);
  ASSERT_EQ(step.swap_out.size(), 3u);
  s.update(step, {/*duration_s=*/0.5}, 0.51);
  // 35 tokens * 1000 B * 0.5 s = 17,500 B*s; once on the host, nothing more.
  expect_near_relative(s.request(r).waste.preserved_idle_byte_s, 17500);
  StepPlan idle = s.schedule(1.51);
  s.update(idle, {0}, 1.51);
  expect_near_relative(s.ledger().waste.preserved_idle_byte_s, 17500);
}

TEST(WasteAccounting, RecomputeIsChargedItsRebuiltMemoryAndTheDelayItCauses) {
  Scheduler s(config_for(Policy::kDiscard), round_model());
  RequestId r = s.add_request(kPromptTokens, 0);
  StepPlan prefill = s.schedule(0);
  s.update(prefill, {0.01}, 0.01);
  s.intercept(r, 0.01);  // the 32 tokens of KV are freed
  s.resume(r, /*num_tool_tokens=*/0, 1.0);
  StepPlan recompute = s.schedule(1.0);
  ASSERT_EQ(recompute.scheduled.size(), 1u);
  // 32 rebuilt tokens plus the sampled token's first KV: B = 33, R = 32.
  ASSERT_EQ(recompute.num_batched_tokens, 33);
  ASSERT_EQ(recompute.num_recompute_tokens, 32);
  // A step of T_fwd(33) = 13.3 ms. Without the recompute it would take T_fwd(1) = 10.1 ms, so
  // the delay is 13.3 * (1 - 10.1 / 13.3) = 3.2 ms.
  // Own memory: 32 tokens * 1000 B * 0.0133 s = 425.6; delay over the one other token in the
  // batch: 0.0032 s * 1 * 1000 B = 3.2. Total 428.8 B*s.
  const double duration_s = 0.0133;
  s.update(recompute, {duration_s}, 1.0 + duration_s);
  expect_near_relative(s.ledger().waste.recompute_byte_s, 428.8);
  expect_near_relative(s.request(r).waste.recompute_byte_s, 428.8);
  EXPECT_EQ(s.stats().num_recomputed_tokens, 32);
}

TEST(WasteAccounting, SwapStallIsChargedToTheRequestsBeingMoved) {
  Scheduler s(config_for(Policy::kSwap), round_model());
  RequestId moved = s.add_request(kPromptTokens, 0);
  RequestId other = s.add_request(kBlockSize, 0);
  StepPlan prefill = s.schedule(0);
  s.update(prefill, {0.01}, 0.01);
  s.intercept(moved, 0.01);
  StepPlan step = s.schedule(0.01);
  ASSERT_EQ(step.swap_out.size(), 2u);  // both blocks of the paused context at once
  ASSERT_EQ(step.scheduled.size(), 1u);  // the other request decodes
  // The batch holds 16 + 1 tokens; it waited 5 ms on the copy: 0.005 * 17 * 1000 = 85 B*s.
  s.update(step, {/*duration_s=*/0.02, /*swap_stall_s=*/0.005}, 0.03);
  expect_near_relative(s.ledger().waste.swap_stall_byte_s, 85);
  expect_near_relative(s.request(moved).waste.swap_stall_byte_s, 85);
  EXPECT_EQ(s.request(other).waste.swap_stall_byte_s, 0);
}

TEST(WasteAccounting, CountersAddUpToTheTotal) {
  WasteCounters a{1, 2, 3};
  WasteCounters b{10, 20, 30};
  a += b;
  EXPECT_EQ(a.preserved_idle_byte_s, 11);
  EXPECT_EQ(a.recompute_byte_s, 22);
  EXPECT_EQ(a.swap_stall_byte_s, 33);
  EXPECT_EQ(a.total_byte_s(), 66);
  EXPECT_EQ(WasteLedger{}.waste_fraction(), 0) << "no capacity accounted yet: no fraction";
}

}  // namespace
}  // namespace infercept
