// What goes wrong around the scheduler: aborts from every state, and bad input. Each must
// return every block and leave the scheduler consistent.
#include <gtest/gtest.h>

#include <string>

#include "infercept/errors.h"
#include "infercept/scheduler.h"
#include "scheduler_sim.h"

namespace infercept {
namespace {

using namespace sim_test;

class Abort : public ::testing::Test {
 protected:
  // Aborts `id` (with `in_flight` scheduled but not yet applied, if given), then checks that
  // every block comes back once the step's copies are done.
  void expect_abort_frees_everything(Sim& sim, RequestId id, const StepPlan* in_flight = nullptr) {
    sim.s.abort(id);
    sim.s.check_invariants();
    EXPECT_EQ(sim.request(id).state, RequestState::kAborted);
    if (in_flight) {
      sim.now_s += 0.01;
      sim.s.update(*in_flight, StepResult{0.01}, sim.now_s);
      sim.s.check_invariants();
    }
    EXPECT_EQ(sim.num_free(Tier::kDevice), sim.s.config().num_device_blocks);
    EXPECT_EQ(sim.num_free(Tier::kHost), sim.s.config().num_host_blocks);
    EXPECT_EQ(sim.s.stats().num_aborted, 1);
    EXPECT_EQ(sim.s.num_live_requests(), 0);
    EXPECT_THROW(sim.s.abort(id), StateError) << "aborting twice";
    sim.step();  // the scheduler carries on with nothing to do
    sim.s.remove(id);
    EXPECT_THROW(sim.s.request(id), UnknownRequestError);
  }
  // A request of `prompt` tokens that has just sampled its first token.
  RequestId sampled(Sim& sim, int32_t prompt = 100) {
    RequestId id = sim.s.add_request(prompt, 0);
    sim.run_until_sampled(id);
    return id;
  }
  // A long context that min-waste moved to the host for a 30 s tool, resumed: it swaps in next.
  RequestId swapped_and_resumed(Sim& sim) {
    RequestId id = sampled(sim, kLongPrompt);
    sim.s.intercept(id, sim.now_s, 30);
    sim.run_until([&] { return sim.request(id).state == RequestState::kSwapped; });
    sim.s.resume(id, 4, sim.now_s);
    return id;
  }
};

TEST_F(Abort, Waiting) {
  Sim sim{make_config(Policy::kInfercept)};
  RequestId id = sim.s.add_request(100, 0);
  expect_abort_frees_everything(sim, id);
}

TEST_F(Abort, RunningMidPrefill) {
  Sim sim{make_config(Policy::kInfercept, 1024, 1024, /*max_batched_tokens=*/64)};
  RequestId id = sim.s.add_request(200, 0);
  sim.step();
  ASSERT_EQ(sim.request(id).state, RequestState::kRunning);
  ASSERT_EQ(sim.request(id).kv->num_tokens, 64);
  expect_abort_frees_everything(sim, id);
}

TEST_F(Abort, RunningWithItsStepInFlight) {
  Sim sim{make_config(Policy::kInfercept)};
  RequestId id = sampled(sim);
  StepPlan plan = sim.s.schedule(sim.now_s);
  expect_abort_frees_everything(sim, id, &plan);
}

TEST_F(Abort, Recomputing) {
  Sim sim{make_config(Policy::kDiscard, 1024, 1024, /*max_batched_tokens=*/64)};
  RequestId id = sampled(sim, 200);
  sim.s.intercept(id, sim.now_s, 1);
  sim.s.resume(id, 4, sim.now_s);
  sim.step();
  ASSERT_EQ(sim.request(id).state, RequestState::kRecomputing);
  expect_abort_frees_everything(sim, id);
}

TEST_F(Abort, PreservedWithToolPending) {
  Sim sim{make_config(Policy::kPreserve)};
  RequestId id = sampled(sim);
  sim.s.intercept(id, sim.now_s, 10);
  sim.step();
  ASSERT_EQ(sim.request(id).state, RequestState::kPreserved);
  expect_abort_frees_everything(sim, id);
}

TEST_F(Abort, PreservedAndQueuedAfterResume) {
  Sim sim{make_config(Policy::kPreserve)};
  RequestId id = sampled(sim);
  sim.s.intercept(id, sim.now_s, 10);
  sim.s.resume(id, 4, sim.now_s);
  expect_abort_frees_everything(sim, id);
}

TEST_F(Abort, DiscardedWithToolPending) {
  Sim sim{make_config(Policy::kDiscard)};
  RequestId id = sampled(sim);
  sim.s.intercept(id, sim.now_s, 10);
  expect_abort_frees_everything(sim, id);
}

TEST_F(Abort, WaitingAfterAVllmResume) {
  Sim sim{make_config(Policy::kVllm02)};
  RequestId id = sampled(sim);
  sim.s.intercept(id, sim.now_s, 10);
  sim.s.resume(id, 4, sim.now_s);
  ASSERT_EQ(sim.request(id).state, RequestState::kWaiting);
  expect_abort_frees_everything(sim, id);
}

TEST_F(Abort, SwappingOutWithCopiesInFlight) {
  Sim sim{make_config(Policy::kInfercept)};
  RequestId id = sampled(sim, kLongPrompt);
  sim.s.intercept(id, sim.now_s, 30);
  StepPlan plan = sim.s.schedule(sim.now_s);
  ASSERT_FALSE(plan.swap_out.empty());
  ASSERT_EQ(sim.request(id).state, RequestState::kSwappingOut);
  expect_abort_frees_everything(sim, id, &plan);
}

TEST_F(Abort, SwappingOutBetweenSteps) {
  Sim sim{make_config(Policy::kInfercept)};
  RequestId id = sampled(sim, kLongPrompt);
  sim.s.intercept(id, sim.now_s, 30);
  sim.step();
  ASSERT_EQ(sim.request(id).state, RequestState::kSwappingOut);
  ASSERT_FALSE(sim.request(id).kv->device_blocks.empty());
  ASSERT_FALSE(sim.request(id).kv->host_blocks.empty());
  expect_abort_frees_everything(sim, id);
}

TEST_F(Abort, SwappedWithToolPending) {
  Sim sim{make_config(Policy::kSwap)};
  RequestId id = sampled(sim);
  sim.s.intercept(id, sim.now_s, 10);
  sim.step();
  ASSERT_EQ(sim.request(id).state, RequestState::kSwapped);
  expect_abort_frees_everything(sim, id);
}

TEST_F(Abort, SwappedAndQueuedAfterResume) {
  Sim sim{make_config(Policy::kSwap)};
  RequestId id = sampled(sim);
  sim.s.intercept(id, sim.now_s, 10);
  sim.step();
  sim.s.resume(id, 4, sim.now_s);
  ASSERT_EQ(sim.request(id).state, RequestState::kSwapped);
  expect_abort_frees_everything(sim, id);
}

TEST_F(Abort, SwappingInWithCopiesInFlight) {
  Sim sim{make_config(Policy::kInfercept)};
  RequestId id = swapped_and_resumed(sim);
  StepPlan plan = sim.s.schedule(sim.now_s);
  ASSERT_FALSE(plan.swap_in.empty());
  ASSERT_EQ(sim.request(id).state, RequestState::kSwappingIn);
  expect_abort_frees_everything(sim, id, &plan);
}

TEST_F(Abort, SwappingInBetweenSteps) {
  Sim sim{make_config(Policy::kInfercept)};
  RequestId id = swapped_and_resumed(sim);
  sim.step();
  ASSERT_EQ(sim.request(id).state, RequestState::kSwappingIn);
  expect_abort_frees_everything(sim, id);
}

TEST_F(Abort, RemovedBeforeItsCopiesFinishStillReturnsEveryBlock) {
  // The caller drops the record while the step that swaps it is still running.
  Sim sim{make_config(Policy::kInfercept)};
  RequestId id = sampled(sim, kLongPrompt);
  sim.s.intercept(id, sim.now_s, 30);
  StepPlan plan = sim.s.schedule(sim.now_s);
  ASSERT_FALSE(plan.swap_out.empty());
  sim.s.abort(id);
  sim.s.remove(id);
  sim.s.check_invariants();
  sim.now_s += 0.01;
  sim.s.update(plan, StepResult{0.01}, sim.now_s);
  sim.s.check_invariants();
  EXPECT_EQ(sim.num_free(Tier::kDevice), sim.s.config().num_device_blocks);
  EXPECT_EQ(sim.num_free(Tier::kHost), sim.s.config().num_host_blocks);
}

TEST(BadInput, UnknownRequestIdsRaiseUnknownRequestError) {
  Sim sim{make_config(Policy::kInfercept)};
  constexpr RequestId kUnknown = 12345;
  EXPECT_THROW(sim.s.request(kUnknown), UnknownRequestError);
  EXPECT_THROW(sim.s.intercept(kUnknown, 0), UnknownRequestError);
  EXPECT_THROW(sim.s.resume(kUnknown, 1, 0), UnknownRequestError);
  EXPECT_THROW(sim.s.abort(kUnknown), UnknownRequestError);
  EXPECT_THROW(sim.s.finish(kUnknown), UnknownRequestError);
  EXPECT_THROW(sim.s.remove(kUnknown), UnknownRequestError);
  EXPECT_THROW(sim.s.set_expected_duration(kUnknown, 1), UnknownRequestError);
  EXPECT_THROW(sim.s.set_generated_token_limit(kUnknown, 1), UnknownRequestError);
  EXPECT_FALSE(sim.s.contains(kUnknown));
}

TEST(BadInput, OperationsIllegalInTheCurrentStateRaiseStateError) {
  Sim sim{make_config(Policy::kPreserve)};
  RequestId id = sim.s.add_request(32, 0);
  EXPECT_THROW(sim.s.intercept(id, 0), StateError) << "waiting: has not sampled";
  EXPECT_THROW(sim.s.resume(id, 1, 0), StateError) << "no tool pending";
  EXPECT_THROW(sim.s.finish(id), StateError) << "waiting requests cannot finish";
  EXPECT_THROW(sim.s.remove(id), StateError) << "still live";
  sim.run_until_sampled(id);
  sim.s.finish(id);
  EXPECT_THROW(sim.s.resume(id, 1, 0), StateError) << "a resume for a finished request";
  EXPECT_THROW(sim.s.abort(id), StateError);
  sim.s.check_invariants();
}

TEST(BadInput, OversizedRequestsAreRejectedNamingTheLimit) {
  Sim sim{make_config(Policy::kInfercept, /*num_device_blocks=*/4)};
  // 64 prompt tokens + 1 to generate need 5 blocks of 16; the pool holds 4.
  try {
    sim.s.add_request(64, 0);
    FAIL() << "a prompt larger than the KV cache must be rejected";
  } catch (const InvalidArgumentError& e) {
    EXPECT_NE(std::string(e.what()).find("64"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("only 4"), std::string::npos) << e.what();
  }
  EXPECT_THROW(sim.s.add_request(0, 0), InvalidArgumentError);
  EXPECT_THROW(sim.s.add_request(10, 0, -1), InvalidArgumentError);
  EXPECT_EQ(sim.s.num_live_requests(), 0);
}

TEST(BadInput, ResumeThatOutgrowsThePoolAbortsTheRequestAndFreesItsBlocks) {
  Sim sim{make_config(Policy::kPreserve, /*num_device_blocks=*/4)};
  RequestId id = sim.s.add_request(32, 0);
  sim.run_until_sampled(id);
  sim.s.intercept(id, sim.now_s, 1);
  EXPECT_THROW(sim.s.resume(id, 64, sim.now_s), InvalidArgumentError);
  EXPECT_EQ(sim.request(id).state, RequestState::kAborted);
  EXPECT_EQ(sim.num_free(Tier::kDevice), 4);
  sim.s.check_invariants();
}

TEST(BadInput, UpdateRejectsAStalePlanAndAnImpossibleResult) {
  Sim sim{make_config(Policy::kInfercept)};
  sim.s.add_request(32, 0);
  StepPlan old_plan = sim.s.schedule(0);
  sim.s.update(old_plan, StepResult{0.01}, 0.01);
  StepPlan plan = sim.s.schedule(0.01);
  EXPECT_THROW(sim.s.update(old_plan, StepResult{0.01}, 0.02), StateError);
  EXPECT_THROW(sim.s.update(plan, StepResult{-1}, 0.02), InvalidArgumentError);
  EXPECT_THROW(sim.s.update(plan, StepResult{0.01, /*swap_stall_s=*/0.02}, 0.02), InvalidArgumentError);
  EXPECT_NO_THROW(sim.s.update(plan, StepResult{0.01}, 0.02));
}

TEST(BadInput, InvalidConfigNamesTheField) {
  SchedulerConfig config = make_config(Policy::kInfercept);
  config.max_batched_tokens = 0;
  try {
    Scheduler s(config, gptj());
    FAIL();
  } catch (const InvalidArgumentError& e) {
    EXPECT_NE(std::string(e.what()).find("max_batched_tokens"), std::string::npos) << e.what();
  }
  config = make_config(Policy::kInfercept, /*num_device_blocks=*/0);
  EXPECT_THROW(Scheduler(config, gptj()), InvalidArgumentError);
}

}  // namespace
}  // namespace infercept
