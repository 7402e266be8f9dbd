// infercept._core: the native engine core as a Python module. Declarations only: every check
// lives in the core, whose typed errors map to the exceptions registered here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bindings.h"

#include "infercept/block_pool.h"
#include "infercept/cost_model.h"
#include "infercept/errors.h"
#include "infercept/kv_cache_manager.h"
#include "infercept/request.h"
#include "infercept/scheduler.h"
#include "infercept/step.h"
#include "infercept/waste_model.h"

#ifdef INFERCEPT_WITH_CUDA
#include "device_info.h"
#endif

namespace py = pybind11;
using namespace infercept;

namespace {

// The batch calls take parallel lists; a length that differs from the ids' names the list.
void check_same_length(const char* call, size_t num_ids, std::initializer_list<size_t> lengths) {
  for (size_t n : lengths) {
    if (n != num_ids) {
      throw InvalidArgumentError(std::string(call) + ": every list must have one entry per request id (" +
                                 std::to_string(num_ids) + "), got one of " + std::to_string(n));
    }
  }
}

void bind_errors(py::module_& m) {
  auto base = py::register_exception<Error>(m, "InferceptError", PyExc_RuntimeError);
  py::register_exception<OutOfBlocksError>(m, "OutOfBlocksError", base.ptr());
  py::register_exception<BlockError>(m, "BlockError", base.ptr());
  py::register_exception<StateError>(m, "StateError", base.ptr());
  py::register_exception<UnknownRequestError>(m, "UnknownRequestError", base.ptr());
  py::register_exception<InvalidArgumentError>(m, "InvalidArgumentError", PyExc_ValueError);
}

void bind_enums(py::module_& m) {
  py::enum_<Tier>(m, "Tier", "Where a KV block lives: the device pool or the host (swap) pool.").value("DEVICE", Tier::kDevice).value("HOST", Tier::kHost);
  py::enum_<Policy>(m, "Policy", "An intercept policy: one row of the core's policy table (docs/baselines.md).")
      .value("VLLM_0_2", Policy::kVllm02)
      .value("DISCARD", Policy::kDiscard)
      .value("PRESERVE", Policy::kPreserve)
      .value("SWAP", Policy::kSwap)
      .value("INFERCEPT", Policy::kInfercept)
      .value("VLLM_V1", Policy::kVllmV1)
      .value("VLLM_V1_OFFLOAD", Policy::kVllmV1Offload)
      .value("CONTINUUM", Policy::kContinuum)
      .def_static("parse", &parse_policy, py::arg("name"),
           "The policy named `name` (its label, e.g. 'infercept'); ValueError naming the known ones otherwise.")
      .def_static("all", &all_policies,
           "Every policy, in the table's order.")
      .def_property_readonly("label", [](Policy p) { return to_string(p); },
           "The policy's name as the CLI and the results spell it.")
      .def_property_readonly("swaps", [](Policy p) { return traits(p).swaps; },
           "Whether the policy moves paused KV to the host pool.")
      .def_property_readonly("uses_prefix_cache", [](Policy p) { return traits(p).uses_prefix_cache; },
           "Whether the policy finds and keeps KV by content (the prefix cache).");
  py::enum_<RequestState>(m, "RequestState",
                              "Where a request is in its life: waiting -> running -> finished; running -> "
                              "intercepted {preserved, swapping_out, swapped, discarded} -> resuming "
                              "{swapping_in, recomputing} -> running; any live state -> aborted.")
      .value("WAITING", RequestState::kWaiting)
      .value("RUNNING", RequestState::kRunning)
      .value("PRESERVED", RequestState::kPreserved)
      .value("SWAPPING_OUT", RequestState::kSwappingOut)
      .value("SWAPPED", RequestState::kSwapped)
      .value("DISCARDED", RequestState::kDiscarded)
      .value("SWAPPING_IN", RequestState::kSwappingIn)
      .value("RECOMPUTING", RequestState::kRecomputing)
      .value("FINISHED", RequestState::kFinished)
      .value("ABORTED", RequestState::kAborted)
      .def_property_readonly("label", [](RequestState s) { return to_string(s); },
           "The state's name in lower case ('preserved', 'swapping_out', ...).");
  m.def("can_transition", &can_transition, py::arg("src"), py::arg("dst"),
           "Whether a request may move from state `src` to `dst`.");
}

void bind_memory(py::module_& m) {
  py::class_<BlockPool>(m, "BlockPool",
                         "Hands out block ids [0, num_blocks) of one tier. Misuse (freeing a free block, an id out "
                         "of range, allocating from an empty pool) raises BlockError or OutOfBlocksError and leaves "
                         "the pool unchanged.")
      .def(py::init<Tier, int32_t, int32_t>(), py::arg("tier"), py::arg("num_blocks"), py::arg("block_size") = 16,
           "`block_size`: tokens per block, what a cached block's content is compared over.")
      .def("allocate", py::overload_cast<>(&BlockPool::allocate),
           "Takes one block with reference count 1: a free one, else the next evictable one (which then leaves the cache).")
      .def("allocate_many", py::overload_cast<int32_t>(&BlockPool::allocate), py::arg("num_blocks"),
           "Takes `num_blocks` blocks, all or none.")
      .def("retain", &BlockPool::retain, py::arg("block"),
           "Adds a reference (another owner, or a cache hit that revives an evictable block).")
      .def("free", py::overload_cast<BlockId>(&BlockPool::free), py::arg("block"),
           "Drops one reference. At zero a cached block becomes evictable; any other block is free.")
      .def("is_cached", &BlockPool::is_cached, py::arg("block"),
           "Whether the block's content is registered in the prefix cache.")
      .def("is_evictable", &BlockPool::is_evictable, py::arg("block"),
           "Whether the block is cached with no reference (free capacity the cache may give up).")
      .def_property_readonly("num_evictable", &BlockPool::num_evictable,
           "Cached blocks with no reference.")
      .def_property_readonly("num_cached", &BlockPool::num_cached,
           "Blocks whose content is registered in the prefix cache.")
      .def_property_readonly("num_evictions", &BlockPool::num_evictions,
           "Cached blocks given up for an allocation so far.")
      .def("can_allocate", &BlockPool::can_allocate, py::arg("num_blocks"),
           "Whether `num_blocks` blocks fit in the free capacity (free plus evictable).")
      .def("ref_count", &BlockPool::ref_count, py::arg("block"),
           "The block's owners (0: free or evictable).")
      .def_property_readonly("num_blocks", &BlockPool::num_blocks,
           "The pool's size.")
      .def_property_readonly("num_free", &BlockPool::num_free,
           "Free capacity: truly free blocks plus evictable cached ones.")
      .def_property_readonly("num_used", &BlockPool::num_used,
           "Blocks with at least one reference.")
      .def_property_readonly("tier", &BlockPool::tier,
           "The pool's tier.")
      .def("check_invariants", &BlockPool::check_invariants,
           "Raises BlockError unless every unreferenced block is free or evictable (once), evictable iff cached, and the key index matches the blocks' content.");

  py::class_<BlockCopy>(m, "BlockCopy", "One block copy of a swap: (src, dst) block ids, device to host or host to device.")
      .def(py::init<BlockId, BlockId>(), py::arg("src"), py::arg("dst"))
      .def_readonly("src", &BlockCopy::src)
      .def_readonly("dst", &BlockCopy::dst)
      .def("__repr__", [](const BlockCopy& c) {
        return "BlockCopy(src=" + std::to_string(c.src) + ", dst=" + std::to_string(c.dst) + ")";
      });

  py::class_<BlockTable>(m, "BlockTable", "A request's KV blocks on each tier and how many tokens they hold.")
      .def_readonly("device_blocks", &BlockTable::device_blocks)
      .def_readonly("host_blocks", &BlockTable::host_blocks)
      .def_readonly("num_tokens", &BlockTable::num_tokens,
           "Tokens whose KV exists (device or host).")
      .def_readonly("num_tokens_to_recompute", &BlockTable::num_tokens_to_recompute,
           "Of the tokens to compute, those computed before (a discarded context's).");

  m.def("hash_salt", &hash_salt, py::arg("salt"), "The root key of a prefix-cache hash chain for `salt`.");
  m.def(
      "hash_block",
      [](BlockHash parent, const std::vector<TokenId>& tokens) {
        return hash_block(parent, tokens.data(), static_cast<int32_t>(tokens.size()));
      },
      py::arg("parent"), py::arg("token_ids"), "The key of a full block chained from `parent`.");
}

void bind_cost(py::module_& m) {
  py::class_<AffineFit>(m, "AffineFit", "seconds = intercept_s + slope_s_per_token * num_tokens, fitted by least squares.")
      .def(py::init<>())
      .def_readwrite("intercept_s", &AffineFit::intercept_s)
      .def_readwrite("slope_s_per_token", &AffineFit::slope_s_per_token)
      .def_readonly("samples", &AffineFit::samples)
      .def("__call__", &AffineFit::operator(), py::arg("num_tokens"),
           "Seconds for `num_tokens` tokens.")
      .def_static("fit", &AffineFit::fit, py::arg("samples"),
           "Least-squares line through (num_tokens, seconds) samples; needs two distinct token counts.");

  py::class_<CostModel>(m, "CostModel", "T_fwd, T_swap and the memory facts the scheduler needs, for one model on one machine.")
      .def(py::init<>())
      .def_readwrite("name", &CostModel::name)
      .def_readwrite("source", &CostModel::source)
      .def_readwrite("forward", &CostModel::forward,
           "T_fwd's affine fit (used when fewer than two forward_points).")
      .def_property(
          "forward_points", [](const CostModel& c) { return c.forward_points; },
          [](CostModel& c, const std::vector<std::pair<double, double>>& points) {
            CostModel::check_forward_points(points);
            c.forward_points = points;
          },
          "Measured T_fwd (num_batched_tokens, seconds), attention removed, ascending; with two or more, "
          "forward_time_s interpolates them instead of using the affine fit.")
      .def_readwrite("swap", &CostModel::swap,
           "T_swap's affine fit over the tokens copied in one direction.")
      .def_readwrite("kv_bytes_per_token", &CostModel::kv_bytes_per_token,
           "M: KV bytes of one token, all layers.")
      .def_readwrite("saturation_tokens", &CostModel::saturation_tokens,
           "S: batched tokens past which a forward is compute-bound (the token budget).")
      .def_readwrite("kv_capacity_tokens", &CostModel::kv_capacity_tokens,
           "Tokens of KV the device pool holds.")
      .def_readwrite("attention_s_per_context_token", &CostModel::attention_s_per_context_token,
           "Seconds per context token the batch attends to (reading its KV); 0 in the paper's model.")
      .def("forward_time_s", &CostModel::forward_time_s, py::arg("num_tokens"),
           "T_fwd of `num_tokens` batched tokens, attention term excluded.")
      .def("step_time_s", &CostModel::step_time_s, py::arg("num_tokens"), py::arg("num_context_tokens"),
           "T_fwd of a step that computes `num_tokens` and attends over `num_context_tokens` in all.")
      .def("swap_time_s", &CostModel::swap_time_s, py::arg("num_tokens"),
           "T_swap of `num_tokens` tokens' KV in one direction.")
      .def("swap_budget_tokens", &CostModel::swap_budget_tokens, py::arg("num_batched_tokens"),
           py::arg("num_context_tokens") = 0,
           "N_i with T_swap(N_i) = T_fwd(B_i): tokens one iteration of B_i tokens can hide a copy behind.")
      .def("to_json", &CostModel::to_json,
           "The profile as JSON (what from_json and load read).")
      .def_static("from_json", &CostModel::from_json, py::arg("text"),
           "Parses a profile; raises InvalidArgumentError naming the missing or bad field.")
      .def("save", &CostModel::save, py::arg("path"),
           "Writes to_json() to `path`.")
      .def_static("load", &CostModel::load, py::arg("path"),
           "from_json of the file at `path`.")
      .def_static("builtin", &CostModel::builtin, py::arg("name"),
           "A profile built from the InferCept paper's constants; `name` is one of builtin_names() (a '+attn' suffix adds an attention term).")
      .def_static("builtin_names", &CostModel::builtin_names,
           "The names builtin() takes.");

  m.def("discard_waste", &discard_waste, py::arg("cost"), py::arg("context_tokens"), py::arg("other_tokens"),
           "Equation 1, byte-seconds: T_fwd(C)*C*M + T_fwd(C)*C_other*M (recompute in one go, and everyone held up by it).");
  m.def("preserve_waste", &preserve_waste, py::arg("cost"), py::arg("context_tokens"), py::arg("intercept_s"),
           "Equation 2, byte-seconds: T_INT*C*M (the context held idle on the device for the intercept).");
  m.def("swap_waste", &swap_waste, py::arg("cost"), py::arg("context_tokens"), py::arg("batch_tokens"),
           "Equation 3, byte-seconds: 2*T_swap(C)*C_batch*M (the batch stalled while the context goes out and back).");
  m.def("chunked_discard_waste", &chunked_discard_waste, py::arg("cost"), py::arg("context_tokens"),
        py::arg("other_tokens"), py::arg("num_chunks"),
           "Equation 4, byte-seconds: T_fwd(C)*C*M/2 + n*T_fwd(C/n)*C_other*M (recompute in n chunks).");

  py::class_<WasteCounters>(m, "WasteCounters", "Wasted device memory-time by cause, byte-seconds.")
      .def_readonly("preserved_idle_byte_s", &WasteCounters::preserved_idle_byte_s)
      .def_readonly("recompute_byte_s", &WasteCounters::recompute_byte_s)
      .def_readonly("swap_stall_byte_s", &WasteCounters::swap_stall_byte_s)
      .def_property_readonly("total_byte_s", &WasteCounters::total_byte_s);
  py::class_<WasteLedger>(m, "WasteLedger", "The run's waste by cause and the device capacity over the same time (DESIGN.md waste model).")
      .def_readonly("waste", &WasteLedger::waste)
      .def_readonly("capacity_byte_s", &WasteLedger::capacity_byte_s)
      .def_property_readonly("waste_fraction", &WasteLedger::waste_fraction)
      .def(
          "as_dict",
          [](const WasteLedger& l) {
            py::dict d;
            d["preserved_idle_byte_s"] = l.waste.preserved_idle_byte_s;
            d["recompute_byte_s"] = l.waste.recompute_byte_s;
            d["swap_stall_byte_s"] = l.waste.swap_stall_byte_s;
            d["total_byte_s"] = l.waste.total_byte_s();
            d["capacity_byte_s"] = l.capacity_byte_s;
            return d;
          },
          "Byte-seconds per cause, their total, and the capacity (device bytes x time)")
      .def(
          "fractions",
          [](const WasteLedger& l) {
            // Each cause over the capacity: the one place these fractions are computed.
            auto of = [&](double byte_s) { return l.capacity_byte_s > 0 ? byte_s / l.capacity_byte_s : 0.0; };
            py::dict d;
            d["waste_fraction"] = of(l.waste.total_byte_s());
            d["preserve_waste_fraction"] = of(l.waste.preserved_idle_byte_s);
            d["recompute_waste_fraction"] = of(l.waste.recompute_byte_s);
            d["swap_waste_fraction"] = of(l.waste.swap_stall_byte_s);
            return d;
          },
          "Wasted device memory-time over the total, overall and per cause (0 before any time passed)");
}

void bind_scheduler(py::module_& m) {
  py::class_<Request>(m, "Request",
                       "Bookkeeping for one request (a copy). Tokens: prompt + generated + tool-returned = num_tokens; "
                       "the KV of num_computed_tokens of them exists (device or host).")
      .def_readonly("id", &Request::id)
      .def_readonly("state", &Request::state)
      .def_readonly("arrival_s", &Request::arrival_s,
           "Original arrival: the FCFS key, unless the policy requeues as new.")
      .def_readonly("priority_s", &Request::priority_s,
           "Queue key: arrival_s, or the resume time (policies that queue a resume as a new arrival).")
      .def_readonly("num_prompt_tokens", &Request::num_prompt_tokens)
      .def_readonly("num_generated_tokens", &Request::num_generated_tokens)
      .def_readonly("num_tool_tokens", &Request::num_tool_tokens)
      .def_readonly("generated_token_limit", &Request::generated_token_limit,
           "update() reports the request once num_generated_tokens reaches this (0: never).")
      .def_readonly("tool_pending", &Request::tool_pending,
           "Intercepted, and its tool has not returned.")
      .def_readonly("expected_duration_s", &Request::expected_duration_s,
           "The caller's estimate of the intercept; < 0 when unknown.")
      .def_readonly("num_intercepts", &Request::num_intercepts)
      .def_readonly("predicted_output_tokens", &Request::predicted_output_tokens,
           "The prediction of what is left to generate over its remaining turns, the caller's or learned (< 0: none).")
      .def_readonly("program_class", &Request::program_class,
           "The output-length predictor's key: the hash of the prompt's first blocks (0: counts only, or no full block).")
      .def_readonly("pin_until_s", &Request::pin_until_s,
           "continuum: the pinned KV is released then (< 0: not pinned).")
      .def_readonly("num_preemptions", &Request::num_preemptions)
      .def_readonly("waste", &Request::waste,
           "Device memory-time this request caused to be wasted.")
      .def_readonly("num_cached_tokens", &Request::num_cached_tokens,
           "Prompt tokens whose KV came from the prefix cache at the first admission.")
      .def_readonly("cacheable", &Request::cacheable,
           "Entered with token ids (not counts only): it reads and feeds the prefix cache.")
      .def_property_readonly("token_ids", [](const Request& r) { return r.tokens.tokens(); })
      .def_property_readonly("block_hashes", [](const Request& r) { return r.tokens.block_hashes(); })
      .def_property_readonly("num_tokens", &Request::num_tokens)
      .def_property_readonly("num_computed_tokens", &Request::num_computed_tokens)
      .def_property_readonly("num_tokens_to_recompute", [](const Request& r) { return r.kv->num_tokens_to_recompute; })
      .def_property_readonly("device_blocks", [](const Request& r) { return r.kv->device_blocks; })
      .def_property_readonly("host_blocks", [](const Request& r) { return r.kv->host_blocks; });

  py::class_<SchedulerConfig>(m, "SchedulerConfig", "What the scheduler runs under: policy, pool sizes, token budget, limits.")
      .def(py::init<>())
      .def_readwrite("policy", &SchedulerConfig::policy)
      .def_readwrite("block_size", &SchedulerConfig::block_size)
      .def_readwrite("num_device_blocks", &SchedulerConfig::num_device_blocks)
      .def_readwrite("num_host_blocks", &SchedulerConfig::num_host_blocks)
      .def_readwrite("max_batched_tokens", &SchedulerConfig::max_batched_tokens,
           "S: tokens per iteration, decodes and prefill chunks together.")
      .def_readwrite("max_running_requests", &SchedulerConfig::max_running_requests)
      .def_readwrite("max_context_tokens", &SchedulerConfig::max_context_tokens,
           "Largest context a request may reach (the model's window); 0: only the pool limits it.")
      .def_readwrite("enable_prefix_caching", &SchedulerConfig::enable_prefix_caching,
           "Keep full blocks' KV findable by content after their owners let go (off under vllm-0.2 whatever this says).")
      .def_readwrite("vocab_size", &SchedulerConfig::vocab_size,
           "Token ids must lie in [0, vocab_size); 0 leaves them unchecked.")
      .def_readwrite("build_batch", &SchedulerConfig::build_batch,
                     "fill the plan's flat forward inputs (off for the simulator, which runs no forward)")
      .def_readwrite("demand_aware_preserve", &SchedulerConfig::demand_aware_preserve,
                     "min-waste charges a preserved context only for memory wanted before it returns")
      .def_readwrite("rank_s_per_predicted_token", &SchedulerConfig::rank_s_per_predicted_token,
                     "LAMPS-style ranking: seconds added to a request's FCFS key per predicted remaining output token (0: FCFS)")
      .def_readwrite("learn_output_lengths", &SchedulerConfig::learn_output_lengths,
                     "When ranking, key a request the caller gave no prediction for its turn by what finished programs of its class generated from that turn on")
      .def("validate", &SchedulerConfig::validate,
           "Raises InvalidArgumentError naming the first bad field.");

#define STAT(name) .def_readonly(#name, &SchedulerStats::name)
  py::class_<SchedulerStats>(m, "SchedulerStats", "Counts by state and cumulative counters (swaps, recompute, prefix cache), for metrics and logs.")
      STAT(num_waiting) STAT(num_running) STAT(num_swapping_in) STAT(num_intercepted)
      STAT(num_preserved) STAT(num_swapped) STAT(num_discarded) STAT(num_finished) STAT(num_aborted)
      STAT(num_free_device_blocks) STAT(num_free_host_blocks) STAT(num_swap_out_blocks)
      STAT(num_swap_in_blocks) STAT(num_recomputed_tokens) STAT(num_preemptions)
      STAT(prefix_cache_queries) STAT(prefix_cache_hits) STAT(prefix_cache_host_hits)
      STAT(num_cached_device_blocks) STAT(num_cached_host_blocks) STAT(num_device_evictions)
      STAT(num_host_evictions) STAT(num_stored_blocks);
#undef STAT

  py::class_<Scheduler>(m, "Scheduler",
                         "The iteration-level scheduler: which requests compute how many tokens, which paused "
                         "contexts are preserved, swapped or discarded, and which resume. Bookkeeping over block ids "
                         "only; time is an argument.")
      .def(py::init<const SchedulerConfig&, const CostModel&>(), py::arg("config"), py::arg("cost"))
      .def("add_request",
           py::overload_cast<const std::vector<TokenId>&, double, int32_t, const std::string&, bool>(
               &Scheduler::add_request),
           py::arg("prompt_token_ids"), py::arg("arrival_s"), py::arg("generated_token_limit") = 0,
           py::arg("cache_salt") = "", py::arg("skip_reading_prefix_cache") = false,
           "Queues a new request and returns its id. `generated_token_limit` > 0 makes update() report the request when it has generated that many tokens; its blocks are found by the prefix cache of the same `cache_salt`. `skip_reading_prefix_cache`: compute the whole prompt even where it is cached (prompt logprobs need every position's logits); its blocks still enter the cache.")
      .def("add_request", py::overload_cast<int32_t, double, int32_t>(&Scheduler::add_request),
           py::arg("num_prompt_tokens"), py::arg("arrival_s"), py::arg("generated_token_limit") = 0,
           "Counts only, no token ids (the simulator): the request never touches the prefix cache.")
      .def("intercept", &Scheduler::intercept, py::arg("request_id"), py::arg("now_s"),
           py::arg("expected_duration_s") = -1.0, py::arg("tool_name") = "",
           "Pauses a running request that has just sampled (it called a tool); the policy decides what happens "
           "to its KV. `expected_duration_s` < 0: unknown (estimated from the time elapsed). `tool_name` lets "
           "resume() record the duration per tool (continuum's TTL). Returns the state the policy put the request "
           "in; later moves come in StepOutput.kv_changes.")
      .def("resume", py::overload_cast<RequestId, const std::vector<TokenId>&, double, int32_t>(&Scheduler::resume),
           py::arg("request_id"), py::arg("tool_token_ids"), py::arg("now_s"), py::arg("num_replaced_tokens") = 0,
           "The tool returned `tool_token_ids`: queue the request to resume. The last `num_replaced_tokens` tokens (not yet computed) are dropped first and their replacement leads `tool_token_ids`.")
      .def("resume", py::overload_cast<RequestId, int32_t, double>(&Scheduler::resume), py::arg("request_id"),
           py::arg("num_tool_tokens"), py::arg("now_s"),
           "Counts only, for a counts-only request.")
      .def(
          "intercept_batch",
          [](Scheduler& s, const std::vector<RequestId>& ids, const std::vector<double>& now_s,
             const std::vector<double>& expected_s, const std::vector<std::string>& tool_names) {
            // Parallel lists, not event objects: the whole step's intercepts cross in one call.
            check_same_length("intercept_batch", ids.size(), {now_s.size(), expected_s.size(), tool_names.size()});
            std::vector<InterceptEvent> events(ids.size());
            for (size_t i = 0; i < ids.size(); ++i) events[i] = {ids[i], now_s[i], expected_s[i], tool_names[i]};
            // Labels, not enum objects: the caller reads none of them back across the boundary.
            std::vector<std::string> labels;
            for (RequestState state : s.intercept_batch(events)) labels.push_back(to_string(state));
            return labels;
          },
          py::arg("request_ids"), py::arg("now_s"), py::arg("expected_duration_s"), py::arg("tool_names"),
          "intercept() for every request of the lists at once, all or nothing (a bad one raises before any "
          "applies); returns the label of each request's KV state (RequestState.label), in order")
      .def(
          "resume_batch",
          [](Scheduler& s, const std::vector<RequestId>& ids, const std::vector<double>& now_s,
             const std::vector<std::vector<TokenId>>& tool_token_ids, const std::vector<int32_t>& num_replaced) {
            check_same_length("resume_batch", ids.size(), {now_s.size(), tool_token_ids.size(), num_replaced.size()});
            std::vector<ResumeEvent> events(ids.size());
            for (size_t i = 0; i < ids.size(); ++i) events[i] = {ids[i], now_s[i], tool_token_ids[i], -1, num_replaced[i]};
            return s.resume_batch(events);
          },
          py::arg("request_ids"), py::arg("now_s"), py::arg("tool_token_ids"), py::arg("num_replaced_tokens"),
          "resume() for every request of the lists in order; returns each one's error message (\"\" when it "
          "resumed): a failure does not stop the others, and one over the context or pool limit aborted its request")
      .def(
          "resume_batch",
          [](Scheduler& s, const std::vector<RequestId>& ids, const std::vector<double>& now_s,
             const std::vector<int32_t>& num_tool_tokens) {
            check_same_length("resume_batch", ids.size(), {now_s.size(), num_tool_tokens.size()});
            std::vector<ResumeEvent> events(ids.size());
            for (size_t i = 0; i < ids.size(); ++i) events[i] = {ids[i], now_s[i], {}, num_tool_tokens[i], 0};
            return s.resume_batch(events);
          },
          py::arg("request_ids"), py::arg("now_s"), py::arg("num_tool_tokens"),
          "Counts only: resume() of counts-only requests by their tool token counts, as the lists' other overload")
      .def("set_expected_duration", &Scheduler::set_expected_duration, py::arg("request_id"),
           py::arg("expected_duration_s"),
           "Updates the caller's estimate of an ongoing intercept (e.g. a learned tool duration).")
      .def("set_generated_token_limit", &Scheduler::set_generated_token_limit, py::arg("request_id"),
           py::arg("generated_token_limit"),
           "update() reports the request once it has generated this many tokens (0: never).")
      .def("set_predicted_output_tokens", &Scheduler::set_predicted_output_tokens, py::arg("request_id"),
           py::arg("num_tokens"),
           "The caller's prediction of the output tokens left over the request's remaining turns; re-ranks it when ranking is on (< 0: none).")
      .def("finish", &Scheduler::finish, py::arg("request_id"),
           "Ends a running request normally and frees its blocks.")
      .def("abort", &Scheduler::abort, py::arg("request_id"),
           "Ends a request in any live state and frees its blocks.")
      .def("remove", &Scheduler::remove, py::arg("request_id"),
           "Drops a finished or aborted request's record.")
      .def("schedule", &Scheduler::schedule, py::arg("now_s"),
           "Plans one iteration at time `now_s`. The previous plan must have been applied by update() (an empty one too); StateError otherwise.")
      .def("update", &Scheduler::update, py::arg("plan"), py::arg("result"), py::arg("now_s"),
           "Applies a finished iteration: commits copies and tokens, accounts waste; returns what changed (StepOutput).")
      .def("request", &Scheduler::request, py::arg("request_id"), py::return_value_policy::copy,
           "A copy of the request's record; UnknownRequestError if there is none.")
      .def("contains", &Scheduler::contains, py::arg("request_id"),
           "Whether the scheduler holds a record of the request (live, or ended and not removed).")
      .def(
          "predicted_output_tokens",
          [](const Scheduler& s, BlockHash program_class, int32_t num_prompt_tokens, int32_t turn) {
            return s.output_lengths().predict(program_class, num_prompt_tokens, turn);
          },
          py::arg("program_class"), py::arg("num_prompt_tokens"), py::arg("turn"),
          "What the output-length predictor expects a program of the class and prompt length to generate from turn `turn` on (< 0: not learned yet)")
      .def("num_learned_programs", [](const Scheduler& s) { return s.output_lengths().num_programs(); },
           "Finished programs the output-length predictor has learned from")
      .def("stats", &Scheduler::stats,
           "Counts by state and the cumulative counters now.")
      .def("ledger", &Scheduler::ledger, py::return_value_policy::copy,
           "A copy of the waste ledger so far.")
      .def("remaining_intercept_s", &Scheduler::remaining_intercept_s, py::arg("request"), py::arg("now_s"),
           "Expected remaining intercept time of a paused request: the caller's hint, else an estimate from the time already elapsed.")
      .def("block_table", [](const Scheduler& s, RequestId id) { return s.kv().table(id); }, py::arg("request_id"),
           "A copy of the request's block table.")
      .def(
          "pool", [](const Scheduler& s, Tier tier) -> const BlockPool& { return s.kv().pool(tier); },
          py::arg("tier"), py::return_value_policy::reference_internal,
          "The tier's block pool (reference counts, the prefix cache), read-only.")
      .def_property_readonly("config", &Scheduler::config,
           "The configuration it runs under.")
      .def_property_readonly("cost", &Scheduler::cost,
           "The cost model it sizes swaps and waste by.")
      .def_property_readonly("num_live_requests", &Scheduler::num_live_requests,
           "Requests not finished or aborted.")
      .def_property_readonly("num_free_device_blocks", [](const Scheduler& s) { return s.kv().pool(Tier::kDevice).num_free(); })
      .def_property_readonly("num_free_host_blocks", [](const Scheduler& s) { return s.kv().pool(Tier::kHost).num_free(); })
      .def("check_invariants", &Scheduler::check_invariants,
           "Raises unless blocks are conserved and every request's table agrees with its state (tests).");
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "InferCept native core: block pools, KV cache manager, scheduler, cost and waste models";
  m.attr("__version__") = INFERCEPT_VERSION;
#ifdef INFERCEPT_WITH_CUDA
  m.attr("cuda_compiled") = true;
  m.def("cuda_device_count", &infercept::cuda::num_devices);
  m.def("cuda_smoke_test", &infercept::cuda::smoke_test, py::arg("value") = 42);
#else
  m.attr("cuda_compiled") = false;
  m.def("cuda_device_count", []() { return 0; });
  m.def("cuda_smoke_test", [](int) { return false; }, py::arg("value") = 42);
#endif
  bind_errors(m);
  bind_enums(m);
  bind_memory(m);
  bind_cost(m);
  bind_step(m);
  bind_scheduler(m);
  bind_swap_engine(m);
  bind_cpu_attention(m);
  bind_cpu_linear(m);
  bind_cpu_layer_ops(m);
  bind_cpu_decoder_layer(m);
#ifdef INFERCEPT_WITH_CUDA
  bind_cuda(m);
#endif
}
