// The one bindings file: exposes csrc/core (and later csrc/runtime) to Python
// as deepspeed_pipe_ext._C. pybind11 maps std::invalid_argument to ValueError.
#include <torch/extension.h>

#include <pybind11/stl.h>

#include "core/partition.h"
#include "core/schedule.h"
#include "core/simulator.h"
#include "core/topology.h"
#include "runtime/p2p.h"

namespace py = pybind11;
using dpe::core::Topology;
namespace core = dpe::core;

namespace {

core::ScheduleSpec make_spec(const std::string& kind, int64_t micro_batches, int64_t stages, int64_t chunks) {
  core::ScheduleSpec spec;
  spec.kind = core::parse_schedule_kind(kind);
  spec.micro_batches = micro_batches;
  spec.stages = stages;
  spec.chunks = chunks;
  core::validate(spec);
  return spec;
}

// Instructions cross into Python as (op, buffer_id, micro_batch, chunk) tuples.
py::list steps_to_python(const core::Steps& steps) {
  py::list out;
  for (const auto& step : steps) {
    py::list cmds;
    for (const auto& in : step) {
      cmds.append(py::make_tuple(static_cast<int>(in.op), in.buffer_id, in.micro_batch, in.chunk));
    }
    out.append(std::move(cmds));
  }
  return out;
}

core::Steps steps_from_python(const std::vector<std::vector<std::tuple<int, int, int, int>>>& steps) {
  core::Steps out;
  for (const auto& step : steps) {
    core::Step cmds;
    for (const auto& [op, buffer, mb, chunk] : step) {
      if (op < 0 || op >= core::kNumOps) throw std::invalid_argument("unknown instruction op " + std::to_string(op));
      cmds.push_back(core::Instruction{static_cast<core::Op>(op), buffer, mb, chunk});
    }
    out.push_back(std::move(cmds));
  }
  return out;
}

py::dict result_to_python(const core::SimulationResult& r) {
  py::dict d;
  d["makespan"] = r.makespan;
  d["busy"] = r.busy;
  d["idle_fraction"] = r.idle_fraction;
  d["bubble_fraction"] = r.bubble_fraction();
  d["peak_activations"] = r.peak_activations;
  d["peak_buffers"] = r.peak_buffers;
  py::list timeline;
  for (const auto& stage : r.timeline) {
    py::list ops;
    for (const auto& t : stage) ops.append(py::make_tuple(t.start, t.end, static_cast<int>(t.op), t.micro_batch, t.chunk));
    timeline.append(std::move(ops));
  }
  d["timeline"] = timeline;
  return d;
}

core::OpCosts make_costs(double forward, double backward_input, double backward_weight, double send_latency) {
  return core::OpCosts{forward, backward_input, backward_weight, send_latency};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "deepspeed_pipe_ext compiled core: partition solver and topology rank math";

  m.def("partition_uniform", &dpe::core::partition_uniform, py::arg("num_items"), py::arg("num_parts"),
        py::call_guard<py::gil_scoped_release>());
  m.def("partition_balanced", &dpe::core::partition_balanced, py::arg("weights"), py::arg("num_parts"),
        py::call_guard<py::gil_scoped_release>());
  m.def("partition_minmax", &dpe::core::partition_minmax, py::arg("weights"), py::arg("num_parts"),
        py::call_guard<py::gil_scoped_release>());
  m.def("max_part_weight", &dpe::core::max_part_weight, py::arg("weights"), py::arg("parts"));
  m.def("check_weights", &dpe::core::check_weights, py::arg("weights"));
  m.def("prime_factors", &dpe::core::prime_factors, py::arg("n"));

  py::register_exception<core::ScheduleError>(m, "ScheduleError", PyExc_RuntimeError);

  std::vector<std::string> op_names;
  for (int i = 0; i < core::kNumOps; ++i) op_names.push_back(core::op_name(static_cast<core::Op>(i)));
  m.attr("OP_NAMES") = op_names;
  m.attr("SCHEDULE_KINDS") = core::schedule_kind_names();

  m.def(
      "schedule_steps",
      [](const std::string& kind, int64_t micro_batches, int64_t stages, int64_t stage_id, int64_t chunks) {
        const auto spec = make_spec(kind, micro_batches, stages, chunks);
        core::Steps steps;
        {
          py::gil_scoped_release release;
          steps = core::generate_steps(spec, stage_id);
        }
        return steps_to_python(steps);
      },
      py::arg("kind"), py::arg("micro_batches"), py::arg("stages"), py::arg("stage_id"), py::arg("chunks") = 1);
  m.def(
      "schedule_all_steps",
      [](const std::string& kind, int64_t micro_batches, int64_t stages, int64_t chunks) {
        const auto spec = make_spec(kind, micro_batches, stages, chunks);
        std::vector<core::Steps> all;
        {
          py::gil_scoped_release release;
          all = core::generate_all_steps(spec);
        }
        py::list out;
        for (const auto& steps : all) out.append(steps_to_python(steps));
        return out;
      },
      py::arg("kind"), py::arg("micro_batches"), py::arg("stages"), py::arg("chunks") = 1);
  m.def(
      "count_all_instructions",
      [](const std::string& kind, int64_t micro_batches, int64_t stages, int64_t chunks) {
        // Generation alone, nothing crosses into Python: what the C++ executor pays.
        const auto spec = make_spec(kind, micro_batches, stages, chunks);
        py::gil_scoped_release release;
        int64_t count = 0;
        for (const auto& steps : core::generate_all_steps(spec))
          for (const auto& step : steps) count += static_cast<int64_t>(step.size());
        return count;
      },
      py::arg("kind"), py::arg("micro_batches"), py::arg("stages"), py::arg("chunks") = 1);
  m.def(
      "num_pipe_buffers",
      [](const std::string& kind, int64_t micro_batches, int64_t stages, int64_t stage_id, int64_t chunks) {
        return core::num_pipe_buffers(make_spec(kind, micro_batches, stages, chunks), stage_id);
      },
      py::arg("kind"), py::arg("micro_batches"), py::arg("stages"), py::arg("stage_id"), py::arg("chunks") = 1);
  m.def(
      "simulate",
      [](const std::string& kind, int64_t micro_batches, int64_t stages, int64_t chunks, double forward,
         double backward_input, double backward_weight, double send_latency) {
        const auto spec = make_spec(kind, micro_batches, stages, chunks);
        const auto costs = make_costs(forward, backward_input, backward_weight, send_latency);
        core::SimulationResult r;
        {
          py::gil_scoped_release release;
          r = core::simulate(spec, costs);
        }
        return result_to_python(r);
      },
      py::arg("kind"), py::arg("micro_batches"), py::arg("stages"), py::arg("chunks") = 1, py::arg("forward") = 1.0,
      py::arg("backward_input") = 1.0, py::arg("backward_weight") = 1.0, py::arg("send_latency") = 0.0);
  m.def(
      "simulate_streams",
      [](const std::vector<std::vector<std::vector<std::tuple<int, int, int, int>>>>& streams, int64_t micro_batches,
         int64_t chunks, const std::vector<int64_t>& num_buffers, double forward, double backward_input,
         double backward_weight, double send_latency) {
        std::vector<core::Steps> converted;
        for (const auto& s : streams) converted.push_back(steps_from_python(s));
        return result_to_python(core::simulate(converted, micro_batches, chunks, num_buffers,
                                               make_costs(forward, backward_input, backward_weight, send_latency)));
      },
      py::arg("streams"), py::arg("micro_batches"), py::arg("chunks"), py::arg("num_buffers"),
      py::arg("forward") = 1.0, py::arg("backward_input") = 1.0, py::arg("backward_weight") = 1.0,
      py::arg("send_latency") = 0.0);

  py::class_<dpe::runtime::P2P>(m, "P2P")
      .def(py::init([](c10::intrusive_ptr<c10d::ProcessGroup> group, double timeout_s, std::string self_name,
                       bool dynamic_shapes) {
             return std::make_unique<dpe::runtime::P2P>(
                 std::move(group), std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000)),
                 std::move(self_name), dynamic_shapes);
           }),
           py::arg("group"), py::arg("timeout_s"), py::arg("self_name"), py::arg("dynamic_shapes") = false)
      .def("send", &dpe::runtime::P2P::send, py::arg("tensors"), py::arg("peer"), py::arg("tag"), py::arg("what"),
           py::call_guard<py::gil_scoped_release>())
      .def("recv", &dpe::runtime::P2P::recv, py::arg("peer"), py::arg("tag"), py::arg("what"),
           py::call_guard<py::gil_scoped_release>())
      .def("wait_sends", &dpe::runtime::P2P::wait_sends, py::call_guard<py::gil_scoped_release>())
      .def("reset", &dpe::runtime::P2P::reset, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("rank", &dpe::runtime::P2P::rank)
      .def_property_readonly("size", &dpe::runtime::P2P::size);

  py::class_<Topology>(m, "Topology")
      .def(py::init<std::vector<std::string>, std::vector<int64_t>>(), py::arg("axes"), py::arg("dims"))
      .def_property_readonly("axes", &Topology::axes)
      .def_property_readonly("dims", &Topology::dims)
      .def("world_size", &Topology::world_size)
      .def("axis_index", &Topology::axis_index, py::arg("axis"))
      .def("dim", &Topology::dim, py::arg("axis"))
      .def("rank", &Topology::rank, py::arg("coord"))
      .def("coord", &Topology::coord, py::arg("rank"))
      .def("axis_comm_lists", &Topology::axis_comm_lists, py::arg("axis"))
      .def("filter_match", &Topology::filter_match, py::arg("partial"))
      .def("axis_list", &Topology::axis_list, py::arg("axis"), py::arg("idx"))
      .def("rank_repr", &Topology::rank_repr, py::arg("rank"), py::arg("omit_axes"), py::arg("inner_sep"),
           py::arg("outer_sep"))
      .def("ring_pairs", &Topology::ring_pairs, py::arg("axis"));
}
