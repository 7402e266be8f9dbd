// The scheduler driven step by step with a synthetic clock, for the scheduler's tests:
// schedule(now) -> "execute" for the cost model's step time -> update(plan, result, now).
// Invariants are checked after every call.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <string>
#include <functional>
#include <numeric>
#include <vector>

#include "infercept/scheduler.h"

namespace infercept::sim_test {

constexpr int32_t kBlockSize = 16;
constexpr int32_t kMaxSteps = 5000;  // a scenario that needs more has livelocked
// A context long enough that min-waste swaps it out over several steps: 125 blocks of 16.
constexpr int32_t kLongPrompt = 2000;

// The paper's GPT-J-6B on one A100: T_fwd = 10 ms + 0.0463 ms/token, 18.35 us/token over PCIe.
inline CostModel gptj() { return CostModel::builtin("gptj-6b-a100"); }

inline SchedulerConfig make_config(Policy policy, int32_t num_device_blocks = 1024, int32_t num_host_blocks = 1024,
                                   int32_t max_batched_tokens = 512) {
  SchedulerConfig config;
  config.policy = policy;
  config.block_size = kBlockSize;
  config.num_device_blocks = num_device_blocks;
  config.num_host_blocks = num_host_blocks;
  config.max_batched_tokens = max_batched_tokens;
  // The paper's rule (every paused byte is waste) makes min-waste act in these small, idle
  // scenarios; tests of the demand-aware rule (the default) turn it back on.
  config.demand_aware_preserve = false;
  return config;
}

// A scheduler plus a clock. Each step lasts what the cost model says the plan takes; requests
// that reach their generated-token limit are finished, as an engine would.
class Sim {
 public:
  explicit Sim(const SchedulerConfig& config, const CostModel& cost = gptj()) : s(config, cost) {}

  struct Step {
    StepPlan plan;
    StepOutput out;
  };

  Step step() {
    Step st;
    st.plan = s.schedule(now_s);
    s.check_invariants();
    now_s += s.cost().step_time_s(st.plan.num_batched_tokens, static_cast<double>(st.plan.num_context_tokens));
    StepResult result{now_s - st.plan.now_s};
    // Requests with token identity need the sampled ids: a deterministic stand-in per request.
    for (const ScheduledRequest& sr : st.plan.scheduled) {
      if (sr.samples) result.sampled_token_ids.push_back(sampled_token(sr.request_id));
    }
    st.out = s.update(st.plan, result, now_s);
    s.check_invariants();
    for (RequestId id : st.out.reached_limit) s.finish(id);
    s.check_invariants();
    ++num_steps;
    return st;
  }

  // Steps until `done()`; fails the test if that takes more than kMaxSteps.
  void run_until(const std::function<bool()>& done) {
    for (int i = 0; i < kMaxSteps && !done(); ++i) step();
    ASSERT_TRUE(done()) << "not done after " << kMaxSteps << " steps";
  }

  void run_until_sampled(RequestId id, int32_t num_generated_tokens = 1) {
    run_until([&] { return s.request(id).num_generated_tokens >= num_generated_tokens; });
  }

  // The token a request "samples" next: distinct per request and position.
  TokenId sampled_token(RequestId id) const {
    return static_cast<TokenId>(1000 + (id * 7919 + s.request(id).num_generated_tokens * 31) % 50000);
  }

  const Request& request(RequestId id) const { return s.request(id); }
  int32_t num_free(Tier tier) const { return s.kv().pool(tier).num_free(); }

  Scheduler s;
  double now_s = 0;
  int num_steps = 0;
};

// A policy's name as a GoogleTest parameter name ("vllm-0.2" -> "vllm_0_2").
inline std::string test_name(Policy policy) {
  std::string name = to_string(policy);
  for (char& c : name) c = std::isalnum(static_cast<unsigned char>(c)) ? c : '_';
  return name;
}

// `n` consecutive token ids from `first`: a context whose blocks are all distinct.
inline std::vector<TokenId> iota_tokens(int32_t n, TokenId first = 1) {
  std::vector<TokenId> tokens(n);
  std::iota(tokens.begin(), tokens.end(), first);
  return tokens;
}

inline bool contains(const std::vector<RequestId>& ids, RequestId id) {
  return std::find(ids.begin(), ids.end(), id) != ids.end();
}

}  // namespace infercept::sim_test
