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

void bind_errors(py::module_& m) {
  auto base = py::register_exception<Error>(m, "InferceptError", PyExc_RuntimeError);
  py::register_exception<OutOfBlocksError>(m, "OutOfBlocksError", base.ptr());
  py::register_exception<BlockError>(m, "BlockError", base.ptr());
  py::register_exception<StateError>(m, "StateError", base.ptr());
  py::register_exception<UnknownRequestError>(m, "UnknownRequestError", base.ptr());
  py::register_exception<InvalidArgumentError>(m, "InvalidArgumentError", PyExc_ValueError);
}

void bind_enums(py::module_& m) {
  py::enum_<Tier>(m, "Tier").value("DEVICE", Tier::kDevice).value("HOST", Tier::kHost);
  py::enum_<Policy>(m, "Policy")
      .value("VLLM_0_2", Policy::kVllm02)
      .value("DISCARD", Policy::kDiscard)
      .value("PRESERVE", Policy::kPreserve)
      .value("SWAP", Policy::kSwap)
      .value("INFERCEPT", Policy::kInfercept)
      .value("VLLM_V1", Policy::kVllmV1)
      .value("VLLM_V1_OFFLOAD", Policy::kVllmV1Offload)
      .value("CONTINUUM", Policy::kContinuum)
      .def_static("parse", &parse_policy, py::arg("name"))
      .def_static("all", &all_policies)
      .def_property_readonly("label", [](Policy p) { return to_string(p); })
      .def_property_readonly("swaps", [](Policy p) { return traits(p).swaps; })
      .def_property_readonly("uses_prefix_cache", [](Policy p) { return traits(p).uses_prefix_cache; });
  py::enum_<RequestState>(m, "RequestState")
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
      .def_property_readonly("label", [](RequestState s) { return to_string(s); });
  m.def("can_transition", &can_transition, py::arg("src"), py::arg("dst"));
}

void bind_memory(py::module_& m) {
  py::class_<BlockPool>(m, "BlockPool")
      .def(py::init<Tier, int32_t, int32_t>(), py::arg("tier"), py::arg("num_blocks"), py::arg("block_size") = 16)
      .def("allocate", py::overload_cast<>(&BlockPool::allocate))
      .def("allocate_many", py::overload_cast<int32_t>(&BlockPool::allocate), py::arg("num_blocks"))
      .def("retain", &BlockPool::retain, py::arg("block"))
      .def("free", py::overload_cast<BlockId>(&BlockPool::free), py::arg("block"))
      .def("is_cached", &BlockPool::is_cached, py::arg("block"))
      .def("is_evictable", &BlockPool::is_evictable, py::arg("block"))
      .def_property_readonly("num_evictable", &BlockPool::num_evictable)
      .def_property_readonly("num_cached", &BlockPool::num_cached)
      .def_property_readonly("num_evictions", &BlockPool::num_evictions)
      .def("can_allocate", &BlockPool::can_allocate, py::arg("num_blocks"))
      .def("ref_count", &BlockPool::ref_count, py::arg("block"))
      .def_property_readonly("num_blocks", &BlockPool::num_blocks)
      .def_property_readonly("num_free", &BlockPool::num_free)
      .def_property_readonly("num_used", &BlockPool::num_used)
      .def_property_readonly("tier", &BlockPool::tier)
      .def("check_invariants", &BlockPool::check_invariants);

  py::class_<BlockCopy>(m, "BlockCopy")
      .def(py::init<BlockId, BlockId>(), py::arg("src"), py::arg("dst"))
      .def_readonly("src", &BlockCopy::src)
      .def_readonly("dst", &BlockCopy::dst)
      .def("__repr__", [](const BlockCopy& c) {
        return "BlockCopy(src=" + std::to_string(c.src) + ", dst=" + std::to_string(c.dst) + ")";
      });

  py::class_<BlockTable>(m, "BlockTable")
      .def_readonly("device_blocks", &BlockTable::device_blocks)
      .def_readonly("host_blocks", &BlockTable::host_blocks)
      .def_readonly("num_tokens", &BlockTable::num_tokens)
      .def_readonly("num_tokens_to_recompute", &BlockTable::num_tokens_to_recompute);

  m.def("hash_salt", &hash_salt, py::arg("salt"), "The root key of a prefix-cache hash chain for `salt`.");
  m.def(
      "hash_block",
      [](BlockHash parent, const std::vector<TokenId>& tokens) {
        return hash_block(parent, tokens.data(), static_cast<int32_t>(tokens.size()));
      },
      py::arg("parent"), py::arg("token_ids"), "The key of a full block chained from `parent`.");
}

void bind_cost(py::module_& m) {
  py::class_<AffineFit>(m, "AffineFit")
      .def(py::init<>())
      .def_readwrite("intercept_s", &AffineFit::intercept_s)
      .def_readwrite("slope_s_per_token", &AffineFit::slope_s_per_token)
      .def_readonly("samples", &AffineFit::samples)
      .def("__call__", &AffineFit::operator(), py::arg("num_tokens"))
      .def_static("fit", &AffineFit::fit, py::arg("samples"));

  py::class_<CostModel>(m, "CostModel")
      .def(py::init<>())
      .def_readwrite("name", &CostModel::name)
      .def_readwrite("source", &CostModel::source)
      .def_readwrite("forward", &CostModel::forward)
      .def_property(
          "forward_points", [](const CostModel& c) { return c.forward_points; },
          [](CostModel& c, const std::vector<std::pair<double, double>>& points) {
            CostModel::check_forward_points(points);
            c.forward_points = points;
          },
          "Measured T_fwd (num_batched_tokens, seconds), attention removed, ascending; with two or more, "
          "forward_time_s interpolates them instead of using the affine fit.")
      .def_readwrite("swap", &CostModel::swap)
      .def_readwrite("kv_bytes_per_token", &CostModel::kv_bytes_per_token)
      .def_readwrite("saturation_tokens", &CostModel::saturation_tokens)
      .def_readwrite("kv_capacity_tokens", &CostModel::kv_capacity_tokens)
      .def_readwrite("attention_s_per_context_token", &CostModel::attention_s_per_context_token)
      .def("forward_time_s", &CostModel::forward_time_s, py::arg("num_tokens"))
      .def("step_time_s", &CostModel::step_time_s, py::arg("num_tokens"), py::arg("num_context_tokens"))
      .def("swap_time_s", &CostModel::swap_time_s, py::arg("num_tokens"))
      .def("swap_budget_tokens", &CostModel::swap_budget_tokens, py::arg("num_batched_tokens"),
           py::arg("num_context_tokens") = 0)
      .def("to_json", &CostModel::to_json)
      .def_static("from_json", &CostModel::from_json, py::arg("text"))
      .def("save", &CostModel::save, py::arg("path"))
      .def_static("load", &CostModel::load, py::arg("path"))
      .def_static("builtin", &CostModel::builtin, py::arg("name"))
      .def_static("builtin_names", &CostModel::builtin_names);

  m.def("discard_waste", &discard_waste, py::arg("cost"), py::arg("context_tokens"), py::arg("other_tokens"));
  m.def("preserve_waste", &preserve_waste, py::arg("cost"), py::arg("context_tokens"), py::arg("intercept_s"));
  m.def("swap_waste", &swap_waste, py::arg("cost"), py::arg("context_tokens"), py::arg("batch_tokens"));
  m.def("chunked_discard_waste", &chunked_discard_waste, py::arg("cost"), py::arg("context_tokens"),
        py::arg("other_tokens"), py::arg("num_chunks"));

  py::class_<WasteCounters>(m, "WasteCounters")
      .def_readonly("preserved_idle_byte_s", &WasteCounters::preserved_idle_byte_s)
      .def_readonly("recompute_byte_s", &WasteCounters::recompute_byte_s)
      .def_readonly("swap_stall_byte_s", &WasteCounters::swap_stall_byte_s)
      .def_property_readonly("total_byte_s", &WasteCounters::total_byte_s);
  py::class_<WasteLedger>(m, "WasteLedger")
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
  py::class_<Request>(m, "Request")
      .def_readonly("id", &Request::id)
      .def_readonly("state", &Request::state)
      .def_readonly("arrival_s", &Request::arrival_s)
      .def_readonly("priority_s", &Request::priority_s)
      .def_readonly("num_prompt_tokens", &Request::num_prompt_tokens)
      .def_readonly("num_generated_tokens", &Request::num_generated_tokens)
      .def_readonly("num_tool_tokens", &Request::num_tool_tokens)
      .def_readonly("generated_token_limit", &Request::generated_token_limit)
      .def_readonly("tool_pending", &Request::tool_pending)
      .def_readonly("expected_duration_s", &Request::expected_duration_s)
      .def_readonly("num_intercepts", &Request::num_intercepts)
      .def_readonly("pin_until_s", &Request::pin_until_s)
      .def_readonly("num_preemptions", &Request::num_preemptions)
      .def_readonly("waste", &Request::waste)
      .def_readonly("num_cached_tokens", &Request::num_cached_tokens)
      .def_readonly("cacheable", &Request::cacheable)
      .def_property_readonly("token_ids", [](const Request& r) { return r.tokens.tokens(); })
      .def_property_readonly("block_hashes", [](const Request& r) { return r.tokens.block_hashes(); })
      .def_property_readonly("num_tokens", &Request::num_tokens)
      .def_property_readonly("num_computed_tokens", &Request::num_computed_tokens)
      .def_property_readonly("num_tokens_to_recompute", [](const Request& r) { return r.kv->num_tokens_to_recompute; })
      .def_property_readonly("device_blocks", [](const Request& r) { return r.kv->device_blocks; })
      .def_property_readonly("host_blocks", [](const Request& r) { return r.kv->host_blocks; });

  py::class_<SchedulerConfig>(m, "SchedulerConfig")
      .def(py::init<>())
      .def_readwrite("policy", &SchedulerConfig::policy)
      .def_readwrite("block_size", &SchedulerConfig::block_size)
      .def_readwrite("num_device_blocks", &SchedulerConfig::num_device_blocks)
      .def_readwrite("num_host_blocks", &SchedulerConfig::num_host_blocks)
      .def_readwrite("max_batched_tokens", &SchedulerConfig::max_batched_tokens)
      .def_readwrite("max_running_requests", &SchedulerConfig::max_running_requests)
      .def_readwrite("max_context_tokens", &SchedulerConfig::max_context_tokens)
      .def_readwrite("enable_prefix_caching", &SchedulerConfig::enable_prefix_caching)
      .def_readwrite("vocab_size", &SchedulerConfig::vocab_size)
      .def_readwrite("build_batch", &SchedulerConfig::build_batch,
                     "fill the plan's flat forward inputs (off for the simulator, which runs no forward)")
      .def_readwrite("demand_aware_preserve", &SchedulerConfig::demand_aware_preserve,
                     "min-waste charges a preserved context only for memory wanted before it returns")
      .def("validate", &SchedulerConfig::validate);

#define STAT(name) .def_readonly(#name, &SchedulerStats::name)
  py::class_<SchedulerStats>(m, "SchedulerStats")
      STAT(num_waiting) STAT(num_running) STAT(num_swapping_in) STAT(num_intercepted)
      STAT(num_preserved) STAT(num_swapped) STAT(num_discarded) STAT(num_finished) STAT(num_aborted)
      STAT(num_free_device_blocks) STAT(num_free_host_blocks) STAT(num_swap_out_blocks)
      STAT(num_swap_in_blocks) STAT(num_recomputed_tokens) STAT(num_preemptions)
      STAT(prefix_cache_queries) STAT(prefix_cache_hits) STAT(prefix_cache_host_hits)
      STAT(num_cached_device_blocks) STAT(num_cached_host_blocks) STAT(num_device_evictions)
      STAT(num_host_evictions) STAT(num_stored_blocks);
#undef STAT

  py::class_<Scheduler>(m, "Scheduler")
      .def(py::init<const SchedulerConfig&, const CostModel&>(), py::arg("config"), py::arg("cost"))
      .def("add_request",
           py::overload_cast<const std::vector<TokenId>&, double, int32_t, const std::string&, bool>(
               &Scheduler::add_request),
           py::arg("prompt_token_ids"), py::arg("arrival_s"), py::arg("generated_token_limit") = 0,
           py::arg("cache_salt") = "", py::arg("skip_reading_prefix_cache") = false)
      .def("add_request", py::overload_cast<int32_t, double, int32_t>(&Scheduler::add_request),
           py::arg("num_prompt_tokens"), py::arg("arrival_s"), py::arg("generated_token_limit") = 0)
      .def("intercept", &Scheduler::intercept, py::arg("request_id"), py::arg("now_s"),
           py::arg("expected_duration_s") = -1.0, py::arg("tool_name") = "",
           "Pauses a request that has just sampled; returns the state the policy put its KV in")
      .def("resume", py::overload_cast<RequestId, const std::vector<TokenId>&, double, int32_t>(&Scheduler::resume),
           py::arg("request_id"), py::arg("tool_token_ids"), py::arg("now_s"), py::arg("num_replaced_tokens") = 0)
      .def("resume", py::overload_cast<RequestId, int32_t, double>(&Scheduler::resume), py::arg("request_id"),
           py::arg("num_tool_tokens"), py::arg("now_s"))
      .def("set_expected_duration", &Scheduler::set_expected_duration, py::arg("request_id"),
           py::arg("expected_duration_s"))
      .def("set_generated_token_limit", &Scheduler::set_generated_token_limit, py::arg("request_id"),
           py::arg("generated_token_limit"))
      .def("finish", &Scheduler::finish, py::arg("request_id"))
      .def("abort", &Scheduler::abort, py::arg("request_id"))
      .def("remove", &Scheduler::remove, py::arg("request_id"))
      .def("schedule", &Scheduler::schedule, py::arg("now_s"))
      .def("update", &Scheduler::update, py::arg("plan"), py::arg("result"), py::arg("now_s"))
      .def("request", &Scheduler::request, py::arg("request_id"), py::return_value_policy::copy)
      .def("contains", &Scheduler::contains, py::arg("request_id"))
      .def("stats", &Scheduler::stats)
      .def("ledger", &Scheduler::ledger, py::return_value_policy::copy)
      .def("remaining_intercept_s", &Scheduler::remaining_intercept_s, py::arg("request"), py::arg("now_s"))
      .def("block_table", [](const Scheduler& s, RequestId id) { return s.kv().table(id); }, py::arg("request_id"))
      .def(
          "pool", [](const Scheduler& s, Tier tier) -> const BlockPool& { return s.kv().pool(tier); },
          py::arg("tier"), py::return_value_policy::reference_internal,
          "The tier's block pool (reference counts, the prefix cache), read-only.")
      .def_property_readonly("config", &Scheduler::config)
      .def_property_readonly("cost", &Scheduler::cost)
      .def_property_readonly("num_live_requests", &Scheduler::num_live_requests)
      .def_property_readonly("num_free_device_blocks", [](const Scheduler& s) { return s.kv().pool(Tier::kDevice).num_free(); })
      .def_property_readonly("num_free_host_blocks", [](const Scheduler& s) { return s.kv().pool(Tier::kHost).num_free(); })
      .def("check_invariants", &Scheduler::check_invariants);
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
#ifdef INFERCEPT_WITH_CUDA
  bind_cuda(m);
#endif
}
