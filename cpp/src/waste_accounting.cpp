// Waste accounting (DESIGN.md §2): device memory-time per cause, per request and in total.
#include <algorithm>

#include "infercept/scheduler.h"

namespace infercept {

void Scheduler::account_time(double now_s) {
  if (!ledger_.started) {
    ledger_.started = true;
    ledger_.accounted_until_s = now_s;
    return;
  }
  double elapsed_s = now_s - ledger_.accounted_until_s;
  if (elapsed_s <= 0) return;
  ledger_.accounted_until_s = now_s;
  const double bytes_per_token = static_cast<double>(cost_.kv_bytes_per_token);
  ledger_.capacity_byte_s +=
      static_cast<double>(config_.num_device_blocks) * config_.block_size * bytes_per_token * elapsed_s;
  // Paused contexts whose tools are still running hold device memory that serves no one ...
  auto charge = [&](Request& r, double num_tokens) {
    double waste = num_tokens * bytes_per_token * elapsed_s;
    r.waste.preserved_idle_byte_s += waste;
    ledger_.waste.preserved_idle_byte_s += waste;
  };
  // A block shared by k owners is charged 1/k to each paused one: it counts once when all its
  // owners are paused, and only in part while a running request also uses it. Blocks nobody
  // references are cached free capacity and cost nothing.
  for_each_paused_on_device([&](Request& r) {
    int32_t num_exclusive = kv_.num_exclusive_blocks(*r.kv, Tier::kDevice);
    double tokens = static_cast<double>(num_exclusive_device_tokens(r, num_exclusive)) +
                    kv_.shared_block_share(*r.kv, num_exclusive) * config_.block_size;
    if (tokens > 0) charge(r, tokens);
  });
  // ... and so do the blocks this step copies out for them: they are freed when the step ends.
  // (A paused context only ever moves out, once per step; the moved blocks lead its host part,
  // and only the context's last block can be partial.)
  for (const auto& [id, num_blocks] : moved_) {
    auto it = requests_.find(id);
    if (it == requests_.end() || !it->second.tool_pending) continue;
    charge(it->second, std::min(num_blocks * config_.block_size, it->second.kv->num_host_tokens(config_.block_size)));
  }
}

void Scheduler::account_step(const StepPlan& plan, const StepResult& result) {
  const double bytes_per_token = static_cast<double>(cost_.kv_bytes_per_token);
  const double duration_s = result.duration_s;
  int64_t batch_tokens = 0;  // KV the batch holds during the step
  for (const ScheduledRequest& s : plan.scheduled) batch_tokens += s.num_computed_tokens + s.num_new_tokens;

  if (plan.num_recompute_tokens > 0) {
    // The share of the step the recompute tokens added, by the cost model's shape:
    // 1 - T_fwd(B - R) / T_fwd(B). Everyone else in the batch waits for that share.
    double with_s = cost_.forward_time_s(plan.num_batched_tokens);
    double without_s = cost_.forward_time_s(plan.num_batched_tokens - plan.num_recompute_tokens);
    double delay_s = with_s > 0 ? duration_s * std::max(0.0, 1 - without_s / with_s) : 0;
    for (const ScheduledRequest& s : plan.scheduled) {
      if (s.num_recompute_tokens == 0) continue;
      auto it = requests_.find(s.request_id);
      if (it == requests_.end()) continue;
      // Its own rebuilt KV, held for the step without yet serving, plus its share of the delay.
      int64_t own_tokens = s.num_computed_tokens + s.num_recompute_tokens;
      double share = static_cast<double>(s.num_recompute_tokens) / plan.num_recompute_tokens;
      double waste = own_tokens * bytes_per_token * duration_s +
                     share * delay_s * static_cast<double>(batch_tokens - own_tokens) * bytes_per_token;
      it->second.waste.recompute_byte_s += waste;
      ledger_.waste.recompute_byte_s += waste;
    }
  }

  if (result.swap_stall_s > 0 && !moved_.empty()) {
    // The batch stood still while copies finished: charge its memory to the requests moved.
    double waste = result.swap_stall_s * static_cast<double>(batch_tokens) * bytes_per_token;
    ledger_.waste.swap_stall_byte_s += waste;
    int64_t num_moved = 0;
    for (const auto& [id, num_blocks] : moved_) num_moved += num_blocks;
    for (const auto& [id, num_blocks] : moved_) {
      auto it = requests_.find(id);
      if (it != requests_.end() && num_moved > 0) {
        it->second.waste.swap_stall_byte_s += waste * num_blocks / static_cast<double>(num_moved);
      }
    }
  }
}

}  // namespace infercept
