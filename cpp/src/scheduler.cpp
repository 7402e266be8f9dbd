#include "infercept/scheduler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <unordered_set>

#include "infercept/errors.h"

namespace infercept {
namespace {

constexpr int64_t kUnlimited = std::numeric_limits<int32_t>::max();
// A program's class (OutputLengths) is the hash of its prompt's first this-many full blocks.
constexpr size_t kClassBlocks = 8;

const SchedulerConfig& validated(const SchedulerConfig& config) {
  config.validate();
  return config;
}

// The order of the running and swapping-in lists: by queue key, then id.
bool priority_before(const Request* a, const Request* b) {
  return a->priority_s != b->priority_s ? a->priority_s < b->priority_s : a->id < b->id;
}

// The learned prediction for r's current turn, in whole tokens (-1: nothing learned yet).
int32_t learned_prediction(const OutputLengths& lengths, const Request& r) {
  const double tokens = lengths.predict(r.program_class, r.num_prompt_tokens, r.num_intercepts);
  if (tokens < 0) return -1;
  return static_cast<int32_t>(std::min<double>(std::lround(tokens), std::numeric_limits<int32_t>::max()));
}

// Keeps `list` ordered by priority (then id) when inserting `r`.
void insert_by_priority(std::vector<Request*>& list, Request* r) {
  list.insert(std::upper_bound(list.begin(), list.end(), r, priority_before), r);
}

void erase_from(std::vector<Request*>& list, Request* r) {
  list.erase(std::find(list.begin(), list.end(), r));
}

}  // namespace

void SchedulerConfig::validate() const {
  auto require = [](bool ok, const std::string& what) {
    if (!ok) throw InvalidArgumentError(what);
  };
  require(block_size > 0, "block_size must be positive, got " + std::to_string(block_size));
  require(num_device_blocks > 0, "num_device_blocks must be positive, got " + std::to_string(num_device_blocks));
  require(num_host_blocks >= 0, "num_host_blocks must be >= 0, got " + std::to_string(num_host_blocks));
  require(max_batched_tokens > 0, "max_batched_tokens must be positive, got " + std::to_string(max_batched_tokens));
  require(max_running_requests > 0,
          "max_running_requests must be positive, got " + std::to_string(max_running_requests));
  require(max_context_tokens >= 0, "max_context_tokens must be >= 0, got " + std::to_string(max_context_tokens));
  require(vocab_size >= 0, "vocab_size must be >= 0, got " + std::to_string(vocab_size));
  require(rank_s_per_predicted_token >= 0 && std::isfinite(rank_s_per_predicted_token),
          "rank_s_per_predicted_token must be finite and >= 0, got " + std::to_string(rank_s_per_predicted_token));
}

Scheduler::Scheduler(const SchedulerConfig& config, const CostModel& cost)
    : config_(validated(config)),
      traits_(&traits(config.policy)),
      cost_(cost),
      kv_(config.block_size, config.num_device_blocks, config.num_host_blocks) {
  if (cost.kv_bytes_per_token <= 0) {
    throw InvalidArgumentError("cost model kv_bytes_per_token must be positive, got " +
                               std::to_string(cost.kv_bytes_per_token));
  }
}

// ---- requests in and out ------------------------------------------------------------------

int32_t Scheduler::num_blocks(int64_t num_tokens) const {
  return static_cast<int32_t>((num_tokens + config_.block_size - 1) / config_.block_size);
}

RequestId Scheduler::add_request(int32_t num_prompt_tokens, double arrival_s, int32_t generated_token_limit) {
  RequestId id = add_counted(num_prompt_tokens, arrival_s, generated_token_limit);
  predict_from_history(requests_[id]);
  return id;
}

RequestId Scheduler::add_counted(int32_t num_prompt_tokens, double arrival_s, int32_t generated_token_limit) {
  if (num_prompt_tokens <= 0) {
    throw InvalidArgumentError("num_prompt_tokens must be positive, got " + std::to_string(num_prompt_tokens));
  }
  if (generated_token_limit < 0) {
    throw InvalidArgumentError("generated_token_limit must be >= 0, got " + std::to_string(generated_token_limit));
  }
  if (config_.max_context_tokens > 0 && num_prompt_tokens >= config_.max_context_tokens) {
    throw InvalidArgumentError("prompt of " + std::to_string(num_prompt_tokens) +
                               " tokens leaves no room to generate within the context limit of " +
                               std::to_string(config_.max_context_tokens) + " tokens");
  }
  // The prompt plus the first generated token must fit in the whole device pool.
  if (num_blocks(num_prompt_tokens + 1) > config_.num_device_blocks) {
    throw InvalidArgumentError("prompt of " + std::to_string(num_prompt_tokens) + " tokens needs " +
                               std::to_string(num_blocks(num_prompt_tokens + 1)) +
                               " KV blocks but the device pool holds only " +
                               std::to_string(config_.num_device_blocks));
  }
  RequestId id = next_id_++;
  Request& r = requests_[id];
  r.id = id;
  r.arrival_s = r.fcfs_s = r.priority_s = arrival_s;
  r.num_prompt_tokens = num_prompt_tokens;
  r.generated_token_limit = generated_token_limit;
  r.kv = &kv_.add(id);
  enqueue(r);
  ++num_live_;
  return id;
}

RequestId Scheduler::add_request(const std::vector<TokenId>& prompt_token_ids, double arrival_s,
                                 int32_t generated_token_limit, const std::string& cache_salt,
                                 bool skip_reading_prefix_cache) {
  check_token_ids(prompt_token_ids, "prompt");
  if (prompt_token_ids.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max() / 2)) {
    throw InvalidArgumentError("prompt of " + std::to_string(prompt_token_ids.size()) + " tokens is too long");
  }
  RequestId id = add_counted(static_cast<int32_t>(prompt_token_ids.size()), arrival_s, generated_token_limit);
  Request& r = requests_[id];
  r.tokens = TokenBlocks(config_.block_size, hash_salt(cache_salt));
  r.tokens.append(prompt_token_ids);
  r.cacheable = caching();
  r.skip_reading_prefix_cache = skip_reading_prefix_cache;
  // The class is the prompt's head: programs of one app (system prompt, tool schemas) share
  // it, while a question a few blocks in does not split them.
  const std::vector<BlockHash>& hashes = r.tokens.block_hashes();
  if (!hashes.empty()) r.program_class = hashes[std::min(hashes.size(), kClassBlocks) - 1];
  predict_from_history(r);
  return id;
}

void Scheduler::check_token_ids(const std::vector<TokenId>& token_ids, const char* what) const {
  for (size_t i = 0; i < token_ids.size(); ++i) {
    TokenId t = token_ids[i];
    if (t < 0 || (config_.vocab_size > 0 && t >= config_.vocab_size)) {
      throw InvalidArgumentError(std::string(what) + " token id " + std::to_string(t) + " at position " +
                                 std::to_string(i) + " is outside the vocabulary [0, " +
                                 (config_.vocab_size > 0 ? std::to_string(config_.vocab_size) : "2^31") + ")");
    }
  }
}

Request* Scheduler::find_request(RequestId request) {
  auto it = requests_.find(request);
  return it == requests_.end() ? nullptr : &it->second;
}

Request& Scheduler::get(RequestId request) {
  auto it = requests_.find(request);
  if (it == requests_.end()) throw UnknownRequestError("unknown request id " + std::to_string(request));
  return it->second;
}

const Request& Scheduler::request(RequestId request) const {
  return const_cast<Scheduler*>(this)->get(request);
}

RequestState Scheduler::intercept(RequestId request, double now_s, double expected_duration_s,
                                  const std::string& tool_name) {
  Request& r = get(request);
  if (r.state != RequestState::kRunning || r.num_uncomputed_tokens() != 1) {
    throw StateError("request " + std::to_string(request) + " cannot be intercepted while " +
                     to_string(r.state) + " with " + std::to_string(r.num_uncomputed_tokens()) +
                     " uncomputed tokens; only a running request that has just sampled can");
  }
  remove_running(r);
  r.tool_pending = true;
  r.intercept_start_s = now_s;
  r.expected_duration_s = expected_duration_s;
  if (config_.learn_output_lengths) {
    r.turn_outputs.push_back(r.num_generated_tokens - r.generated_before_turn);
    r.generated_before_turn = r.num_generated_tokens;
  }
  ++r.num_intercepts;
  r.tool_id = tool_durations_.id(tool_name);
  double pin_s = 0;
  switch (traits_->on_intercept) {
    case InterceptAction::kPinWithTtl:
      pin_s = pin_ttl_s(r);
      if (pin_s > 0) {
        r.transition(RequestState::kPreserved);
        r.pin_until_s = now_s + pin_s;
        break;
      }
      [[fallthrough]];  // not worth pinning: the request ends into the prefix cache at once
    case InterceptAction::kEndRequest:
    case InterceptAction::kDiscard:
      r.transition(RequestState::kDiscarded);
      discard(r, nullptr);
      break;
    case InterceptAction::kPreserve:
    case InterceptAction::kMinWaste:  // min-waste decides from the next schedule() on
      r.transition(RequestState::kPreserved);
      break;
    case InterceptAction::kSwap:  // the copy is planned by the next schedule()
      r.transition(RequestState::kSwappingOut);
      break;
  }
  add_intercepted(r);
  r.reported_state = r.state;
  return r.state;
}

std::vector<RequestState> Scheduler::intercept_batch(const std::vector<InterceptEvent>& events) {
  std::unordered_set<RequestId> seen;
  for (const InterceptEvent& e : events) {
    const Request& r = get(e.request);
    if (r.state != RequestState::kRunning || r.num_uncomputed_tokens() != 1) {
      throw StateError("request " + std::to_string(e.request) + " cannot be intercepted while " +
                       to_string(r.state) + " with " + std::to_string(r.num_uncomputed_tokens()) +
                       " uncomputed tokens; only a running request that has just sampled can");
    }
    if (!seen.insert(e.request).second) {
      throw InvalidArgumentError("request " + std::to_string(e.request) + " is intercepted twice in one batch");
    }
  }
  std::vector<RequestState> states;
  states.reserve(events.size());
  for (const InterceptEvent& e : events) {
    states.push_back(intercept(e.request, e.now_s, e.expected_duration_s, e.tool_name));
  }
  return states;
}

std::vector<std::string> Scheduler::resume_batch(const std::vector<ResumeEvent>& events) {
  std::vector<std::string> errors(events.size());
  for (size_t i = 0; i < events.size(); ++i) {
    const ResumeEvent& e = events[i];
    try {
      if (e.num_tool_tokens >= 0) resume(e.request, e.num_tool_tokens, e.now_s);
      else resume(e.request, e.tool_token_ids, e.now_s, e.num_replaced_tokens);
    } catch (const Error& error) {
      errors[i] = error.what();
    }
  }
  return errors;
}

Request& Scheduler::paused_on_tool(RequestId request) {
  Request& r = get(request);
  if (!r.tool_pending) {
    throw StateError("request " + std::to_string(request) + " is " + to_string(r.state) +
                     ", not waiting on a tool; only an intercepted request can be resumed");
  }
  return r;
}

void Scheduler::resume(RequestId request, const std::vector<TokenId>& tool_token_ids, double now_s,
                       int32_t num_replaced_tokens) {
  Request& r = paused_on_tool(request);
  if (!r.has_token_ids()) {
    throw StateError("request " + std::to_string(request) + " was added by counts only; resume it with a token count");
  }
  check_token_ids(tool_token_ids, "tool");
  if (num_replaced_tokens < 0 || num_replaced_tokens > r.num_uncomputed_tokens()) {
    throw InvalidArgumentError("resume can replace only the " + std::to_string(r.num_uncomputed_tokens()) +
                               " tokens of request " + std::to_string(request) + " whose KV is not computed, not " +
                               std::to_string(num_replaced_tokens));
  }
  requeue_after_tool(r, static_cast<int32_t>(tool_token_ids.size()) - num_replaced_tokens, now_s);
  r.tokens.truncate_back(num_replaced_tokens);
  r.tokens.append(tool_token_ids);
  // A context that gave its blocks up wants back what is still cached: soon. (Under plain LRU
  // the cache does not know a continuation is coming: vLLM's continuation is a new request.)
  if (r.cacheable && r.kv->num_tokens == 0 && traits_->eviction_order == EvictionOrder::kExpectedNextUse) {
    kv_.touch_cached(r.tokens, now_s);
  }
}

void Scheduler::resume(RequestId request, int32_t num_tool_tokens, double now_s) {
  Request& r = paused_on_tool(request);
  if (num_tool_tokens < 0) {
    throw InvalidArgumentError("num_tool_tokens must be >= 0, got " + std::to_string(num_tool_tokens));
  }
  if (r.has_token_ids()) {
    throw StateError("request " + std::to_string(request) + " carries token ids; resume it with the tool's token ids");
  }
  requeue_after_tool(r, num_tool_tokens, now_s);
}

void Scheduler::requeue_after_tool(Request& r, int32_t num_tool_tokens, double now_s) {
  RequestId request = r.id;
  int64_t num_tokens = static_cast<int64_t>(r.num_tokens()) + num_tool_tokens;
  bool over_context = config_.max_context_tokens > 0 && num_tokens >= config_.max_context_tokens;
  if (over_context || num_blocks(num_tokens + 1) > config_.num_device_blocks) {
    std::string limit = over_context ? "the context limit of " + std::to_string(config_.max_context_tokens) + " tokens"
                                     : "the device pool of " + std::to_string(config_.num_device_blocks) + " blocks";
    release(r, RequestState::kAborted);
    throw InvalidArgumentError("resuming request " + std::to_string(request) + " with " +
                               std::to_string(num_tool_tokens) + " tool tokens makes its context " +
                               std::to_string(num_tokens) + " tokens, over " + limit +
                               "; the request was aborted and its blocks freed");
  }
  remove_intercepted(r);
  r.tool_pending = false;
  r.num_tool_tokens += num_tool_tokens;
  tool_durations_.record(r.tool_id, now_s - r.intercept_start_s);
  r.pin_until_s = -1;  // the pin has served: the request runs again as soon as it can
  r.resumed_at_s = r.kv->num_tokens == 0 ? now_s : -1;
  if (r.state == RequestState::kSwappingOut && r.kv->host_blocks.empty()) r.transition(RequestState::kPreserved);
  if (traits_->resume_order == ResumeOrder::kNewArrival) {
    // vLLM treats the tool's return as the start of a new request: the back of the queue.
    r.fcfs_s = now_s;
    r.transition(RequestState::kWaiting);
  }
  // Held in no ordered list now (intercepted_ has no order): the new key needs no re-keying.
  if (config_.learn_output_lengths && r.caller_predicted_turn != r.num_intercepts) {
    r.predicted_output_tokens = learned_prediction(output_lengths_, r);
  }
  r.priority_s = ranked_priority(r);
  enqueue(r);
}

void Scheduler::set_expected_duration(RequestId request, double expected_duration_s) {
  get(request).expected_duration_s = expected_duration_s;
}

void Scheduler::set_generated_token_limit(RequestId request, int32_t generated_token_limit) {
  if (generated_token_limit < 0) {
    throw InvalidArgumentError("generated_token_limit must be >= 0, got " + std::to_string(generated_token_limit));
  }
  get(request).generated_token_limit = generated_token_limit;
}

void Scheduler::set_predicted_output_tokens(RequestId request, int32_t num_tokens) {
  Request& r = get(request);
  r.caller_predicted_turn = r.num_intercepts;
  set_prediction(r, num_tokens);
}

void Scheduler::predict_from_history(Request& r) {
  if (config_.learn_output_lengths && r.caller_predicted_turn != r.num_intercepts) {
    set_prediction(r, learned_prediction(output_lengths_, r));
  }
}

void Scheduler::set_prediction(Request& r, int32_t num_tokens) {
  r.predicted_output_tokens = num_tokens < 0 ? -1 : num_tokens;
  double priority_s = ranked_priority(r);
  if (priority_s == r.priority_s) return;
  // Re-key wherever the request is held in priority order: the queue, or the list its state
  // puts it in (check_invariants ties running_ and swapping_in_ to the states).
  const bool queued = queue_.count({r.priority_s, r.id}) != 0;
  std::vector<Request*>* list = is_computing(r.state)                     ? &running_
                                : r.state == RequestState::kSwappingIn ? &swapping_in_
                                                                        : nullptr;
  if (queued) dequeue(r);
  if (list != nullptr) erase_from(*list, &r);
  r.priority_s = priority_s;
  if (list != nullptr) insert_by_priority(*list, &r);
  if (queued) enqueue(r);
}

double Scheduler::ranked_priority(const Request& r) const {
  if (config_.rank_s_per_predicted_token <= 0 || r.predicted_output_tokens < 0) return r.fcfs_s;
  return r.fcfs_s + config_.rank_s_per_predicted_token * r.predicted_output_tokens;
}

void Scheduler::finish(RequestId request) {
  Request& r = get(request);
  if (r.state != RequestState::kRunning) {
    throw StateError("request " + std::to_string(request) + " cannot finish while " + to_string(r.state));
  }
  if (config_.learn_output_lengths) {
    r.turn_outputs.push_back(r.num_generated_tokens - r.generated_before_turn);
    output_lengths_.record(r.program_class, r.num_prompt_tokens, r.turn_outputs);
  }
  release(r, RequestState::kFinished);
}

void Scheduler::abort(RequestId request) {
  Request& r = get(request);
  if (is_terminal(r.state)) {
    throw StateError("request " + std::to_string(request) + " is already " + to_string(r.state));
  }
  release(r, RequestState::kAborted);
}

void Scheduler::remove(RequestId request) {
  Request& r = get(request);
  if (!is_terminal(r.state)) {
    throw StateError("request " + std::to_string(request) + " is " + to_string(r.state) +
                     "; only finished or aborted requests can be removed");
  }
  kv_.free(request);
  requests_.erase(request);
  ++num_removed_;
}

void Scheduler::release(Request& r, RequestState terminal) {
  if (is_computing(r.state)) remove_running(r);
  else if (r.state == RequestState::kSwappingIn) erase_from(swapping_in_, &r);
  else if (r.tool_pending) remove_intercepted(r);
  else dequeue(r);
  r.tool_pending = false;
  kv_.discard(r.id);
  r.kv->num_tokens_to_recompute = 0;
  r.transition(terminal);
  --num_live_;
  ++(terminal == RequestState::kFinished ? totals_.num_finished : totals_.num_aborted);
}

double Scheduler::expected_next_use_s(const Request& r, double now_s) const {
  if (traits_->eviction_order == EvictionOrder::kLeastRecentlyUsed) return -1;  // the time since last use decides
  if (!r.tool_pending) return now_s;  // queued or preempted: wanted back as soon as it can run
  if (r.expected_duration_s >= 0) return std::max(now_s, r.intercept_start_s + r.expected_duration_s);
  return -1;  // unknown: the time since it let go stands for the time to its return
}

void Scheduler::discard(Request& r, StepPlan* plan) {
  r.pin_until_s = -1;
  kv_.discard(r.id, expected_next_use_s(r, plan ? plan->now_s : r.intercept_start_s));
  r.last_action_step = step_id_;
  if (plan) plan->discarded.push_back(r.id);
}

// ---- queues -------------------------------------------------------------------------------

void Scheduler::enqueue(Request& r) { queue_.emplace(r.priority_s, r.id); }
void Scheduler::dequeue(Request& r) { queue_.erase({r.priority_s, r.id}); }
void Scheduler::add_running(Request& r) { insert_by_priority(running_, &r); }
void Scheduler::remove_running(Request& r) { erase_from(running_, &r); }

void Scheduler::add_intercepted(Request& r) {
  const size_t i = intercepted_.size();
  r.intercepted_index = static_cast<int32_t>(i);
  intercepted_.push_back(&r);
  intercepted_kv_.push_back(r.kv);
  if (i % 64 == 0) intercepted_on_device_.push_back(0);
  intercepted_on_device_[i / 64] |= uint64_t{1} << (i % 64);
}

void Scheduler::remove_intercepted(Request& r) {
  // Move the last entry into the hole: O(1), the list has no order.
  const size_t i = static_cast<size_t>(r.intercepted_index);
  const size_t last = intercepted_.size() - 1;
  Request* moved = intercepted_[last];
  intercepted_[i] = moved;
  intercepted_kv_[i] = intercepted_kv_[last];
  const uint64_t last_bit = (intercepted_on_device_[last / 64] >> (last % 64)) & 1;
  intercepted_on_device_[i / 64] = (intercepted_on_device_[i / 64] & ~(uint64_t{1} << (i % 64))) | (last_bit << (i % 64));
  intercepted_on_device_[last / 64] &= ~(uint64_t{1} << (last % 64));
  moved->intercepted_index = static_cast<int32_t>(i);
  intercepted_.pop_back();
  intercepted_kv_.pop_back();
  if (last % 64 == 0) intercepted_on_device_.pop_back();
  r.intercepted_index = -1;
}

// ---- one iteration ------------------------------------------------------------------------

StepPlan Scheduler::schedule(double now_s) {
  StepPlan plan;
  schedule_into(now_s, plan);
  return plan;
}

void Scheduler::schedule_into(double now_s, StepPlan& plan) {
  if (updated_step_id_ != step_id_) {
    throw StateError("schedule() called before update() applied the plan of step " + std::to_string(step_id_) +
                     "; every plan, an empty one too, must be applied before the next is made");
  }
  account_time(now_s);
  kv_.set_now(now_s);
  plan.clear();
  plan.step_id = ++step_id_;
  memory_blocked_ = false;
  plan.now_s = now_s;
  moved_.clear();
  scheduled_requests_.clear();
  num_removed_at_schedule_ = num_removed_;
  // At most max_running_requests are scheduled (admission keeps running + swapping in under it).
  plan.scheduled.reserve(std::min<size_t>(static_cast<size_t>(config_.max_running_requests),
                                          running_.size() + swapping_in_.size() + queue_.size()));

  expire_pins(plan);  // their memory is free for this step's batch
  int32_t token_budget = config_.max_batched_tokens;
  schedule_running(plan, token_budget);
  // The swap-in budget comes from the batch formed so far: admissions only add tokens, so
  // the copies stay hidden behind the final forward too.
  int64_t swap_in_budget_blocks = swap_budget_blocks(plan);
  schedule_swapping_in(plan, swap_in_budget_blocks);
  admit_queued(plan, token_budget, swap_in_budget_blocks);
  plan.swap_budget_tokens = cost_.swap_budget_tokens(plan.num_batched_tokens, plan.num_context_tokens);
  // After every device allocation of the step: a store's source, even an evictable one, cannot
  // be evicted under the copy (releases of referenced sources wait for commit()).
  store_computed_blocks(plan);
  decide_intercepted(plan);
  build_batch(plan);
}

void Scheduler::add_chunk(Request& r, int32_t num_new_tokens, StepPlan& plan) {
  ScheduledRequest s;
  s.request_id = r.id;
  s.num_computed_tokens = r.kv->num_tokens;
  s.num_new_tokens = num_new_tokens;
  s.num_recompute_tokens = kv_.append_tokens(*r.kv, num_new_tokens);
  s.samples = r.kv->num_tokens == r.num_tokens();
  plan.num_batched_tokens += num_new_tokens;
  plan.num_context_tokens += r.kv->num_tokens;
  plan.num_recompute_tokens += s.num_recompute_tokens;
  plan.num_sampling_requests += s.samples;
  plan.scheduled.push_back(std::move(s));
  scheduled_requests_.push_back(&r);
  r.last_action_step = step_id_;
}

void Scheduler::schedule_running(StepPlan& plan, int32_t& token_budget) {
  // Highest priority first; make_room() preempts from the back, so the list can shrink under us.
  for (size_t i = 0; i < running_.size() && token_budget > 0; ++i) {
    Request& r = *running_[i];
    int32_t num_new_tokens = std::min(r.num_uncomputed_tokens(), token_budget);
    if (num_new_tokens <= 0) continue;
    int32_t needed = kv_.num_blocks_to_append(*r.kv, num_new_tokens);
    // make_room() would return at once: skip the call (most steps, for most of the batch).
    if (!kv_.pool(Tier::kDevice).can_allocate(needed) && !make_room(r, needed, plan)) {
      if (i < running_.size() && running_[i] != &r) --i;  // r left the list; revisit this slot
      continue;
    }
    add_chunk(r, num_new_tokens, plan);
    token_budget -= num_new_tokens;
  }
}

void Scheduler::schedule_swapping_in(StepPlan& plan, int64_t& swap_in_budget_blocks) {
  const BlockPool& device = kv_.pool(Tier::kDevice);
  // By index: reclaiming may remove a lower-priority entry (never this one or those before it).
  for (size_t i = 0; i < swapping_in_.size(); ++i) {
    Request* r = swapping_in_[i];
    if (swap_in_budget_blocks <= 0) break;
    if (r->kv->host_blocks.empty() || r->last_action_step == step_id_) continue;
    // A full device pool with nothing running or being freed: only paused or lower-priority
    // contexts can give way, or the swap-in would wait forever.
    while (device.num_free() == 0 && running_.empty() && kv_.num_device_blocks_releasing() == 0 &&
           reclaim_intercepted(plan, r, static_cast<int32_t>(std::min<int64_t>(swap_in_budget_blocks,
                                                                               r->kv->host_blocks.size())))) {
    }
    size_t num_host_blocks = r->kv->host_blocks.size();
    std::vector<BlockCopy> copies = kv_.swap_in(r->id, static_cast<int32_t>(swap_in_budget_blocks));
    // Blocks still cached on the device come back without a copy: they count as moved.
    int32_t num_moved = static_cast<int32_t>(num_host_blocks - r->kv->host_blocks.size());
    if (num_moved == 0) continue;
    swap_in_budget_blocks -= static_cast<int64_t>(copies.size());
    moved_.emplace_back(r->id, num_moved);
    plan.swap_in.insert(plan.swap_in.end(), copies.begin(), copies.end());
    r->last_action_step = step_id_;
  }
}

void Scheduler::admit_queued(StepPlan& plan, int32_t& token_budget, int64_t& swap_in_budget_blocks) {
  const BlockPool& device = kv_.pool(Tier::kDevice);
  // FCFS over the queue: when the head cannot start, nothing behind it does, with one
  // exception. A swapped context held back only by this step's swap-in budget (the copy link,
  // not memory) keeps its place and the device room its host blocks need, and those behind it
  // that need no copy may start in the room left: else the batch idles behind the link.
  int64_t num_reserved_blocks = 0;
  bool skipped = false;
  std::pair<double, RequestId> last_skipped;
  while (true) {
    auto it = skipped ? queue_.upper_bound(last_skipped) : queue_.begin();
    if (it == queue_.end()) return;
    if (static_cast<int32_t>(running_.size() + swapping_in_.size()) >= config_.max_running_requests) return;
    Request& r = get(it->second);
    if (r.last_action_step == step_id_) return;  // preempted this step: its copies are in flight
    const bool can_read_cache = !(r.skip_reading_prefix_cache && r.num_generated_tokens == 0);
    if (r.cacheable && can_read_cache && r.kv->num_tokens == 0) {
      reuse_cached_prefix(r, token_budget, swap_in_budget_blocks, num_reserved_blocks);
    }

    if (!r.kv->host_blocks.empty()) {
      // Swapped out (wholly or partly): bring it back within the swap budget.
      // A chunked swap-in takes what is free now; the rest follows as blocks free up.
      int32_t num_moves = static_cast<int32_t>(
          std::min<int64_t>({swap_in_budget_blocks, static_cast<int64_t>(r.kv->host_blocks.size()),
                             static_cast<int64_t>(device.num_free())}));
      int64_t num_room = static_cast<int64_t>(device.num_free()) - num_reserved_blocks;
      if (swap_in_budget_blocks <= 0 && num_room >= static_cast<int64_t>(r.kv->host_blocks.size())) {
        num_reserved_blocks += static_cast<int64_t>(r.kv->host_blocks.size());
        skipped = true;
        last_skipped = *it;
        continue;
      }
      if (num_moves <= 0) {
        bool idle = running_.empty() && swapping_in_.empty() && kv_.num_device_blocks_releasing() == 0;
        int32_t num_wanted = static_cast<int32_t>(
            std::min<int64_t>(swap_in_budget_blocks, static_cast<int64_t>(r.kv->host_blocks.size())));
        if (swap_in_budget_blocks > 0 && idle && reclaim_intercepted(plan, &r, num_wanted)) continue;
        memory_blocked_ = memory_blocked_ || device.num_free() == 0;
        return;
      }
      leave_queue(r, plan.now_s);
      r.transition(RequestState::kSwappingIn);
      insert_by_priority(swapping_in_, &r);
      size_t num_host_blocks = r.kv->host_blocks.size();
      std::vector<BlockCopy> copies = kv_.swap_in(r.id, num_moves);
      swap_in_budget_blocks -= static_cast<int64_t>(copies.size());
      moved_.emplace_back(r.id, static_cast<int32_t>(num_host_blocks - r.kv->host_blocks.size()));
      plan.swap_in.insert(plan.swap_in.end(), copies.begin(), copies.end());
      r.last_action_step = step_id_;
      continue;
    }

    if (token_budget <= 0) return;
    int32_t num_new_tokens = std::min(r.num_uncomputed_tokens(), token_budget);
    int32_t needed = kv_.num_blocks_to_append(*r.kv, num_new_tokens);
    if (!device.can_allocate(needed + static_cast<int32_t>(num_reserved_blocks))) {
      memory_blocked_ = true;
      if (num_reserved_blocks > 0) return;  // the room left is the skipped contexts'
      // Nothing else can free memory (no batch, no copies): paused contexts must give way,
      // or the engine would wait forever.
      bool idle = running_.empty() && swapping_in_.empty() && kv_.num_device_blocks_releasing() == 0;
      if (idle && reclaim_intercepted(plan, &r, needed - device.num_free())) continue;
      if (idle && num_blocks(r.num_tokens()) > config_.num_device_blocks) {
        // Alone, nothing left to reclaim, and its context cannot fit even in an empty pool
        // (it grew while preempted): waiting would never end.
        pending_aborts_.emplace_back(r.id, "context of " + std::to_string(r.num_tokens()) +
                                               " tokens outgrew the device pool of " +
                                               std::to_string(config_.num_device_blocks) + " blocks of " +
                                               std::to_string(config_.block_size) + " tokens");
        release(r, RequestState::kAborted);
        continue;
      }
      return;
    }
    leave_queue(r, plan.now_s);
    r.transition(r.kv->num_tokens_to_recompute > 0 ? RequestState::kRecomputing : RequestState::kRunning);
    add_running(r);
    add_chunk(r, num_new_tokens, plan);
    token_budget -= num_new_tokens;
  }
}

// ---- the prefix cache at admission -------------------------------------------------------

void Scheduler::reuse_cached_prefix(Request& r, int32_t token_budget, int64_t swap_in_budget_blocks,
                                    int64_t num_reserved_blocks) {
  const int32_t block_size = config_.block_size;
  r.last_lookup_step = step_id_;
  r.num_lookup_hit_tokens = r.num_lookup_host_hit_tokens = 0;
  // The last token is always computed: its logits are what the request samples from.
  CachedPrefix prefix = kv_.find_cached_prefix(r.tokens, (r.num_tokens() - 1) / block_size);
  const BlockPool& device = kv_.pool(Tier::kDevice);
  // The room skipped swapped heads reserved is theirs: a hit that needs it would leave the
  // request waiting with blocks.
  int64_t room = static_cast<int64_t>(device.num_free()) - prefix.num_evictable_device_blocks - num_reserved_blocks;
  // Host hits come back through the swap engine, within the budget and as device room allows;
  // when neither is there this step, they are recomputed like a miss.
  if (!prefix.host_blocks.empty() && (swap_in_budget_blocks <= 0 || room <= 0)) prefix.host_blocks.clear();
  if (prefix.num_blocks() == 0) return;
  if (prefix.host_blocks.empty()) {
    // Adopt only when the first chunk after the hit can start now; else look again next step.
    int32_t num_hit_tokens = prefix.num_blocks() * block_size;
    int32_t num_new_tokens = std::min(r.num_tokens() - num_hit_tokens, token_budget);
    int32_t needed = num_blocks(num_hit_tokens + num_new_tokens) - prefix.num_blocks();
    if (token_budget <= 0 || needed > room) return;
  }
  r.num_lookup_host_hit_tokens = static_cast<int32_t>(prefix.host_blocks.size()) * block_size;
  r.num_lookup_hit_tokens = kv_.adopt_cached_prefix(r.id, prefix);
}

void Scheduler::leave_queue(Request& r, double now_s) {
  dequeue(r);
  count_lookup(r);
  if (r.resumed_at_s >= 0) {
    // What a turn that lost its KV waits for the batch (continuum's queueing term).
    constexpr double kWeight = 0.1;
    resume_wait_s_ += kWeight * (std::max(0.0, now_s - r.resumed_at_s) - resume_wait_s_);
    r.resumed_at_s = -1;
  }
}

void Scheduler::count_lookup(Request& r) {
  // At the step the request leaves the queue, if it was looked up then: once per admission.
  if (!r.cacheable || r.last_lookup_step != step_id_) return;
  totals_.prefix_cache_queries += r.num_tokens();
  totals_.prefix_cache_hits += r.num_lookup_hit_tokens;
  totals_.prefix_cache_host_hits += r.num_lookup_host_hit_tokens;
  if (!r.admitted_once) r.num_cached_tokens = std::min(r.num_lookup_hit_tokens, r.num_prompt_tokens);
  r.admitted_once = true;
}

// ---- memory pressure ----------------------------------------------------------------------

bool Scheduler::make_room(Request& r, int32_t needed, StepPlan& plan) {
  const BlockPool& device = kv_.pool(Tier::kDevice);
  while (!device.can_allocate(needed)) {
    // Blocks that this step's swap-outs release will do: wait one step for them.
    if (device.num_free() + kv_.num_device_blocks_releasing() >= needed) return false;
    int32_t num_short = needed - device.num_free() - kv_.num_device_blocks_releasing();
    if (reclaim_intercepted(plan, &r, num_short)) continue;
    Request* victim = running_.back();
    if (victim == &r && running_.size() == 1) {
      // Alone and still too big: the context has outgrown the whole pool.
      std::string reason = "context of " + std::to_string(r.num_tokens()) + " tokens outgrew the device pool of " +
                           std::to_string(config_.num_device_blocks) + " blocks of " +
                           std::to_string(config_.block_size) + " tokens";
      pending_aborts_.emplace_back(r.id, reason);
      release(r, RequestState::kAborted);
      return false;
    }
    preempt(*victim, plan);
    if (victim == &r) return false;
  }
  return true;
}

bool Scheduler::reclaim_intercepted(StepPlan& plan, const Request* keep, int32_t num_blocks_short) {
  // First the contexts whose tools are still running, longest expected wait first; then the
  // resumable ones in the queue and those swapping in, lowest priority first. Each is evicted:
  // moved to the host whole where the policy swaps and the host has room, else discarded;
  // min-waste instead frees what is short by its equations (evict_by_waste).
  // A context whose device blocks are all shared frees nothing by going, so it goes only when
  // no other can (the last of several paused sharers then frees the shared blocks).
  for (bool need_exclusive : {true, false}) {
    auto gives_way = [&](const Request& r) {
      if (&r == keep || r.kv->device_blocks.empty() || r.last_action_step == step_id_) return false;
      return !need_exclusive || kv_.num_exclusive_blocks(*r.kv, Tier::kDevice) > 0;
    };
    Request* victim = nullptr;
    double longest_s = -1;
    for_each_paused_on_device([&](Request& r) {
      if (!gives_way(r)) return;
      double remaining_s = remaining_intercept_s(r, plan.now_s);
      if (remaining_s > longest_s) longest_s = remaining_s, victim = &r;
    });
    if (victim) {
      evict_under_pressure(*victim, plan, num_blocks_short);
      return true;
    }
    for (auto it = queue_.rbegin(); it != queue_.rend(); ++it) {
      Request& r = get(it->second);
      if (!gives_way(r)) continue;
      evict_under_pressure(r, plan, num_blocks_short);  // stays queued, by its original arrival
      return true;
    }
    for (auto it = swapping_in_.rbegin(); it != swapping_in_.rend(); ++it) {
      Request& r = **it;
      if (!gives_way(r)) continue;
      erase_from(swapping_in_, &r);
      evict_under_pressure(r, plan, num_blocks_short);
      enqueue(r);
      return true;
    }
  }
  return false;
}

void Scheduler::evict_under_pressure(Request& victim, StepPlan& plan, int32_t num_blocks_short) {
  if (traits_->on_intercept == InterceptAction::kMinWaste) {
    evict_by_waste(victim, plan, num_blocks_short);
  } else {
    evict(victim, plan);
  }
}

void Scheduler::evict(Request& victim, StepPlan& plan) {
  if (swap_out_whole(victim, plan)) return;
  move_paused(victim, RequestState::kDiscarded);
  discard(victim, &plan);
}

bool Scheduler::swap_out_whole(Request& victim, StepPlan& plan) {
  int32_t num_device_blocks = kv_.num_exclusive_blocks(*victim.kv, Tier::kDevice);
  bool can_swap = traits_->swaps && num_device_blocks > 0 && kv_.pool(Tier::kHost).can_allocate(num_device_blocks);
  if (!can_swap) return false;
  // The whole context at once: memory pressure is an emergency and cannot wait for a budget.
  swap_out_tail(victim, num_device_blocks, plan);
  return true;
}

void Scheduler::swap_out_tail(Request& victim, int32_t num_blocks, StepPlan& plan) {
  if (victim.state != RequestState::kSwappingOut) move_paused(victim, RequestState::kSwappingOut);
  std::vector<BlockCopy> copies = kv_.swap_out(victim.id, num_blocks, expected_next_use_s(victim, plan.now_s));
  moved_.emplace_back(victim.id, static_cast<int32_t>(copies.size()));
  plan.swap_out.insert(plan.swap_out.end(), copies.begin(), copies.end());
  victim.last_action_step = step_id_;
}

void Scheduler::preempt(Request& victim, StepPlan& plan) {
  remove_running(victim);
  ++victim.num_preemptions;
  ++totals_.num_preemptions;
  plan.preempted.push_back(victim.id);
  evict(victim, plan);
  enqueue(victim);
}

int64_t Scheduler::swap_budget_blocks(const StepPlan& plan) const {
  if (!traits_->honours_swap_budget) return kUnlimited;  // the swap baseline ignores the budget
  int64_t tokens = cost_.swap_budget_tokens(plan.num_batched_tokens, plan.num_context_tokens);
  return std::max<int64_t>(1, tokens / config_.block_size);
}

// ---- after the step -----------------------------------------------------------------------

StepOutput Scheduler::update(const StepPlan& plan, const StepResult& result, double now_s) {
  if (plan.step_id != step_id_) {
    throw StateError("update() got the plan of step " + std::to_string(plan.step_id) +
                     " but the last scheduled step is " + std::to_string(step_id_));
  }
  if (result.duration_s < 0 || result.swap_stall_s < 0 || result.swap_stall_s > result.duration_s + 1e-12) {
    throw InvalidArgumentError("step result needs 0 <= swap_stall_s <= duration_s, got swap_stall_s=" +
                               std::to_string(result.swap_stall_s) + " duration_s=" +
                               std::to_string(result.duration_s));
  }
  const std::vector<TokenId>& sampled_ids = result.sampled_token_ids;
  if (!sampled_ids.empty() && static_cast<int32_t>(sampled_ids.size()) != plan.num_sampling_requests) {
    throw InvalidArgumentError("step result carries " + std::to_string(sampled_ids.size()) +
                               " sampled token ids but the plan samples " +
                               std::to_string(plan.num_sampling_requests) + " requests");
  }
  check_token_ids(sampled_ids, "sampled");
  if (sampled_ids.empty()) {
    for (const ScheduledRequest& s : plan.scheduled) {
      auto it = requests_.find(s.request_id);
      if (s.samples && it != requests_.end() && it->second.cacheable && is_computing(it->second.state)) {
        throw InvalidArgumentError("step result carries no sampled token ids but request " +
                                   std::to_string(s.request_id) + " has token identity and sampled this step");
      }
    }
  }
  updated_step_id_ = step_id_;
  account_time(now_s);
  account_step(plan, result);
  kv_.set_now(now_s);
  kv_.commit();
  update_allocation_rate(now_s);

  StepOutput out;
  out.sampled.reserve(static_cast<size_t>(plan.num_sampling_requests));
  size_t sample_index = 0;
  const bool none_removed = num_removed_ == num_removed_at_schedule_;
  for (size_t i = 0; i < plan.scheduled.size(); ++i) {
    const ScheduledRequest& s = plan.scheduled[i];
    size_t row = s.samples ? sample_index++ : 0;
    Request* found = none_removed && i < scheduled_requests_.size() && scheduled_requests_[i]->id == s.request_id
                         ? scheduled_requests_[i]
                         : find_request(s.request_id);
    if (found == nullptr || !is_computing(found->state)) continue;  // aborted meanwhile
    Request& r = *found;
    if (r.state == RequestState::kRecomputing && r.kv->num_tokens_to_recompute == 0) {
      r.transition(RequestState::kRunning);
    }
    if (r.has_token_ids() && s.samples && !sampled_ids.empty()) r.tokens.append(&sampled_ids[row], 1);
    if (r.cacheable) {
      int32_t num_cached_before = r.kv->num_cached_blocks;
      kv_.cache_full_blocks(*r.kv, r.tokens);
      if (traits_->host_offload == HostOffload::kStoreOnCompute) {
        // Each block once its KV exists, as vLLM's OffloadingConnector stores computed blocks.
        for (int32_t i = num_cached_before; i < r.kv->num_cached_blocks; ++i) {
          BlockId block = r.kv->device_blocks[i];
          to_store_.emplace_back(block, r.tokens.block_hashes()[i]);
        }
      }
    }
    if (!s.samples) continue;
    ++r.num_generated_tokens;
    out.sampled.push_back(r.id);
    if (r.generated_token_limit > 0 && r.num_generated_tokens >= r.generated_token_limit) {
      out.reached_limit.push_back(r.id);
    }
  }
  totals_.num_recomputed_tokens += plan.num_recompute_tokens;
  totals_.num_swap_out_blocks += static_cast<int64_t>(plan.swap_out.size());
  totals_.num_swap_in_blocks += static_cast<int64_t>(plan.swap_in.size());

  // Copies are done: finish the moves they completed.
  for (const auto& [id, num_blocks] : moved_) {
    auto it = requests_.find(id);
    if (it == requests_.end()) continue;
    Request& r = it->second;
    if (r.cacheable) kv_.cache_full_blocks(*r.kv, r.tokens);  // swapped-in blocks
    if (r.state == RequestState::kSwappingOut && kv_.num_exclusive_blocks(*r.kv, Tier::kDevice) == 0) {
      move_paused(r, RequestState::kSwapped);
    } else if (r.state == RequestState::kSwappingIn && r.kv->host_blocks.empty()) {
      erase_from(swapping_in_, &r);
      r.transition(r.kv->num_tokens_to_recompute > 0 ? RequestState::kRecomputing : RequestState::kRunning);
      add_running(r);
    }
  }
  moved_.clear();
  report_kv_changes(out);

  for (RequestId id : result.finished) finish(id);
  for (auto& [id, reason] : pending_aborts_) {
    out.aborted.push_back(id);
    out.abort_reasons.push_back(std::move(reason));
  }
  pending_aborts_.clear();
  return out;
}

void Scheduler::store_computed_blocks(StepPlan& plan) {
  if (traits_->host_offload != HostOffload::kStoreOnCompute || to_store_.empty()) return;
  const BlockPool& device = kv_.pool(Tier::kDevice);
  // The stores are asynchronous in vLLM; here they ride in the step's swap-out budget, so the
  // forward hides them too. What does not fit waits for the next step, oldest first.
  int64_t budget = swap_budget_blocks(plan);
  size_t num_done = 0;
  for (; num_done < to_store_.size() && budget > 0; ++num_done) {
    auto [block, hash] = to_store_[num_done];
    if (!device.is_cached(block) || device.hash_of(block) != hash) continue;  // evicted meanwhile
    BlockCopy copy;
    StoreResult result = kv_.store_to_host(block, &copy);
    if (result == StoreResult::kNoRoom) break;  // the host holds only referenced blocks now
    if (result != StoreResult::kStored) continue;
    plan.swap_out.push_back(copy);
    ++totals_.num_stored_blocks;
    --budget;
  }
  to_store_.erase(to_store_.begin(), to_store_.begin() + static_cast<ptrdiff_t>(num_done));
  // A backlog longer than the device pool holds mostly evicted blocks: keep the newest.
  size_t limit = static_cast<size_t>(config_.num_device_blocks);
  if (to_store_.size() > limit) to_store_.erase(to_store_.begin(), to_store_.end() - static_cast<ptrdiff_t>(limit));
}

void Scheduler::update_allocation_rate(double now_s) {
  int64_t allocations = kv_.pool(Tier::kDevice).num_allocations();
  if (rate_updated_s_ < 0) {
    rate_updated_s_ = now_s;
    allocations_seen_ = allocations;
    return;
  }
  double elapsed_s = now_s - rate_updated_s_;
  if (elapsed_s <= 0) return;
  // An exponential average over about ten seconds of steps.
  constexpr double kWindowS = 10.0;
  double weight = 1 - std::exp(-elapsed_s / kWindowS);
  double rate = static_cast<double>(allocations - allocations_seen_) / elapsed_s;
  allocation_rate_blocks_per_s_ += weight * (rate - allocation_rate_blocks_per_s_);
  allocations_seen_ = allocations;
  rate_updated_s_ = now_s;
}

// ---- queries ------------------------------------------------------------------------------

int64_t Scheduler::num_running_tokens() const {
  int64_t num_tokens = 0;
  for (const Request* r : running_) num_tokens += r->kv->num_tokens;
  return num_tokens;
}

SchedulerStats Scheduler::stats() const {
  SchedulerStats s = totals_;
  s.num_waiting = static_cast<int32_t>(queue_.size());
  s.num_running = static_cast<int32_t>(running_.size());
  s.num_swapping_in = static_cast<int32_t>(swapping_in_.size());
  s.num_intercepted = static_cast<int32_t>(intercepted_.size());
  for (const Request* r : intercepted_) {
    if (!r->kv->host_blocks.empty()) ++s.num_swapped;
    else if (!r->kv->device_blocks.empty()) ++s.num_preserved;
    else ++s.num_discarded;
  }
  const BlockPool& device = kv_.pool(Tier::kDevice);
  const BlockPool& host = kv_.pool(Tier::kHost);
  s.num_free_device_blocks = device.num_free();
  s.num_free_host_blocks = host.num_free();
  s.num_cached_device_blocks = device.num_evictable();
  s.num_cached_host_blocks = host.num_evictable();
  s.num_device_evictions = device.num_evictions();
  s.num_host_evictions = host.num_evictions();
  return s;
}

void Scheduler::check_invariants() const {
  kv_.check_invariants();
  size_t num_computing = 0, num_swapping_in = 0, num_queued = 0, num_pending = 0;
  int32_t num_live = 0;
  for (const auto& [id, r] : requests_) {
    auto fail = [&](const std::string& what) {
      throw StateError("request " + std::to_string(id) + " (" + to_string(r.state) + "): " + what);
    };
    bool queued = queue_.count({r.priority_s, id}) != 0;
    bool should_queue = r.state == RequestState::kWaiting || (is_intercepted(r.state) && !r.tool_pending);
    if (queued != should_queue) fail(queued ? "is queued but should not be" : "is missing from the queue");
    if (r.tool_pending && (!is_intercepted(r.state) || r.intercepted_index < 0 ||
                           intercepted_[r.intercepted_index] != &r)) {
      fail("tool pending but not in the intercepted list");
    }
    const BlockTable& t = *r.kv;
    if ((is_computing(r.state) || r.state == RequestState::kPreserved) && !t.host_blocks.empty()) {
      fail("has host blocks");
    }
    if ((r.state == RequestState::kDiscarded || is_terminal(r.state) || r.state == RequestState::kWaiting) &&
        t.num_tokens != 0) {
      fail("holds KV it should have freed");
    }
    // Swapped: its exclusive blocks went out; a prefix shared with others may stay.
    if (r.state == RequestState::kSwapped && t.host_blocks.empty()) fail("swapped but holds nothing on the host");
    // Sharing is a prefix of every table: reference counts never rise along it.
    const BlockPool& device = kv_.pool(Tier::kDevice);
    for (size_t i = 1; i < t.device_blocks.size(); ++i) {
      if (device.ref_count(t.device_blocks[i]) > device.ref_count(t.device_blocks[i - 1])) {
        fail("device block " + std::to_string(t.device_blocks[i]) + " at " + std::to_string(i) + " has more owners (" +
             std::to_string(device.ref_count(t.device_blocks[i])) + ") than the block before it (" +
             std::to_string(device.ref_count(t.device_blocks[i - 1])) + ")");
      }
    }
    if (r.has_token_ids()) {
      if (r.tokens.num_tokens() != r.num_tokens()) fail("token ids disagree with the token counts");
      // The blocks it offered the cache hold its own content.
      for (int32_t i = 0; i < t.num_cached_blocks && i < static_cast<int32_t>(t.device_blocks.size()); ++i) {
        BlockId block = t.device_blocks[i];
        if (device.is_cached(block) && device.hash_of(block) != r.tokens.block_hashes()[i]) {
          fail("device block " + std::to_string(block) + " is cached under another content");
        }
      }
    }
    if (t.num_tokens > r.num_tokens()) fail("holds KV for more tokens than it has");
    num_computing += is_computing(r.state);
    num_swapping_in += r.state == RequestState::kSwappingIn;
    num_queued += should_queue;
    num_pending += r.tool_pending;
    num_live += !is_terminal(r.state);
  }
  if (intercepted_on_device_.size() != (intercepted_.size() + 63) / 64 || intercepted_kv_.size() != intercepted_.size()) {
    throw StateError("the intercepted list has " + std::to_string(intercepted_.size()) + " entries but " +
                     std::to_string(intercepted_kv_.size()) + " tables and " +
                     std::to_string(intercepted_on_device_.size()) + " words of device flags");
  }
  if (intercepted_.size() % 64 != 0 && intercepted_on_device_.back() >> (intercepted_.size() % 64) != 0) {
    throw StateError("device flags are set past the end of the intercepted list");
  }
  for (size_t i = 0; i < intercepted_.size(); ++i) {
    const Request& r = *intercepted_[i];
    if (intercepted_kv_[i] != r.kv) {
      throw StateError("request " + std::to_string(r.id) + " sits in the intercepted list beside another table");
    }
    const bool marked_on_device = (intercepted_on_device_[i / 64] >> (i % 64)) & 1;
    if (!marked_on_device && !r.kv->device_blocks.empty()) {
      throw StateError("request " + std::to_string(r.id) + " (" + to_string(r.state) + ") holds " +
                       std::to_string(r.kv->device_blocks.size()) +
                       " device blocks but is marked as holding none while paused");
    }
    if (!paused_moved_ && r.state != r.reported_state) {
      throw StateError("request " + std::to_string(r.id) + " moved to " + to_string(r.state) + " from " +
                       to_string(r.reported_state) + " without move_paused(): the change would go unreported");
    }
  }
  if (num_computing != running_.size() || num_swapping_in != swapping_in_.size() ||
      num_queued != queue_.size() || num_pending != intercepted_.size() || num_live != num_live_) {
    throw StateError("scheduler lists disagree with request states: running " + std::to_string(running_.size()) +
                     " vs " + std::to_string(num_computing) + ", swapping in " +
                     std::to_string(swapping_in_.size()) + " vs " + std::to_string(num_swapping_in) +
                     ", queued " + std::to_string(queue_.size()) + " vs " + std::to_string(num_queued) +
                     ", intercepted " + std::to_string(intercepted_.size()) + " vs " + std::to_string(num_pending));
  }
  // Preemption and swap-in order read these lists front to back: they stay sorted by key.
  auto check_sorted = [](const std::vector<Request*>& list, const char* name) {
    auto out_of_order = std::is_sorted_until(list.begin(), list.end(), priority_before);
    if (out_of_order != list.end()) {
      throw StateError(std::string("the ") + name + " list is out of priority order at request " +
                       std::to_string((*out_of_order)->id));
    }
  };
  check_sorted(running_, "running");
  check_sorted(swapping_in_, "swapping-in");
}

}  // namespace infercept
