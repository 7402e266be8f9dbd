// What each policy does with paused contexts every iteration: min-waste (DESIGN.md §2,
// equation 5), the swap baseline's whole-context moves, and continuum's pins and their TTLs.
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

int64_t Scheduler::expected_recompute_tokens(const Request& r, int32_t num_exclusive, double remaining_s) const {
  int64_t context_tokens = r.kv->num_tokens;
  if (!r.cacheable) return context_tokens;  // no cache: a discard loses everything
  // Discarding only drops references: the full blocks stay cached until allocations evict
  // them, so what comes back as recompute is what the demand over the intercept takes beyond
  // the free capacity, plus the private partial last block, which is never cached.
  const int32_t block_size = config_.block_size;
  int64_t exclusive_blocks = num_exclusive;
  double demand_blocks = allocation_rate_blocks_per_s_ * remaining_s;
  double spare_blocks = kv_.pool(Tier::kDevice).num_free();
  int64_t evicted_blocks =
      std::min<int64_t>(exclusive_blocks, static_cast<int64_t>(std::ceil(std::max(0.0, demand_blocks - spare_blocks))));
  int64_t partial_tokens = context_tokens % block_size;
  return std::min(context_tokens, evicted_blocks * block_size + partial_tokens);
}

double Scheduler::recompute_time_s(int64_t num_tokens) const {
  const int64_t chunk = config_.max_batched_tokens;
  int64_t num_full = num_tokens / chunk;
  int64_t rest = num_tokens % chunk;
  // Each chunk also attends over the context rebuilt so far (the profile's attention term):
  // chunk k of the full ones reads k*chunk tokens, the last one all of them.
  double full = static_cast<double>(num_full);
  double attended_tokens = static_cast<double>(chunk) * full * (full + 1) / 2 + (rest > 0 ? num_tokens : 0);
  return full * cost_.forward_time_s(static_cast<double>(chunk)) +
         (rest > 0 ? cost_.forward_time_s(static_cast<double>(rest)) : 0.0) +
         cost_.attention_s_per_context_token * attended_tokens;
}

double Scheduler::pin_ttl_s(const Request& r) const {
  // Continuum's rule (docs/baselines.md): the pin saves the next turn its reload (recomputing
  // the context, the cost model's T_fwd over budget-sized chunks) and the queueing a turn that
  // lost its KV has been seeing; each second pinned costs the share of device KV memory it
  // holds, for itself and every request queued behind it.
  int32_t num_exclusive = kv_.num_exclusive_blocks(*r.kv, Tier::kDevice);
  double held_tokens = static_cast<double>(num_exclusive_device_tokens(r, num_exclusive));
  double capacity_tokens = static_cast<double>(config_.num_device_blocks) * config_.block_size;
  double benefit_s = recompute_time_s(r.kv->num_tokens) + resume_wait_s_;
  double cost_s_per_s = held_tokens / capacity_tokens * (1.0 + static_cast<double>(queue_.size()));
  // Cold start: the caller's hint, else what tools have taken on the whole.
  double prior_mean_s = r.expected_duration_s >= 0 ? r.expected_duration_s : tool_durations_.mean_s();
  return continuum_ttl_s(tool_durations_.samples(r.tool_id), prior_mean_s, benefit_s, cost_s_per_s);
}

void Scheduler::expire_pins(StepPlan& plan) {
  if (traits_->on_intercept != InterceptAction::kPinWithTtl) return;
  // A pin whose TTL has passed ends as vLLM's requests do: its blocks go to the prefix cache.
  for (Request* r : intercepted_) {
    if (r->state != RequestState::kPreserved || r->pin_until_s < 0 || r->pin_until_s > plan.now_s) continue;
    move_paused(*r, RequestState::kDiscarded);
    discard(*r, &plan);
  }
}

void Scheduler::evict_by_waste(Request& victim, StepPlan& plan, int32_t num_blocks_short) {
  const int32_t block_size = config_.block_size;
  int32_t num_exclusive = kv_.num_exclusive_blocks(*victim.kv, Tier::kDevice);
  int32_t num_swappable = std::min(num_exclusive, kv_.pool(Tier::kHost).num_free());
  int32_t num_wanted = std::clamp(num_blocks_short, 1, std::max(1, num_exclusive));
  int64_t num_planned = static_cast<int64_t>(plan.swap_out.size());
  int64_t budget_left = std::max<int64_t>(0, swap_budget_blocks(plan) - num_planned);
  auto discard_victim = [&] {
    move_paused(victim, RequestState::kDiscarded);
    discard(victim, &plan);
  };
  if (num_swappable < num_wanted) return discard_victim();  // the host cannot take what is short
  if (num_wanted <= budget_left) {
    // The forward hides it: the tail goes out, as far as the budget reaches (what is freed
    // beyond the shortage spares the next steps the same pressure).
    return swap_out_tail(victim, static_cast<int32_t>(std::min<int64_t>(num_swappable, budget_left)), plan);
  }
  // Past the budget the batch waits for the copies the forward cannot hide (eq. 3 for one way:
  // the swap-in comes back within a later step's budget). Discarding frees the blocks at once
  // and costs their recompute (eq. 4): what is short now is evicted at once (nothing else is
  // free), and what the demand takes before the tool returns (expected_recompute_tokens).
  double stall_s = std::max(0.0, cost_.swap_time_s(static_cast<double>((num_planned + num_wanted) * block_size)) -
                                     cost_.step_time_s(static_cast<double>(plan.num_batched_tokens),
                                                       static_cast<double>(plan.num_context_tokens)));
  int64_t batch_tokens = num_running_tokens();
  double stall_waste = stall_s * static_cast<double>(batch_tokens) * static_cast<double>(cost_.kv_bytes_per_token);
  double remaining_s = victim.tool_pending ? remaining_intercept_s(victim, plan.now_s) : 0.0;
  int64_t recompute_tokens = std::min<int64_t>(
      victim.kv->num_tokens,
      std::max<int64_t>(expected_recompute_tokens(victim, num_exclusive, remaining_s),
                        static_cast<int64_t>(num_wanted) * block_size + victim.kv->num_tokens % block_size));
  int64_t chunk_tokens = std::max<int64_t>(1, config_.max_batched_tokens - static_cast<int64_t>(running_.size()));
  int64_t num_chunks = (recompute_tokens + chunk_tokens - 1) / chunk_tokens;
  double discard_waste = chunked_discard_waste(cost_, recompute_tokens, batch_tokens, num_chunks);
  if (discard_waste < stall_waste) return discard_victim();
  swap_out_tail(victim, num_wanted, plan);
}

void Scheduler::decide_intercepted(StepPlan& plan) {
  if (traits_->on_intercept == InterceptAction::kSwap) {
    // The baseline moves each paused context out whole, ignoring the budget (its exclusive
    // blocks: a prefix shared with running requests stays where they need it).
    for_each_paused_on_device([&](Request& r) {
      int32_t num_exclusive = kv_.num_exclusive_blocks(*r.kv, Tier::kDevice);
      if (r.state != RequestState::kSwappingOut || num_exclusive == 0) return;
      std::vector<BlockCopy> copies = kv_.swap_out(r.id, num_exclusive, expected_next_use_s(r, plan.now_s));
      if (copies.empty()) return;  // host pool full: the context stays on the device for now
      moved_.emplace_back(r.id, static_cast<int32_t>(copies.size()));
      plan.swap_out.insert(plan.swap_out.end(), copies.begin(), copies.end());
      r.last_action_step = step_id_;
    });
    return;
  }
  // The others decided at the intercept (or, continuum, decide when the pin expires).
  if (traits_->on_intercept != InterceptAction::kMinWaste) return;

  struct Candidate {
    double min_waste;
    double preserve;
    double discard;
    Request* request;
    bool operator<(const Candidate& other) const { return min_waste < other.min_waste; }
  };
  // What memory pressure already moved out this step (evict_by_waste) counts against N_i.
  int64_t swap_budget = swap_budget_blocks(plan) - static_cast<int64_t>(plan.swap_out.size());
  int64_t other_tokens = num_running_tokens();
  // Recompute chunks ride along with the decodes: what the budget leaves after one token each.
  int64_t chunk_tokens = std::max<int64_t>(1, config_.max_batched_tokens - static_cast<int64_t>(running_.size()));

  // Preserving wastes only the memory someone else wants before the tool returns: under
  // pressure (admission blocked this step) all of it; otherwise what the block demand over the
  // intercept (the allocation rate) takes beyond the free capacity. Without that demand a
  // swap or discard frees memory nobody uses and only delays the resume.
  const double spare_blocks = kv_.pool(Tier::kDevice).num_free();
  std::vector<Candidate> swappable;
  for_each_paused_on_device([&](Request& paused) {
    Request* r = &paused;
    if (r->last_action_step == step_id_) return;
    // Only what it holds alone is the request's to keep, move or give up: blocks it shares
    // with others stay whatever it does (DESIGN.md §2 with a prefix cache, docs/prefix_cache.md).
    int32_t num_exclusive = kv_.num_exclusive_blocks(*r->kv, Tier::kDevice);
    int64_t device_tokens = num_exclusive_device_tokens(*r, num_exclusive);
    if (device_tokens == 0) return;
    double remaining_s = remaining_intercept_s(*r, plan.now_s);
    int64_t recompute_tokens = expected_recompute_tokens(*r, num_exclusive, remaining_s);
    int64_t wanted_tokens = device_tokens;
    if (config_.demand_aware_preserve && !memory_blocked_) {
      double shortfall_blocks = allocation_rate_blocks_per_s_ * remaining_s - spare_blocks;
      wanted_tokens = std::min<int64_t>(
          device_tokens, static_cast<int64_t>(std::ceil(std::max(0.0, shortfall_blocks))) * config_.block_size);
    }
    if (wanted_tokens == 0) return;  // nobody needs its memory before it returns: keep it
    Candidate c;
    c.request = r;
    c.preserve = preserve_waste(cost_, wanted_tokens, remaining_s);
    int64_t num_chunks = (recompute_tokens + chunk_tokens - 1) / chunk_tokens;
    c.discard = recompute_tokens == 0 ? 0 : chunked_discard_waste(cost_, recompute_tokens, other_tokens, num_chunks);
    c.min_waste = std::min(c.preserve, c.discard);
    // A swap pays off only if the context stays out longer than the round trip takes;
    // otherwise the tool returns before the copy could free anything.
    bool worth_swapping = remaining_s > 2 * cost_.swap_time_s(static_cast<double>(device_tokens)) &&
                          kv_.pool(Tier::kHost).num_free() > 0;
    if (worth_swapping) {
      swappable.push_back(c);
    } else if (c.discard < c.preserve) {
      move_paused(*r, RequestState::kDiscarded);
      discard(*r, &plan);
    }
  });

  // The most wasteful go out first, as far as the budget reaches; the rest take the cheaper of
  // discard and preserve.
  std::make_heap(swappable.begin(), swappable.end());
  while (!swappable.empty()) {
    std::pop_heap(swappable.begin(), swappable.end());
    Candidate c = swappable.back();
    swappable.pop_back();
    Request* r = c.request;
    if (swap_budget > 0) {
      std::vector<BlockCopy> copies =
          kv_.swap_out(r->id, static_cast<int32_t>(swap_budget), expected_next_use_s(*r, plan.now_s));
      if (!copies.empty()) {
        // Swapped too: blocks it shared became its own when the others let go.
        if (r->state == RequestState::kPreserved || r->state == RequestState::kSwapped) {
          move_paused(*r, RequestState::kSwappingOut);
        }
        swap_budget -= static_cast<int64_t>(copies.size());
        moved_.emplace_back(r->id, static_cast<int32_t>(copies.size()));
        plan.swap_out.insert(plan.swap_out.end(), copies.begin(), copies.end());
        r->last_action_step = step_id_;
        continue;
      }
    }
    if (c.discard < c.preserve) {
      move_paused(*r, RequestState::kDiscarded);
      discard(*r, &plan);
    }
  }
}

}  // namespace infercept
