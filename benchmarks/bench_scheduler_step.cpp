// One scheduler step (schedule + update) with 256 running, 2,000 intercepted and 1,000
// waiting requests under the min-waste policy. Prints microseconds per step.
//
// The running requests decode forever (no limit) and the queue never drains (the batch is
// full), so the mix stays the same over the measured steps. Two mixes of paused contexts:
// - settled: long tools (hint 1e6 s); min-waste swaps what the budget allows and discards the
//   rest, so later steps see mostly device-free paused requests;
// - all preserved: short tools and a clock that barely moves, so every step re-evaluates the
//   waste equations for all 2,000 device-resident paused contexts (the most work per step).
// Each mix runs twice: counts only (no prefix cache, the simulator's path) and with token ids,
// every context opening with one 256-token system prompt, so the prefix cache shares those
// blocks among all requests and every step appends sampled ids and registers filled blocks.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <vector>

#include "infercept/scheduler.h"

using namespace infercept;

namespace {

constexpr int kNumRunning = 256;
constexpr int kNumIntercepted = 2000;
constexpr int kNumWaiting = 1000;
constexpr int kContextTokens = 512;
constexpr int kWarmupSteps = 50;
constexpr int kMeasuredSteps = 2000;

constexpr int kSystemTokens = 256;

// A C++ engine loop hands each applied plan back (schedule_into), so the step's arrays are
// allocated once; INFERCEPT_BENCH_FRESH_PLANS=1 takes a new plan every step instead, as the
// Python binding does (its plans own numpy views of their arrays).
const bool kFreshPlans = std::getenv("INFERCEPT_BENCH_FRESH_PLANS") != nullptr;

void step(Scheduler& scheduler, double& now_s, double step_s) {
  static StepPlan reused_plan;
  static StepResult reused_result;
  StepPlan fresh_plan;
  StepResult fresh_result;
  StepPlan& plan = kFreshPlans ? fresh_plan : reused_plan;
  StepResult& result = kFreshPlans ? fresh_result : reused_result;
  scheduler.schedule_into(now_s, plan);
  now_s += step_s;
  result.duration_s = step_s;
  result.sampled_token_ids.assign(plan.num_sampling_requests, 7);
  scheduler.update(plan, result, now_s);
}

// The measured steps, out of line so a profiler can count them alone
// (valgrind --tool=callgrind --toggle-collect='*measured_steps*').
// Returns the wall time in microseconds and sets `cpu_us` to this thread's CPU time: on a
// shared machine the wall time also counts the slices other processes took.
[[gnu::noinline]] double measured_steps(Scheduler& scheduler, double& now_s, double step_s, int num_steps,
                                        double& cpu_us) {
  auto thread_cpu_us = [] {
    timespec t{};
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return static_cast<double>(t.tv_sec) * 1e6 + static_cast<double>(t.tv_nsec) * 1e-3;
  };
  double cpu_start_us = thread_cpu_us();
  auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < num_steps; ++i) step(scheduler, now_s, step_s);
  double wall_us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count();
  cpu_us = thread_cpu_us() - cpu_start_us;
  return wall_us;
}

// A context: the shared system prompt, then tokens of its own.
std::vector<int32_t> context_tokens(int serial) {
  std::vector<int32_t> tokens(kContextTokens);
  for (int i = 0; i < kContextTokens; ++i) tokens[i] = i < kSystemTokens ? i : 1000 + (serial * 7 + i) % 30000;
  return tokens;
}

void run(const char* mix, double expected_duration_s, double step_s, bool with_tokens) {
  SchedulerConfig config;
  config.policy = Policy::kInfercept;
  config.block_size = 16;
  // Room for every context on the device; the host takes what min-waste swaps out.
  config.num_device_blocks = (kNumRunning + kNumIntercepted + 64) * (kContextTokens / 16 + 8);
  config.num_host_blocks = config.num_device_blocks;
  config.max_batched_tokens = 4096;
  config.max_running_requests = kNumRunning;
  // The forward's flat inputs are part of a real engine's step; INFERCEPT_BENCH_NO_BATCH=1
  // leaves them out (the simulator's setting) to show their share.
  config.build_batch = std::getenv("INFERCEPT_BENCH_NO_BATCH") == nullptr;
  Scheduler scheduler(config, CostModel::builtin("gptj-6b-a100"));
  int serial = 0;
  auto add = [&](double now_s) {
    return with_tokens ? scheduler.add_request(context_tokens(serial++), now_s)
                       : scheduler.add_request(kContextTokens, now_s);
  };

  double now_s = 0;
  // Bring 2,256 requests into the batch in waves of 256, intercept 2,000 of them.
  std::vector<RequestId> intercepted;
  for (int wave = 0; intercepted.size() < kNumIntercepted; ++wave) {
    std::vector<RequestId> ids;
    for (int i = 0; i < kNumRunning; ++i) ids.push_back(add(now_s));
    while (scheduler.request(ids.back()).num_generated_tokens == 0) step(scheduler, now_s, step_s);
    for (RequestId id : ids) {
      if (intercepted.size() == kNumIntercepted) { break; }
      scheduler.intercept(id, now_s, expected_duration_s);
      intercepted.push_back(id);
    }
  }
  for (int i = 0; i < kNumWaiting; ++i) add(now_s);
  for (int i = 0; i < kWarmupSteps; ++i) step(scheduler, now_s, step_s);

  double cpu_us = 0;
  double elapsed_us = measured_steps(scheduler, now_s, step_s, kMeasuredSteps, cpu_us);

  SchedulerStats stats = scheduler.stats();
  std::printf("scheduler step (schedule + update), policy infercept, mix: %s, %s\n", mix,
              with_tokens ? "token ids + prefix cache (256-token shared prefix)" : "counts only");
  std::printf("  running %d, swapping in %d, intercepted %d (preserved %d, swapped %d, discarded %d), waiting %d\n",
              stats.num_running, stats.num_swapping_in, stats.num_intercepted, stats.num_preserved,
              stats.num_swapped, stats.num_discarded, stats.num_waiting);
  std::printf("  preemptions %lld, recomputed tokens %lld, prefix cache hits %lld of %lld tokens\n",
              (long long)stats.num_preemptions, (long long)stats.num_recomputed_tokens,
              (long long)stats.prefix_cache_hits, (long long)stats.prefix_cache_queries);
  std::printf("  %.1f us per step over %d steps (goal: < 50 us); CPU time %.1f us per step (%s plans)\n",
              elapsed_us / kMeasuredSteps, kMeasuredSteps, cpu_us / kMeasuredSteps,
              kFreshPlans ? "fresh" : "reused");
  scheduler.check_invariants();
}

}  // namespace

// Optional argument: run only mix N (0-3, in the order printed).
int main(int argc, char** argv) {
  int only = argc > 1 ? std::atoi(argv[1]) : -1;
  int index = 0;
  for (bool with_tokens : {false, true}) {
    if (only < 0 || only == index++) run("settled (long tools)", /*expected_duration_s=*/1e6, /*step_s=*/0.02, with_tokens);
    if (only < 0 || only == index++) {
      run("all preserved (short tools)", /*expected_duration_s=*/1e-4, /*step_s=*/1e-7, with_tokens);
    }
  }
  return 0;
}
