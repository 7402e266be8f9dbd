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
  py::class_<SwapStepStats>(m, "SwapStepStats")
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

  py::class_<SwapCounters>(m, "SwapCounters")
      .def_readonly("num_bytes_out", &SwapCounters::num_bytes_out)
      .def_readonly("num_bytes_in", &SwapCounters::num_bytes_in)
      .def_readonly("num_blocks_out", &SwapCounters::num_blocks_out)
      .def_readonly("num_blocks_in", &SwapCounters::num_blocks_in);

  // The interface: methods every backend shares. Blocking calls release the GIL so that other
  // Python threads (the tool runtime) run while the model runner waits on copies.
  py::class_<SwapEngine>(m, "SwapEngine")
      .def_property_readonly("num_layers", [](const SwapEngine& e) { return e.config().num_layers; })
      .def_property_readonly("block_bytes", [](const SwapEngine& e) { return e.config().block_bytes; })
      .def_property_readonly("num_device_blocks", [](const SwapEngine& e) { return e.config().num_device_blocks; })
      .def_property_readonly("num_host_blocks", [](const SwapEngine& e) { return e.config().num_host_blocks; })
      .def(
          "register_device_layer",
          [](SwapEngine& e, int32_t layer, uintptr_t key_ptr, uintptr_t value_ptr) {
            e.register_device_layer(layer, reinterpret_cast<void*>(key_ptr), reinterpret_cast<void*>(value_ptr));
          },
          py::arg("layer"), py::arg("key_ptr"), py::arg("value_ptr"))
      .def(
          "begin_step",
          [](SwapEngine& e, const py::iterable& swap_out, const py::iterable& swap_in) {
            std::vector<BlockCopy> out = to_block_copies(swap_out, "swap_out");
            std::vector<BlockCopy> in = to_block_copies(swap_in, "swap_in");
            py::gil_scoped_release release;
            e.begin_step(out, in);
          },
          py::arg("swap_out"), py::arg("swap_in"))
      .def(
          "begin_plan",
          [](SwapEngine& e, const StepPlan& plan) {
            py::gil_scoped_release release;
            e.begin_step(plan.swap_out, plan.swap_in);
          },
          py::arg("plan"), "begin_step(plan.swap_out, plan.swap_in) without converting the lists")
      .def("wait_layer", &SwapEngine::wait_layer, py::arg("layer"), py::call_guard<py::gil_scoped_release>())
      .def("finish_step", &SwapEngine::finish_step, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("is_step_in_flight", &SwapEngine::is_step_in_flight)
      .def_property_readonly("counters", &SwapEngine::counters)
      .def(
          "host_block",
          [](const SwapEngine& e, int32_t layer, bool is_value, BlockId block) {
            const auto* p = reinterpret_cast<const char*>(e.host_block_ptr(layer, is_value, block));
            return py::bytes(p, static_cast<size_t>(e.config().block_bytes));
          },
          py::arg("layer"), py::arg("is_value"), py::arg("block"));

  py::class_<CpuSwapEngine, SwapEngine>(m, "CpuSwapEngine")
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
