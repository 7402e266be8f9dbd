// The step records. StepPlan's batch arrays reach Python as numpy arrays over the plan's own
// vectors (no copy): each array keeps the plan alive, and the plan never changes after
// schedule() returns it, so a view stays valid as long as it is held.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <vector>

#include "bindings.h"
#include "infercept/step.h"

namespace py = pybind11;
using namespace infercept;

namespace {

static_assert(sizeof(BlockCopy) == 2 * sizeof(BlockId), "BlockCopy must be two packed block ids");

// A numpy array of `shape` over `data`, owned by `owner` (the Python StepPlan).
template <typename T>
py::array_t<T> view(const py::object& owner, const T* data, std::vector<py::ssize_t> shape) {
  return py::array_t<T>(std::move(shape), data, owner);
}

template <typename T>
py::array_t<T> view(const py::object& owner, const std::vector<T>& v) {
  return view(owner, v.data(), {static_cast<py::ssize_t>(v.size())});
}

// A StepBatch vector as the read-only property `name` of StepPlan.
template <typename T>
void def_array(py::class_<StepPlan>& cls, const char* name, std::vector<T> StepBatch::*field, const char* doc) {
  cls.def_property_readonly(
      name, [field](const py::object& self) { return view(self, self.cast<const StepPlan&>().batch.*field); }, doc);
}

py::array_t<BlockId> copies_view(const py::object& owner, const std::vector<BlockCopy>& copies) {
  return view(owner, reinterpret_cast<const BlockId*>(copies.data()),
              {static_cast<py::ssize_t>(copies.size()), 2});
}

}  // namespace

void bind_step(py::module_& m) {
  py::class_<ScheduledRequest>(m, "ScheduledRequest", "One request of a plan: tokens already computed, new ones this step, of them recomputed, and whether it samples.")
      .def_readonly("request_id", &ScheduledRequest::request_id)
      .def_readonly("num_computed_tokens", &ScheduledRequest::num_computed_tokens)
      .def_readonly("num_new_tokens", &ScheduledRequest::num_new_tokens)
      .def_readonly("num_recompute_tokens", &ScheduledRequest::num_recompute_tokens, "of the new tokens, those computed before (a discarded context rebuilt)")
      .def_readonly("samples", &ScheduledRequest::samples, "whether the step reaches the end of its context (it draws a token)");

  py::class_<StepPlan> plan(m, "StepPlan",
                           "What schedule() decided for one iteration: the scheduled requests, the block copies, the "
                           "step's counts and the forward's inputs as flat arrays (numpy views over the plan, no copy).");
  plan.def_readonly("step_id", &StepPlan::step_id)
      .def_readonly("now_s", &StepPlan::now_s)
      .def_readonly("scheduled", &StepPlan::scheduled, "the scheduled requests (a list copy; the flat arrays are cheaper)")
      .def_readonly("swap_out", &StepPlan::swap_out, "device -> host block copies to run this step")
      .def_readonly("swap_in", &StepPlan::swap_in, "host -> device block copies to run this step")
      .def_readonly("preempted", &StepPlan::preempted, "requests paused this step for want of memory")
      .def_readonly("discarded", &StepPlan::discarded, "paused requests whose KV this step freed")
      .def_readonly("num_batched_tokens", &StepPlan::num_batched_tokens, "B: tokens the forward computes")
      .def_readonly("num_context_tokens", &StepPlan::num_context_tokens, "tokens the batch attends over, in all")
      .def_readonly("num_recompute_tokens", &StepPlan::num_recompute_tokens, "of the batched tokens, those computed before")
      .def_readonly("num_sampling_requests", &StepPlan::num_sampling_requests, "S: requests that draw a token")
      .def_readonly("swap_budget_tokens", &StepPlan::swap_budget_tokens, "N_i: tokens of copies the forward can hide")
      .def_property_readonly("num_swap_out_blocks", [](const StepPlan& p) { return p.swap_out.size(); })
      .def_property_readonly("num_swap_in_blocks", [](const StepPlan& p) { return p.swap_in.size(); })
      .def_property_readonly("num_scheduled", [](const StepPlan& p) { return p.scheduled.size(); })
      .def("is_empty", &StepPlan::is_empty, "nothing to compute and no copies (update() must still apply it)");
  def_array(plan, "request_ids", &StepBatch::request_ids, "[B] int64 scheduled requests, in plan order");
  def_array(plan, "input_ids", &StepBatch::input_ids, "[T] int64 token ids of the new tokens (0 for counts-only requests)");
  def_array(plan, "positions", &StepBatch::positions, "[T] int64 context position of each new token");
  def_array(plan, "slot_mapping", &StepBatch::slot_mapping, "[T] int64 block_id * block_size + offset of each new token's K/V");
  def_array(plan, "query_start", &StepBatch::query_start, "[B + 1] int64 request i's new tokens are rows query_start[i]:query_start[i+1]");
  def_array(plan, "query_lens", &StepBatch::query_lens, "[B] int32 new tokens per request");
  def_array(plan, "context_lens", &StepBatch::context_lens, "[B] int32 tokens with KV after this step");
  def_array(plan, "logit_rows", &StepBatch::logit_rows, "[S] int64 flat row of each sampling request's last new token");
  def_array(plan, "sampling_request_ids", &StepBatch::sampling_request_ids, "[S] int64 requests that sample, in plan order");
  def_array(plan, "sampling_positions", &StepBatch::sampling_positions, "[S] int32 context position each sampled token takes");
  def_array(plan, "num_cached_tokens", &StepBatch::num_cached_tokens, "[S] int32 prompt tokens the prefix cache served each sampling request");
  plan.def_property_readonly(
          "block_tables",
          [](const py::object& self) {
            const StepBatch& b = self.cast<const StepPlan&>().batch;
            return view(self, b.block_tables.data(),
                        {static_cast<py::ssize_t>(b.request_ids.size()), static_cast<py::ssize_t>(b.max_blocks)});
          },
          "[B, max_blocks] int32 device block ids per request, padded with 0")
      .def_property_readonly(
          "swap_out_blocks", [](const py::object& self) { return copies_view(self, self.cast<const StepPlan&>().swap_out); },
          "[N, 2] int32 (device src, host dst) per block copied out")
      .def_property_readonly(
          "swap_in_blocks", [](const py::object& self) { return copies_view(self, self.cast<const StepPlan&>().swap_in); },
          "[N, 2] int32 (host src, device dst) per block copied in");

  py::class_<StepResult>(m, "StepResult", "What the executor reports for one plan (the Executor protocol's return): sampled tokens, duration, swap stall; the engine fills finished.")
      .def(py::init([](double duration_s, double swap_stall_s, std::vector<RequestId> finished,
                       std::vector<int32_t> sampled_token_ids) {
             return StepResult{duration_s, swap_stall_s, std::move(finished), std::move(sampled_token_ids)};
           }),
           py::arg("duration_s"), py::arg("swap_stall_s") = 0.0, py::arg("finished") = std::vector<RequestId>{},
           py::arg("sampled_token_ids") = std::vector<int32_t>{})
      .def_readwrite("duration_s", &StepResult::duration_s, "the step's time: forward, copies and sampling")
      .def_readwrite("swap_stall_s", &StepResult::swap_stall_s, "of it, time the forward waited on copies")
      .def_readwrite("finished", &StepResult::finished, "requests that stop now (the engine's stop rules)")
      .def_readwrite("sampled_token_ids", &StepResult::sampled_token_ids,
                     "[plan.num_sampling_requests] the token each sampling request drew, in plan order");

  py::class_<KvStateChange>(m, "KvStateChange", "A paused request's KV move: preserved, swapping_out, swapped or discarded.")
      .def_readonly("request_id", &KvStateChange::request_id)
      .def_readonly("state", &KvStateChange::state);

  py::class_<StepOutput>(m, "StepOutput", "What update() tells the caller: everything it needs, so it never polls request states.")
      .def_readonly("sampled", &StepOutput::sampled, "requests that gained a generated token")
      .def_readonly("reached_limit", &StepOutput::reached_limit, "... and reached their generated-token limit")
      .def_readonly("aborted", &StepOutput::aborted, "requests the scheduler had to give up on")
      .def_readonly("abort_reasons", &StepOutput::abort_reasons, "[len(aborted)] why, naming the limit")
      .def_readonly("kv_changes", &StepOutput::kv_changes,
                    "paused requests whose KV moved since intercept() or the last update() said");
}
