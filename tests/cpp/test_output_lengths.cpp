// The output-length predictor (OutputLengths) and the ranked queue keyed by it
// (SchedulerConfig::learn_output_lengths).
#include <gtest/gtest.h>

#include <vector>

#include "infercept/errors.h"
#include "infercept/output_lengths.h"
#include "scheduler_sim.h"

namespace infercept {
namespace {

using sim_test::iota_tokens;
using sim_test::make_config;
using sim_test::Sim;

constexpr BlockHash kApp = 42, kOtherApp = 43;
constexpr int32_t kPromptLen = 100;

TEST(OutputLengths, PredictsTheMeanRemainingWorkOfProgramsThatReachedTheTurn) {
  OutputLengths lengths;
  lengths.record(kApp, kPromptLen, {10, 20, 30});  // remaining from turn 0, 1, 2: 60, 50, 30
  lengths.record(kApp, kPromptLen, {4, 8});        // 12, 8
  EXPECT_LT(lengths.predict(kApp, kPromptLen, 0), 0) << "two programs are fewer than kMinSamples";
  lengths.record(kApp, kPromptLen, {6});           // 6
  EXPECT_DOUBLE_EQ(lengths.predict(kApp, kPromptLen, 0), (60 + 12 + 6) / 3.0);
  EXPECT_LT(lengths.predict(kApp, kPromptLen, 1), 0) << "only two programs reached turn 1";
  lengths.record(kApp, kPromptLen, {1, 2, 3, 4});  // 10, 9, 7, 4
  EXPECT_DOUBLE_EQ(lengths.predict(kApp, kPromptLen, 1), (50 + 8 + 9) / 3.0);
  EXPECT_LT(lengths.predict(kApp, kPromptLen, 2), 0);
  EXPECT_EQ(lengths.num_programs(), 4);
}

TEST(OutputLengths, PromptLengthsFallIntoHalfOctaveBuckets) {
  EXPECT_EQ(OutputLengths::length_bucket(1), 0);
  EXPECT_EQ(OutputLengths::length_bucket(2), 2);
  EXPECT_EQ(OutputLengths::length_bucket(3), 3);  // past 2 sqrt(2)
  EXPECT_EQ(OutputLengths::length_bucket(5), 4);
  EXPECT_EQ(OutputLengths::length_bucket(6), 5);
  EXPECT_EQ(OutputLengths::length_bucket(1 << 30), 60);
  EXPECT_THROW(OutputLengths::length_bucket(0), InvalidArgumentError);
}

TEST(OutputLengths, ThePromptLengthsBucketAnswersBeforeAllPrograms) {
  OutputLengths lengths;
  for (int i = 0; i < 3; ++i) lengths.record(0, 100, {50});
  for (int i = 0; i < 3; ++i) lengths.record(0, 1000, {5});
  EXPECT_DOUBLE_EQ(lengths.predict(0, 110, 0), 50) << "100 and 110 share a bucket";
  EXPECT_DOUBLE_EQ(lengths.predict(kApp, 1000, 0), 5) << "an unknown class falls to its bucket";
  EXPECT_DOUBLE_EQ(lengths.predict(0, 10000, 0), 27.5) << "an empty bucket falls to all";
}

TEST(OutputLengths, AClassWithTooFewProgramsIsAnsweredByOthers) {
  OutputLengths lengths;
  for (int i = 0; i < 3; ++i) lengths.record(kApp, kPromptLen, {100});
  lengths.record(kOtherApp, kPromptLen, {10});
  // kOtherApp has one program: all four programs answer (100 * 3 + 10) / 4.
  EXPECT_DOUBLE_EQ(lengths.predict(kOtherApp, kPromptLen, 0), 77.5);
  EXPECT_DOUBLE_EQ(lengths.predict(kApp, kPromptLen, 0), 100);
  // Class 0 (unknown) is always answered by all classes.
  EXPECT_DOUBLE_EQ(lengths.predict(0, kPromptLen, 0), 77.5);
  for (int i = 0; i < 2; ++i) lengths.record(kOtherApp, kPromptLen, {10});
  EXPECT_DOUBLE_EQ(lengths.predict(kOtherApp, kPromptLen, 0), 10);
}

TEST(OutputLengths, TheMeanFollowsAWorkloadThatChanges) {
  OutputLengths lengths;
  for (int64_t i = 0; i < OutputLengths::kWindow; ++i) lengths.record(kApp, kPromptLen, {100});
  for (int64_t i = 0; i < 4 * OutputLengths::kWindow; ++i) lengths.record(kApp, kPromptLen, {10});
  // An exponential average over ~kWindow programs: 4 windows on, (1 - 1/256)^1024 ~ 1.8% of
  // the old 90-token gap is left; a plain mean would still say 28.
  EXPECT_NEAR(lengths.predict(kApp, kPromptLen, 0), 10, 2.0);
}

TEST(OutputLengths, TurnsPastTheLastBucketShareIt) {
  OutputLengths lengths;
  std::vector<int32_t> long_program(OutputLengths::kMaxTurns + 10, 1);
  for (int i = 0; i < 3; ++i) lengths.record(kApp, kPromptLen, long_program);
  EXPECT_GE(lengths.predict(kApp, kPromptLen, OutputLengths::kMaxTurns + 5), 1);
  EXPECT_DOUBLE_EQ(lengths.predict(kApp, kPromptLen, OutputLengths::kMaxTurns + 5),
                   lengths.predict(kApp, kPromptLen, OutputLengths::kMaxTurns - 1));
}

TEST(OutputLengths, ForgetsTheLeastRecentlyTaughtClassAtCapacity) {
  OutputLengths lengths;
  for (size_t c = 1; c <= OutputLengths::kMaxClasses; ++c) lengths.record(c, kPromptLen, {1});
  EXPECT_EQ(lengths.num_classes(), OutputLengths::kMaxClasses);
  lengths.record(1, kPromptLen, {1});  // class 1 is now the most recent; class 2 the oldest
  lengths.record(OutputLengths::kMaxClasses + 1, kPromptLen, {1});
  EXPECT_EQ(lengths.num_classes(), OutputLengths::kMaxClasses);
  for (int i = 0; i < 2; ++i) lengths.record(1, kPromptLen, {1000});
  EXPECT_GT(lengths.predict(1, kPromptLen, 0), 1) << "class 1 kept its own table";
}

TEST(OutputLengths, BadInputIsRejected) {
  OutputLengths lengths;
  EXPECT_THROW(lengths.record(kApp, kPromptLen, {3, -1}), InvalidArgumentError);
  EXPECT_EQ(lengths.num_programs(), 0) << "a rejected program teaches nothing";
  EXPECT_THROW(lengths.predict(kApp, kPromptLen, -1), InvalidArgumentError);
  EXPECT_THROW(lengths.record(kApp, 0, {3}), InvalidArgumentError);
  EXPECT_THROW(lengths.predict(kApp, 0, 0), InvalidArgumentError);
  lengths.record(kApp, kPromptLen, {});  // a program with no turns teaches nothing
  EXPECT_EQ(lengths.num_programs(), 0);
}

// ---- the scheduler's learned ranking ----------------------------------------------------

constexpr int32_t kPrompt = 8 * sim_test::kBlockSize + 5;  // a class key from its 8 full blocks

SchedulerConfig learning_config(bool learn) {
  SchedulerConfig config = make_config(Policy::kInfercept);
  config.rank_s_per_predicted_token = 0.01;
  config.learn_output_lengths = learn;
  return config;
}

// One program of the app whose prompt starts at `first`: `first_turn` tokens, a tool call
// returning 3 tokens, `second_turn` more tokens, done. The tail after the class blocks differs
// per program (`own`), as a question after a shared system prompt does.
RequestId add_app_request(Sim& sim, TokenId first, TokenId own) {
  std::vector<TokenId> prompt = iota_tokens(8 * sim_test::kBlockSize, first);
  for (TokenId t : iota_tokens(5, own)) prompt.push_back(t);
  return sim.s.add_request(prompt, sim.now_s);
}

RequestId run_program(Sim& sim, TokenId first, TokenId own, int32_t first_turn, int32_t second_turn) {
  RequestId id = add_app_request(sim, first, own);
  sim.run_until_sampled(id, first_turn);
  sim.s.intercept(id, sim.now_s);
  sim.s.resume(id, iota_tokens(3, 9000), sim.now_s);
  sim.run_until_sampled(id, first_turn + second_turn);
  sim.s.finish(id);
  return id;
}

// Three finished programs of the app whose prompts start at token 1: 6 tokens, a tool, 2 more.
void teach_app(Sim& sim) {
  for (int i = 0; i < 3; ++i) run_program(sim, 1, 5000 + 10 * i, 6, 2);
}

TEST(LearnedRanking, KeysEachTurnByWhatFinishedProgramsOfItsClassDidFromThatTurn) {
  Sim sim{learning_config(true)};
  teach_app(sim);
  EXPECT_EQ(sim.s.output_lengths().num_programs(), 3);
  const double arrival_s = sim.now_s;
  RequestId id = add_app_request(sim, 1, 7000);
  EXPECT_EQ(sim.request(id).predicted_output_tokens, 8) << "6 + 2 tokens from turn 0";
  EXPECT_DOUBLE_EQ(sim.request(id).priority_s, arrival_s + 0.01 * 8);
  sim.s.check_invariants();
  sim.run_until_sampled(id, 6);
  sim.s.intercept(id, sim.now_s);
  sim.s.resume(id, iota_tokens(3, 9000), sim.now_s);
  EXPECT_EQ(sim.request(id).predicted_output_tokens, 2) << "2 tokens from turn 1";
  EXPECT_DOUBLE_EQ(sim.request(id).priority_s, arrival_s + 0.01 * 2);
  sim.s.check_invariants();
}

TEST(LearnedRanking, AnotherAppFallsBackToAllProgramsUntilItHasItsOwn) {
  Sim sim{learning_config(true)};
  teach_app(sim);
  RequestId id = add_app_request(sim, 20000, 7000);
  EXPECT_EQ(sim.request(id).predicted_output_tokens, 8) << "no program of its own yet";
  sim.s.abort(id);
  for (int i = 0; i < 3; ++i) run_program(sim, 20000, 6000 + 10 * i, 1, 1);
  id = add_app_request(sim, 20000, 7000);
  EXPECT_EQ(sim.request(id).predicted_output_tokens, 2) << "its own three programs: 1 + 1";
  sim.s.check_invariants();
}

TEST(LearnedRanking, TheCallersPredictionForATurnWins) {
  Sim sim{learning_config(true)};
  teach_app(sim);
  RequestId id = add_app_request(sim, 1, 7000);
  sim.s.set_predicted_output_tokens(id, 100);
  sim.run_until_sampled(id, 6);
  sim.s.intercept(id, sim.now_s);
  sim.s.set_predicted_output_tokens(id, 50);  // before the resume, as the server does
  sim.s.resume(id, iota_tokens(3, 9000), sim.now_s);
  EXPECT_EQ(sim.request(id).predicted_output_tokens, 50);
  sim.run_until_sampled(id, 7);
  sim.s.intercept(id, sim.now_s);
  sim.s.resume(id, iota_tokens(3, 9100), sim.now_s);
  // No caller prediction for turn 2 and no program reached turn 2: nothing is known.
  EXPECT_EQ(sim.request(id).predicted_output_tokens, -1);
  sim.s.check_invariants();
}

TEST(LearnedRanking, OffLearnsAndKeysNothing) {
  Sim sim{learning_config(false)};
  teach_app(sim);
  EXPECT_EQ(sim.s.output_lengths().num_programs(), 0);
  RequestId id = sim.s.add_request(iota_tokens(kPrompt, 1), sim.now_s);
  EXPECT_EQ(sim.request(id).predicted_output_tokens, -1);
  EXPECT_DOUBLE_EQ(sim.request(id).priority_s, sim.request(id).arrival_s);
}

TEST(LearnedRanking, CountsOnlyRequestsLearnAsOneClass) {
  Sim sim{learning_config(true)};
  for (int i = 0; i < 3; ++i) {
    RequestId id = sim.s.add_request(16, sim.now_s);
    sim.run_until_sampled(id, 4);
    sim.s.finish(id);
  }
  RequestId id = sim.s.add_request(16, sim.now_s);
  EXPECT_EQ(sim.request(id).program_class, 0u);
  EXPECT_EQ(sim.request(id).predicted_output_tokens, 4);
}

TEST(LearnedRanking, AbortedProgramsTeachNothing) {
  Sim sim{learning_config(true)};
  RequestId id = sim.s.add_request(iota_tokens(kPrompt, 1), sim.now_s);
  sim.run_until_sampled(id, 3);
  sim.s.abort(id);
  EXPECT_EQ(sim.s.output_lengths().num_programs(), 0);
}

}  // namespace
}  // namespace infercept
