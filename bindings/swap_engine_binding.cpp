// infercept._core.SwapEngine / CpuSwapEngine: declarations plus the checks only Python needs
// (copy lists arrive as Python objects, device pointers as ints from tensor.data_ptr()). The
// core checks block ids and layers and throws InvalidArgumentError (a ValueError).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "bindings.h"
#include "infercept/cpu_swap_engine.h"
#include "infercept/errors.h"
#include "infercept/step.h"
#include "infercept/swap_engine.h"

namespace py = pybind11;
using namespace infercept;

namespace {

// One end of a (src, dst) pair: a Python int that fits a BlockId.
BlockId to_block_id(py::handle value, const std::string& where) {
  int64_t id = 0;
  try {
    id = value.cast<int64_t>();
  } catch (const py::cast_error&) {
    throw py::type_error(where + " must be an int, got " + std::string(py::str(py::type::of(value).attr("__name__"))));
  }
  if (id < std::numeric_limits<BlockId>::min() || id > std::numeric_limits<BlockId>::max()) {
    throw InvalidArgumentError(where + "=" + std::to_string(id) + " does not fit a block id (limit " +
                               std::to_string(std::numeric_limits<BlockId>::max()) + ")");
  }
  return static_cast<BlockId>(id);
}

// A copy list: BlockCopy objects (as StepPlan.swap_out / swap_in hold them) or (src, dst) pairs.
std::vector<BlockCopy> to_block_copies(const py::iterable& items, const char* name) {
  std::vector<BlockCopy> copies;
  size_t index = 0;
  for (py::handle item : items) {
    const std::string where = std::string(name) + "[" + std::to_string(index++) + "]";
    if (py::isinstance<BlockCopy>(item)) {
      copies.push_back(item.cast<BlockCopy>());
    } else if (py::isinstance<py::tuple>(item) || py::isinstance<py::list>(item)) {
      auto pair = py::reinterpret_borrow<py::sequence>(item);
      if (pair.size() != 2) {
        throw InvalidArgumentError(where + " has " + std::to_string(pair.size()) +
                                   " items; a copy is a (src, dst) pair");
      }
      copies.push_back(BlockCopy{to_block_id(pair[0], where + ".src"), to_block_id(pair[1], where + ".dst")});
    } else {
      throw py::type_error(where + " must be a BlockCopy or a (src, dst) pair, got " +
                           std::string(py::str(py::type::of(item).attr("__name__"))));
    }
  }
  return copies;
}

}  // namespace

void bind_swap_engine(py::module_& m) {
  py::class_<SwapStepStats>(m, "SwapStepStats", "What one step's copies did. Returned by finish_step().")
      .def_readonly("num_bytes", &SwapStepStats::num_bytes)
      .def_readonly("num_blocks_out", &SwapStepStats::num_blocks_out)
      .def_readonly("num_blocks_in", &SwapStepStats::num_blocks_in)
      .def_readonly("copy_s", &SwapStepStats::copy_s)
      .def_readonly("stall_s", &SwapStepStats::stall_s)
      .def_readonly("drain_s", &SwapStepStats::drain_s)
      .def("__repr__", [](const SwapStepStats& s) {
        return "SwapStepStats(num_bytes=" + std::to_string(s.num_bytes) +
               ", num_blocks_out=" + std::to_string(s.num_blocks_out) +
               ", num_blocks_in=" + std::to_string(s.num_blocks_in) + ", copy_s=" + std::to_string(s.copy_s) +
               ", stall_s=" + std::to_string(s.stall_s) + ", drain_s=" + std::to_string(s.drain_s) + ")";
      });

  py::class_<SwapCounters>(m, "SwapCounters", "Totals since construction, over the steps that finished without error.")
      .def_readonly("num_bytes_out", &SwapCounters::num_bytes_out)
      .def_readonly("num_bytes_in", &SwapCounters::num_bytes_in)
      .def_readonly("num_blocks_out", &SwapCounters::num_blocks_out)
      .def_readonly("num_blocks_in", &SwapCounters::num_blocks_in);

  // The interface: methods every backend shares. Blocking calls release the GIL so that other
  // Python threads (the tool runtime) run while the model runner waits on copies.
  py::class_<SwapEngine>(m, "SwapEngine",
                          "Moves KV blocks between the device cache and the engine's host pool, one layer at a time. "
                          "One thread drives a step; counters may be read from any thread.")
      .def_property_readonly("num_layers", [](const SwapEngine& e) { return e.config().num_layers; })
      .def_property_readonly("block_bytes", [](const SwapEngine& e) { return e.config().block_bytes; })
      .def_property_readonly("num_device_blocks", [](const SwapEngine& e) { return e.config().num_device_blocks; })
      .def_property_readonly("num_host_blocks", [](const SwapEngine& e) { return e.config().num_host_blocks; })
      .def(
          "register_device_layer",
          [](SwapEngine& e, int32_t layer, uintptr_t key_ptr, uintptr_t value_ptr) {
            e.register_device_layer(layer, reinterpret_cast<void*>(key_ptr), reinterpret_cast<void*>(value_ptr));
          },
          py::arg("layer"), py::arg("key_ptr"), py::arg("value_ptr"),
          "Records where layer `layer`'s device K and V caches start (every layer, before a step with copies). "
          "InvalidArgumentError for a layer out of range or a null pointer, StateError while a step is in flight.")
      .def(
          "begin_step",
          [](SwapEngine& e, const py::iterable& swap_out, const py::iterable& swap_in) {
            std::vector<BlockCopy> out = to_block_copies(swap_out, "swap_out");
            std::vector<BlockCopy> in = to_block_copies(swap_in, "swap_in");
            py::gil_scoped_release release;
            e.begin_step(out, in);
          },
          py::arg("swap_out"), py::arg("swap_in"),
          "Checks both lists (BlockCopy or (src, dst) pairs) and starts the copies: per layer the swap-ins, then the "
          "swap-outs. StateError when the previous step was not finished or a layer is not registered (nothing copied).")
      .def(
          "begin_plan",
          [](SwapEngine& e, const StepPlan& plan) {
            py::gil_scoped_release release;
            e.begin_step(plan.swap_out, plan.swap_in);
          },
          py::arg("plan"), "begin_step(plan.swap_out, plan.swap_in) without converting the lists")
      .def("wait_layer", &SwapEngine::wait_layer, py::arg("layer"), py::call_guard<py::gil_scoped_release>(),
           "Blocks until layer `layer`'s copies of the current step are done (at once outside a step); rethrows the "
           "copy worker's error if it failed at or before this layer.")
      .def("finish_step", &SwapEngine::finish_step, py::call_guard<py::gil_scoped_release>(),
           "Waits for every layer and ends the step; returns its SwapStepStats (empty outside a step). Rethrows the "
           "copy worker's error (the step is ended either way).")
      .def_property_readonly("is_step_in_flight", &SwapEngine::is_step_in_flight,
                             "Whether a step has begun and not yet finished.")
      .def_property_readonly("counters", &SwapEngine::counters, "SwapCounters since construction.")
      .def(
          "host_block",
          [](const SwapEngine& e, int32_t layer, bool is_value, BlockId block) {
            const auto* p = reinterpret_cast<const char*>(e.host_block_ptr(layer, is_value, block));
            return py::bytes(p, static_cast<size_t>(e.config().block_bytes));
          },
          py::arg("layer"), py::arg("is_value"), py::arg("block"),
          "A copy of one host block of one layer's K (is_value False) or V cache, block_bytes bytes (tests; not "
          "during a step).");

  py::class_<CpuSwapEngine, SwapEngine>(m, "CpuSwapEngine", "The CPU backend: a copy worker thread over a host pool of num_layers * 2 * num_host_blocks * block_bytes bytes.")
      .def(py::init([](int32_t num_layers, int64_t block_bytes, int32_t num_device_blocks, int32_t num_host_blocks) {
             SwapEngineConfig config;
             config.num_layers = num_layers;
             config.block_bytes = block_bytes;
             config.num_device_blocks = num_device_blocks;
             config.num_host_blocks = num_host_blocks;
             return new CpuSwapEngine(config);
           }),
           py::arg("num_layers"), py::arg("block_bytes"), py::arg("num_device_blocks"), py::arg("num_host_blocks"),
           py::call_guard<py::gil_scoped_release>());
}
