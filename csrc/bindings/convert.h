// Conversions between Python values and the C++ types the bindings expose:
// the only place that knows both sides' representations.
#pragma once

#include <torch/extension.h>

#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "core/comm_order.h"
#include "core/schedule.h"
#include "core/simulator.h"
#include "runtime/executor.h"
#include "runtime/p2p.h"

namespace dpe::bindings {

namespace py = pybind11;

// Runs `work` with the GIL released (C++ work that touches no Python object).
template <class Work>
auto without_gil(Work&& work) {
  py::gil_scoped_release release;
  return work();
}

// An argument given as the bound enum or as its name ("zb-v", "v", "pair").
core::ScheduleKind kind_arg(const py::handle& value);
// None or "" is the schedule's own layout (`fallback`).
core::ChunkLayout layout_arg(const py::handle& value, core::ChunkLayout fallback);
core::TransferOrder transfer_order_arg(const py::handle& value);
const char* transfer_order_name(core::TransferOrder order);

// A validated schedule spec; `layout` None is the kind's own.
core::ScheduleSpec make_spec(const py::handle& kind, int64_t micro_batches, int64_t stages, int64_t chunks,
                             const py::handle& layout);

// Instructions cross into Python as (op, buffer_id, micro_batch, chunk) tuples.
using PyInstruction = std::tuple<int, int, int, int>;
py::list steps_to_python(const core::Steps& steps);
core::Steps steps_from_python(const std::vector<std::vector<PyInstruction>>& steps);
py::dict result_to_python(const core::SimulationResult& r);
// Rows of action tokens ("0F3"), one row per rank, as compute orders.
std::vector<core::ComputeOrder> orders_from_python(const std::vector<std::vector<std::string>>& rows,
                                                   core::ChunkLayout layout);
py::list trace_to_python(const core::CommTrace& trace);
core::CommTrace trace_from_python(const std::vector<std::tuple<std::string, int, int64_t, std::string>>& events);
py::dict check_to_python(const core::CommCheck& c);

// A stage's value in Python: a tensor, or a tuple of tensors.
py::object activation_to_python(const runtime::Activation& a);
runtime::Activation activation_from_python(const py::handle& obj, const char* what);
// A Python value the executor keeps for a micro-batch (labels, a loss); None
// is kept as nothing. Released on whatever thread drops it, under the GIL.
runtime::Held hold(const py::handle& obj);
py::object held(const runtime::Held& value);

}  // namespace dpe::bindings
