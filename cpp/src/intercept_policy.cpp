// What each policy does with paused contexts every iteration (DESIGN.md §2, equation 5).
#include <algorithm>
#include <cmath>

#include "infercept/scheduler.h"
#include "infercept/waste_model.h"

namespace infercept {

double Scheduler::remaining_intercept_s(const Request& r, double now_s) const {
  double elapsed_s = std::max(0.0, now_s - r.intercept_start_s);
  if (r.expected_duration_s >= 0 && r.expected_duration_s > elapsed_s) return r.expected_duration_s - elapsed_s;
  // No hint, or the hint has run out: the paper's estimate, a tool that has already taken
  // this long is expected to take about as long again.
  return elapsed_s;
}

void Scheduler::decide_intercepted(StepPlan& plan) {
  if (config_.policy == Policy::kSwap) {
    // The baseline moves each paused context out whole, ignoring the budget.
    for (Request* r : intercepted_) {
      if (r->state != RequestState::kSwappingOut || r->kv->device_blocks.empty()) continue;
      std::vector<BlockCopy> copies = kv_.swap_out(r->id, static_cast<int32_t>(r->kv->device_blocks.size()));
      if (copies.empty()) continue;  // host pool full: the context stays on the device for now
      moved_.emplace_back(r->id, static_cast<int32_t>(copies.size()));
      plan.swap_out.insert(plan.swap_out.end(), copies.begin(), copies.end());
      r->last_action_step = step_id_;
    }
    return;
  }
  if (config_.policy != Policy::kInfercept) return;  // vllm and discard freed at the intercept; preserve keeps

  struct Candidate {
    double min_waste;
    double preserve;
    double discard;
    Request* request;
    bool operator<(const Candidate& other) const { return min_waste < other.min_waste; }
  };
  int64_t swap_budget = swap_budget_blocks(plan);
  int64_t other_tokens = num_running_tokens();
  // Recompute chunks ride along with the decodes: what the budget leaves after one token each.
  int64_t chunk_tokens = std::max<int64_t>(1, config_.max_batched_tokens - static_cast<int64_t>(running_.size()));
  const int32_t block_size = config_.block_size;

  std::vector<Candidate> swappable;
  for (Request* r : intercepted_) {
    if (r->kv->device_blocks.empty() || r->last_action_step == step_id_) continue;
    int64_t device_tokens = r->kv->num_device_tokens(block_size);
    int64_t context_tokens = r->kv->num_tokens;
    double remaining_s = remaining_intercept_s(*r, plan.now_s);
    Candidate c;
    c.request = r;
    c.preserve = preserve_waste(cost_, device_tokens, remaining_s);
    int64_t num_chunks = (context_tokens + chunk_tokens - 1) / chunk_tokens;
    c.discard = chunked_discard_waste(cost_, context_tokens, other_tokens, num_chunks);
    c.min_waste = std::min(c.preserve, c.discard);
    // A swap pays off only if the context stays out longer than the round trip takes;
    // otherwise the tool returns before the copy could free anything.
    bool worth_swapping = remaining_s > 2 * cost_.swap_time_s(static_cast<double>(device_tokens)) &&
                          kv_.pool(Tier::kHost).num_free() > 0;
    if (worth_swapping) {
      swappable.push_back(c);
    } else if (c.discard < c.preserve) {
      r->transition(RequestState::kDiscarded);
      discard(*r, &plan);
    }
  }

  // The most wasteful go out first, as far as the budget reaches; the rest take the cheaper of
  // discard and preserve.
  std::make_heap(swappable.begin(), swappable.end());
  while (!swappable.empty()) {
    std::pop_heap(swappable.begin(), swappable.end());
    Candidate c = swappable.back();
    swappable.pop_back();
    Request* r = c.request;
    if (swap_budget > 0) {
      std::vector<BlockCopy> copies = kv_.swap_out(r->id, static_cast<int32_t>(swap_budget));
      if (!copies.empty()) {
        if (r->state == RequestState::kPreserved) r->transition(RequestState::kSwappingOut);
        swap_budget -= static_cast<int64_t>(copies.size());
        moved_.emplace_back(r->id, static_cast<int32_t>(copies.size()));
        plan.swap_out.insert(plan.swap_out.end(), copies.begin(), copies.end());
        r->last_action_step = step_id_;
        continue;
      }
    }
    if (c.discard < c.preserve) {
      r->transition(RequestState::kDiscarded);
      discard(*r, &plan);
    }
  }
}

}  // namespace infercept
