#pragma once
// The iteration-level scheduler: which requests compute how many tokens, which paused contexts
// are preserved, swapped or discarded, and which resume. Bookkeeping over block ids only: no
// tensors, no clock (time is an argument), so it runs the same under a real executor and the
// simulator.
#include <cstdint>
#include <memory>
#include <set>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "infercept/cost_model.h"
#include "infercept/kv_cache_manager.h"
#include "infercept/output_lengths.h"
#include "infercept/request.h"
#include "infercept/step.h"
#include "infercept/tool_durations.h"
#include "infercept/types.h"
#include "infercept/waste_ledger.h"

namespace infercept {

struct SchedulerConfig {
  Policy policy = Policy::kInfercept;
  int32_t block_size = 16;
  int32_t num_device_blocks = 0;
  int32_t num_host_blocks = 0;
  int32_t max_batched_tokens = 512;   // S: tokens per iteration, decodes and chunks together
  int32_t max_running_requests = 256;
  /// Largest context a request may reach (the model's window); 0 means only the pool limits it.
  int32_t max_context_tokens = 0;
  /// Keep full blocks' KV findable by content after their owners let go (the prefix cache).
  /// Off under vllm-0.2 whatever this says: that release had no prefix cache.
  bool enable_prefix_caching = true;
  /// Token ids must lie in [0, vocab_size); 0 leaves them unchecked.
  int32_t vocab_size = 0;
  /// Fill StepPlan::batch, the forward's flat inputs. The simulator, which runs no forward,
  /// turns it off (that work grows with batch x context and would dominate its step).
  bool build_batch = true;
  /// min-waste charges a preserved context only for memory someone wants before its tool
  /// returns (admission blocked, or the allocation rate over the intercept exceeding the free
  /// capacity). Off: the paper's rule, every paused byte counts as wasted.
  bool demand_aware_preserve = true;
  /// Ranking of the queue (and of who is preempted first) by predicted remaining work, as
  /// LAMPS does: a request's key is its FCFS key plus this many seconds per predicted remaining
  /// output token (set_predicted_output_tokens), so shorter work goes first and a long one is
  /// still served once newer arrivals' keys pass its own (no starvation). 0: plain FCFS, the
  /// paper's order. Requests with no prediction keep their FCFS key.
  double rank_s_per_predicted_token = 0;
  /// When ranking, a request whose caller gave no prediction for its current turn is keyed by
  /// the core's own (OutputLengths): what finished programs of its class generated from the
  /// same turn on. Set at its arrival and at every tool return; a caller's
  /// set_predicted_output_tokens for that turn wins. Off: only callers' predictions rank, and
  /// nothing is learned (no per-turn bookkeeping).
  bool learn_output_lengths = false;

  /// Throws InvalidArgumentError naming the first bad field.
  void validate() const;
};

/// Counts by state, for metrics and logs.
struct SchedulerStats {
  int32_t num_waiting = 0;         // queued: new, or resumable and not yet admitted
  int32_t num_running = 0;         // running or recomputing
  int32_t num_swapping_in = 0;
  int32_t num_intercepted = 0;     // tool pending
  int32_t num_preserved = 0;       // tool pending, KV wholly on the device
  int32_t num_swapped = 0;         // KV wholly or partly on the host
  int32_t num_discarded = 0;       // tool pending, KV freed
  int32_t num_finished = 0;
  int32_t num_aborted = 0;
  int32_t num_free_device_blocks = 0;
  int32_t num_free_host_blocks = 0;
  int64_t num_swap_out_blocks = 0;  // cumulative
  int64_t num_swap_in_blocks = 0;   // cumulative
  int64_t num_recomputed_tokens = 0;  // cumulative
  int64_t num_preemptions = 0;        // cumulative
  // The prefix cache (cumulative, in tokens, counted at admission) and what it holds now.
  int64_t prefix_cache_queries = 0;     // tokens of admitted requests' contexts looked up
  int64_t prefix_cache_hits = 0;        // of them, tokens whose KV was found
  int64_t prefix_cache_host_hits = 0;   // of the hits, tokens found on the host (swapped in)
  int32_t num_cached_device_blocks = 0; // unreferenced but cached: free capacity, evictable
  int32_t num_cached_host_blocks = 0;
  int64_t num_device_evictions = 0;     // cumulative
  int64_t num_host_evictions = 0;
  int64_t num_stored_blocks = 0;        // cumulative: of num_swap_out_blocks, host offload stores
};

/// One tool call to pause for: intercept()'s arguments, queued by the engine loop and sent
/// with the step's others in one call (intercept_batch).
struct InterceptEvent {
  RequestId request = 0;
  double now_s = 0;
  double expected_duration_s = -1;  // < 0: unknown
  std::string tool_name;
};

/// One tool return: resume()'s arguments, sent with the step's others in one call
/// (resume_batch). A request with token ids gives `tool_token_ids`; a counts-only one gives
/// `num_tool_tokens` (>= 0) instead.
struct ResumeEvent {
  RequestId request = 0;
  double now_s = 0;
  std::vector<TokenId> tool_token_ids;
  int32_t num_tool_tokens = -1;  // >= 0: counts only
  int32_t num_replaced_tokens = 0;
};

class Scheduler {
 public:
  Scheduler(const SchedulerConfig& config, const CostModel& cost);

  /// Queues a new request and returns its id. `generated_token_limit` > 0 makes update()
  /// report the request when it has generated that many tokens. Its blocks are found by, and
  /// reuse, the prefix cache of the same `cache_salt` ("" is shared by every unsalted request).
  /// With `skip_reading_prefix_cache` it finds no cached prefix until it has sampled once (its
  /// own blocks are still cached for others): prompt logprobs need every prompt position.
  RequestId add_request(const std::vector<TokenId>& prompt_token_ids, double arrival_s,
                        int32_t generated_token_limit = 0, const std::string& cache_salt = "",
                        bool skip_reading_prefix_cache = false);
  /// Counts only, no token ids (the simulator): the request never touches the prefix cache.
  RequestId add_request(int32_t num_prompt_tokens, double arrival_s, int32_t generated_token_limit = 0);

  /// Pauses a running request that has just sampled (it called a tool). The policy decides what
  /// happens to its KV. `expected_duration_s` < 0 means unknown: the scheduler then estimates
  /// the intercept from the time already elapsed. `tool_name` says which tool runs ("" when
  /// the caller does not know): resume() records the duration under it, and the continuum
  /// policy picks its TTL from that tool's observed durations. Returns the state the policy
  /// put the request in (later moves come in StepOutput::kv_changes).
  RequestState intercept(RequestId request, double now_s, double expected_duration_s = -1,
                         const std::string& tool_name = "");

  /// The tool returned `tool_token_ids`: queue the request to resume. The last
  /// `num_replaced_tokens` tokens (not yet computed: the one just sampled, re-tokenized by the
  /// caller) are dropped first and their replacement leads `tool_token_ids`.
  void resume(RequestId request, const std::vector<TokenId>& tool_token_ids, double now_s,
              int32_t num_replaced_tokens = 0);
  /// Counts only, for a counts-only request.
  void resume(RequestId request, int32_t num_tool_tokens, double now_s);

  /// intercept() for each event in order, all or nothing: every event is checked first (a
  /// running request that has just sampled, named once), and a bad one throws before any
  /// applies. Returns each request's state, in event order.
  std::vector<RequestState> intercept_batch(const std::vector<InterceptEvent>& events);

  /// resume() for each event in order. One that fails does not stop the rest: its error message
  /// is returned at its index ("" for the ones that resumed). A resume over the context limit
  /// or the device pool has aborted its request, as resume() does.
  std::vector<std::string> resume_batch(const std::vector<ResumeEvent>& events);

  /// Updates the caller's estimate of an ongoing intercept (e.g. a learned tool duration).
  void set_expected_duration(RequestId request, double expected_duration_s);

  void set_generated_token_limit(RequestId request, int32_t generated_token_limit);

  /// The caller's prediction of the output tokens the request has still to generate, over all
  /// its remaining turns (a learned output-length predictor's, LAMPS's). Re-ranks the request
  /// when SchedulerConfig::rank_s_per_predicted_token is set; < 0 withdraws the prediction.
  void set_predicted_output_tokens(RequestId request, int32_t num_tokens);

  /// Ends a request normally and frees its blocks.
  void finish(RequestId request);

  /// Ends a request in any live state and frees its blocks.
  void abort(RequestId request);

  /// Drops a finished or aborted request's record.
  void remove(RequestId request);

  /// Plans one iteration at time `now_s`. The previous plan must have been applied by
  /// update() (an empty one too: planning may have moved blocks without a copy, or given up
  /// on a request); StateError otherwise.
  StepPlan schedule(double now_s);
  /// schedule() into `plan`, a plan the caller has applied (or a new one) and hands back:
  /// it is cleared but its arrays keep their capacity, so a C++ caller's steady state does not
  /// allocate the step's arrays again. (Python's plans own numpy views of their arrays, so
  /// the binding always makes a new one.)
  void schedule_into(double now_s, StepPlan& plan);

  /// Applies a finished iteration: commits copies and tokens, accounts waste.
  StepOutput update(const StepPlan& plan, const StepResult& result, double now_s);

  const Request& request(RequestId request) const;
  bool contains(RequestId request) const { return requests_.count(request) != 0; }
  SchedulerStats stats() const;
  const WasteLedger& ledger() const { return ledger_; }
  const KvCacheManager& kv() const { return kv_; }
  const SchedulerConfig& config() const { return config_; }
  /// The row of the policy table the scheduler runs under.
  const PolicyTraits& policy_traits() const { return *traits_; }
  /// Durations of the intercepts that have resumed, per tool.
  const ToolDurations& tool_durations() const { return tool_durations_; }
  /// Output per turn of the programs that have finished, per class (learn_output_lengths).
  const OutputLengths& output_lengths() const { return output_lengths_; }
  /// Mean wait (EMA) from resume to admission of resumed requests that held no KV then.
  double resume_wait_s() const { return resume_wait_s_; }
  const CostModel& cost() const { return cost_; }
  /// Live requests (not finished or aborted).
  int32_t num_live_requests() const { return num_live_; }
  /// Device tokens held by requests in the batch (C_other + the batch's own in eq. 1-4).
  int64_t num_running_tokens() const;

  /// Expected remaining intercept time of a paused request (DESIGN.md §2): the caller's hint
  /// minus the time elapsed while the hint lasts, else the time elapsed so far.
  double remaining_intercept_s(const Request& request, double now_s) const;

  /// Throws BlockError or StateError unless blocks are conserved and every request sits in
  /// exactly the queues its state says.
  void check_invariants() const;

 private:
  Request& get(RequestId request);
  Request* find_request(RequestId request);  // nullptr when unknown (removed)
  void enqueue(Request& r);
  /// The queue key `r` gets from its FCFS key and predicted work (rank_s_per_predicted_token).
  double ranked_priority(const Request& r) const;
  /// Sets r's prediction and re-keys it wherever it is held in priority order.
  void set_prediction(Request& r, int32_t num_tokens);
  /// learn_output_lengths: r's prediction for its current turn from output_lengths_, unless
  /// the caller gave one for this turn.
  void predict_from_history(Request& r);
  RequestId add_counted(int32_t num_prompt_tokens, double arrival_s, int32_t generated_token_limit);
  void dequeue(Request& r);
  void add_running(Request& r);
  void remove_running(Request& r);
  void add_intercepted(Request& r);
  void remove_intercepted(Request& r);
  // Calls f(Request&) for each paused context (tool pending) that holds device blocks, in
  // intercepted_ order: the passes of account_time, decide_intercepted and reclaim. Walks the
  // set bits of intercepted_on_device_ (most paused contexts hold none) and looks at the table
  // through intercepted_kv_, so an entry whose device part has gone costs no Request load.
  template <class F>
  void for_each_paused_on_device(F&& f) {
    for (size_t word = 0; word < intercepted_on_device_.size(); ++word) {
      for (uint64_t bits = intercepted_on_device_[word]; bits != 0; bits &= bits - 1) {
        const size_t i = word * 64 + static_cast<size_t>(__builtin_ctzll(bits));
        if (intercepted_kv_[i]->device_blocks.empty()) {
          intercepted_on_device_[word] &= ~(uint64_t{1} << (i % 64));
          continue;
        }
        f(*intercepted_[i]);
      }
    }
  }
  // r.transition(to) for a paused or resuming request's KV move; report_kv_changes() looks
  // for what changed only after one of these.
  void move_paused(Request& r, RequestState to) {
    r.transition(to);
    paused_moved_ = true;
  }
  void release(Request& r, RequestState terminal);
  void discard(Request& r, StepPlan* plan);
  // The request, which must be paused on a tool (StateError otherwise).
  Request& paused_on_tool(RequestId request);
  // resume()'s common part: the context grew by `num_tool_tokens` (net of replaced ones).
  void requeue_after_tool(Request& r, int32_t num_tool_tokens, double now_s);
  bool caching() const { return config_.enable_prefix_caching && traits_->uses_prefix_cache; }
  void check_token_ids(const std::vector<TokenId>& token_ids, const char* what) const;
  // When a context that lets its blocks go expects them back (< 0: unknown).
  double expected_next_use_s(const Request& r, double now_s) const;
  // Admission: takes the longest cached prefix when the request can then start this step
  // beside the `num_reserved_blocks` that skipped swapped heads hold back.
  void reuse_cached_prefix(Request& r, int32_t token_budget, int64_t swap_in_budget_blocks,
                           int64_t num_reserved_blocks);
  void count_lookup(Request& r);
  // Leaves the queue for the batch or a swap-in: counts the lookup and the resumed turn's wait.
  void leave_queue(Request& r, double now_s);
  // Exclusive device tokens of a paused context: what preserving it holds back from others.
  // `num_exclusive`: its exclusive device blocks (KvCacheManager::num_exclusive_blocks).
  int64_t num_exclusive_device_tokens(const Request& r, int32_t num_exclusive) const {
    int32_t num_shared = static_cast<int32_t>(r.kv->device_blocks.size()) - num_exclusive;
    int64_t tokens = r.kv->num_device_tokens(config_.block_size) - static_cast<int64_t>(num_shared) * config_.block_size;
    return tokens > 0 ? tokens : 0;
  }
  // Of a context's tokens, those a discard is expected to make us recompute (eq. 1/4's C).
  int64_t expected_recompute_tokens(const Request& r, int32_t num_exclusive, double remaining_s) const;

  // schedule() phases, in order.
  void schedule_running(StepPlan& plan, int32_t& token_budget);
  void schedule_swapping_in(StepPlan& plan, int64_t& swap_in_budget_blocks);
  void admit_queued(StepPlan& plan, int32_t& token_budget, int64_t& swap_in_budget_blocks);
  void store_computed_blocks(StepPlan& plan);  // host offload (HostOffload::kStoreOnCompute)
  void decide_intercepted(StepPlan& plan);  // intercept_policy.cpp: the policies' choices
  // intercept_policy.cpp, continuum: the TTL to pin `r` for (0: do not pin) and the expiry.
  double pin_ttl_s(const Request& r) const;
  void expire_pins(StepPlan& plan);
  // Seconds to recompute `num_tokens` in chunks of the token budget (the cost model's T_fwd,
  // plus each chunk's attention over the context rebuilt so far).
  double recompute_time_s(int64_t num_tokens) const;

  void add_chunk(Request& r, int32_t num_new_tokens, StepPlan& plan);
  // Fills plan.batch from plan.scheduled and the block tables (step_batch.cpp); only the
  // per-request arrays unless config_.build_batch.
  void build_batch(StepPlan& plan) const;
  // Paused requests whose state differs from what the caller last heard (step_batch.cpp).
  void report_kv_changes(StepOutput& out);
  // Frees device blocks for `needed` (evicting idle paused contexts, then preempting running
  // requests below `r` in priority). Returns false when `r` must wait.
  bool make_room(Request& r, int32_t needed, StepPlan& plan);
  // Frees one paused context's device blocks (never `keep`'s) toward `num_blocks_short`, the
  // blocks the caller lacks: evict_under_pressure() on the victim; false when none is left.
  bool reclaim_intercepted(StepPlan& plan, const Request* keep, int32_t num_blocks_short);
  // evict() for every policy but min-waste, which takes evict_by_waste().
  void evict_under_pressure(Request& victim, StepPlan& plan, int32_t num_blocks_short);
  // min-waste under memory pressure: frees the `num_blocks_short` blocks a step lacks by the
  // cheapest of the waste equations (intercept_policy.cpp): the tail swapped out within the
  // step's budget N_i, beyond it (the batch stalls on the rest, eq. 3), or the context
  // discarded (eq. 4, its expected recompute).
  void evict_by_waste(Request& victim, StepPlan& plan, int32_t num_blocks_short);
  // Swaps the last `num_blocks` of `victim`'s exclusive device blocks (fewer if the host is
  // short) out in this step.
  void swap_out_tail(Request& victim, int32_t num_blocks, StepPlan& plan);
  void preempt(Request& victim, StepPlan& plan);
  // swap and infercept: moves all of `victim`'s device blocks to the host in this step if the
  // host pool has room; false (nothing done) otherwise.
  bool swap_out_whole(Request& victim, StepPlan& plan);
  // Frees `victim`'s device blocks: swap_out_whole() if it can, else discards the context.
  void evict(Request& victim, StepPlan& plan);
  // N_i in blocks for the batch planned so far (at least one block, so swaps always progress).
  int64_t swap_budget_blocks(const StepPlan& plan) const;
  int32_t num_blocks(int64_t num_tokens) const;
  // waste accounting (waste_accounting.cpp)
  void account_time(double now_s);
  void update_allocation_rate(double now_s);
  void account_step(const StepPlan& plan, const StepResult& result);

  SchedulerConfig config_;
  const PolicyTraits* traits_;
  CostModel cost_;
  KvCacheManager kv_;
  std::unordered_map<RequestId, Request> requests_;  // node-based: Request* stay valid
  RequestId next_id_ = 0;
  int64_t step_id_ = 0;
  int64_t updated_step_id_ = 0;  // the last step update() applied: schedule() needs == step_id_
  int32_t num_live_ = 0;

  std::vector<Request*> running_;        // running and recomputing, by priority
  std::vector<Request*> swapping_in_;    // admitted, KV coming back, by priority
  std::set<std::pair<double, RequestId>> queue_;  // (priority_s, id): new and resumable
  std::vector<Request*> intercepted_;    // tool pending, any KV location; unordered
  std::vector<BlockTable*> intercepted_kv_;  // [intercepted_.size()]: each entry's r->kv
  // Bit i of word i / 64 (ceil(intercepted_.size() / 64) words; bits past the end are 0):
  // clear once that context's device part is known to be empty. A paused context never
  // regains device blocks while its tool runs (swap-ins, prefix adoption and appends are for
  // queued and running requests), so the per-step passes over paused contexts skip those
  // entries without loading their records.
  std::vector<uint64_t> intercepted_on_device_;
  // A paused request changed state (move_paused) since report_kv_changes() last looked.
  bool paused_moved_ = false;
  std::vector<std::pair<RequestId, int32_t>> moved_;  // blocks each request copies this step
  // The records of the last plan's scheduled requests, in plan order (add_chunk() fills it),
  // so build_batch() and update() need no lookup by id. update() trusts an entry only while
  // no request has been removed since (remove() bumps num_removed_) and its id matches.
  std::vector<Request*> scheduled_requests_;
  int64_t num_removed_ = 0;
  int64_t num_removed_at_schedule_ = 0;
  std::vector<std::pair<RequestId, std::string>> pending_aborts_;  // reported by update()
  SchedulerStats totals_;                // cumulative counters only
  // Device blocks allocated per second (EMA): the demand that evicts discarded contexts.
  double allocation_rate_blocks_per_s_ = 0;
  int64_t allocations_seen_ = 0;
  double rate_updated_s_ = -1;
  // Admission stopped this step for want of device blocks: memory is under pressure now.
  bool memory_blocked_ = false;
  WasteLedger ledger_;
  ToolDurations tool_durations_;
  OutputLengths output_lengths_;
  double resume_wait_s_ = 0;
  // Host offload: device blocks computed and cached, in order, with their content key, that
  // are still to be stored to the host (within each step's swap budget).
  std::vector<std::pair<BlockId, BlockHash>> to_store_;
};

}  // namespace infercept
