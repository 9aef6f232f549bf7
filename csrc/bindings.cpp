// The one bindings file: exposes csrc/core (and later csrc/runtime) to Python
// as deepspeed_pipe_ext._C. pybind11 maps std::invalid_argument to ValueError.
#include <torch/extension.h>

#include <pybind11/stl.h>

#include <optional>

#include "core/comm_order.h"
#include "core/partition.h"
#include "core/schedule.h"
#include "core/simulator.h"
#include "core/topology.h"
#include "runtime/checkpoint.h"
#include "runtime/crash_stack.h"
#include "runtime/executor.h"
#include "runtime/p2p.h"
#include "runtime/split_backward.h"

namespace py = pybind11;
using dpe::core::Topology;
namespace core = dpe::core;

namespace {

// `layout` "" is the schedule's own (v for zb-v, else interleaved).
core::ChunkLayout layout_for(const std::string& layout, core::ScheduleKind kind) {
  return layout.empty() ? core::layout_of(kind) : core::parse_chunk_layout(layout);
}

core::ScheduleSpec make_spec(const std::string& kind, int64_t micro_batches, int64_t stages, int64_t chunks,
                             const std::string& layout = "") {
  core::ScheduleSpec spec;
  spec.kind = core::parse_schedule_kind(kind);
  spec.micro_batches = micro_batches;
  spec.stages = stages;
  spec.chunks = chunks;
  spec.layout = layout_for(layout, spec.kind);
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

// Rows of action tokens ("0F3"), one row per rank, as compute orders.
std::vector<core::ComputeOrder> orders_from_python(const std::vector<std::vector<std::string>>& rows,
                                                   core::ChunkLayout layout) {
  const int64_t stages = static_cast<int64_t>(rows.size());
  if (stages < 1) throw std::invalid_argument("a compute order needs one row of actions per rank; got none");
  std::vector<core::ComputeOrder> orders(stages);
  for (int64_t r = 0; r < stages; ++r)
    for (const auto& token : rows[r]) orders[r].push_back(core::parse_action(token, stages, r, layout));
  return orders;
}

core::OpCosts make_costs(double forward, double backward_input, double backward_weight, double send_latency) {
  return core::OpCosts{forward, backward_input, backward_weight, send_latency};
}

// A stage's value in Python: a tensor, or a tuple of tensors.
py::object activation_to_python(const dpe::runtime::Activation& a) {
  if (!a.is_tuple && a.tensors.size() == 1) return py::cast(a.tensors[0]);
  py::tuple out(a.tensors.size());
  for (size_t i = 0; i < a.tensors.size(); ++i) out[i] = py::cast(a.tensors[i]);
  return std::move(out);
}

dpe::runtime::Activation activation_from_python(const py::handle& obj, const char* what) {
  dpe::runtime::Activation a;
  if (obj.is_none()) return a;
  if (THPVariable_Check(obj.ptr())) {
    a.tensors.push_back(py::cast<at::Tensor>(obj));
    return a;
  }
  if (py::isinstance<py::tuple>(obj) || py::isinstance<py::list>(obj)) {
    a.is_tuple = true;
    for (const auto& item : obj) {
      if (!THPVariable_Check(item.ptr())) {
        throw py::type_error(std::string(what) + " must be a tensor or a tuple of tensors; found a " +
                             std::string(py::str(py::type::of(item).attr("__name__"))) + " in the tuple");
      }
      a.tensors.push_back(py::cast<at::Tensor>(item));
    }
    return a;
  }
  throw py::type_error(std::string(what) + " must be a tensor or a tuple of tensors, got " +
                       std::string(py::str(py::type::of(obj).attr("__name__"))));
}

// A Python value the executor keeps for a micro-batch (labels, a loss); None
// is kept as nothing. Released on whatever thread drops it, under the GIL.
dpe::runtime::Held hold(const py::handle& obj) {
  if (obj.is_none()) return nullptr;
  return dpe::runtime::Held(new py::object(py::reinterpret_borrow<py::object>(obj)), [](void* p) {
    py::gil_scoped_acquire gil;
    delete static_cast<py::object*>(p);
  });
}

py::object held(const dpe::runtime::Held& value) {
  return value ? *static_cast<const py::object*>(value.get()) : py::none();
}

// A Python callable the autograd graph may hold and drop on any thread:
// calls and the final release take the GIL.
dpe::runtime::GroupForward group_forward_from_python(py::function fn) {
  std::shared_ptr<py::function> held(new py::function(std::move(fn)), [](py::function* f) {
    py::gil_scoped_acquire gil;
    delete f;
  });
  return [held](const std::vector<at::Tensor>& inputs) {
    py::gil_scoped_acquire gil;
    py::tuple args(inputs.size());
    for (size_t i = 0; i < inputs.size(); ++i) args[i] = py::cast(inputs[i]);
    return activation_from_python((*held)(*args), "a checkpointed group's output").tensors;
  };
}

// References a tensor's Python object holds once Python code let go of it
// (torch's PyObject preservation): measured once, on a tensor of our own.
int64_t python_wrapper_references() {
  static const int64_t count = [] {
    at::Tensor t = at::empty({1});
    { py::object wrapper = py::cast(t); }
    return static_cast<int64_t>(t.use_count()) - 1;
  }();
  return count;
}

py::list trace_to_python(const core::CommTrace& trace) {
  py::list out;
  for (const auto& ev : trace) {
    if (ev.is_wait) {
      out.append(py::make_tuple("wait", ev.op, -1, ""));
    } else {
      out.append(py::make_tuple(ev.kind == core::CommKind::Send ? "send" : "recv", ev.peer, ev.bytes, ev.label));
    }
  }
  return out;
}

core::CommTrace trace_from_python(const std::vector<std::tuple<std::string, int, int64_t, std::string>>& events) {
  core::CommTrace trace;
  for (const auto& [kind, who, bytes, label] : events) {
    if (kind == "wait") {
      trace.push_back(core::waited(who));
    } else if (kind == "send" || kind == "recv") {
      trace.push_back(core::issued(kind == "send" ? core::CommKind::Send : core::CommKind::Recv, who, bytes, label));
    } else {
      throw std::invalid_argument("trace event kind must be 'send', 'recv' or 'wait', got '" + kind + "'");
    }
  }
  return trace;
}

core::TransferOrder parse_transfer_order(const std::string& name) {
  if (name == "pair") return core::TransferOrder::PairOrder;
  if (name == "program") return core::TransferOrder::ProgramOrder;
  if (name == "channel-free") return core::TransferOrder::AsSoonAsChannelFree;
  throw std::invalid_argument("transfer order must be 'pair' (the executor's), 'program' or 'channel-free', got '" +
                              name + "'");
}

py::dict check_to_python(const core::CommCheck& c) {
  py::dict d;
  d["ok"] = c.ok;
  d["operations"] = c.operations;
  d["report"] = c.report;
  return d;
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

  m.def("print_native_stack_on_crash", &dpe::runtime::print_native_stack_on_crash,
        "Debugging aid: on a fatal signal (a segmentation fault, an abort) print the native stack to stderr, then "
        "run the handler installed before (call faulthandler.enable() first for the Python stacks too).");

  py::register_exception<core::ScheduleError>(m, "ScheduleError", PyExc_RuntimeError);

  std::vector<std::string> op_names;
  for (int i = 0; i < core::kNumOps; ++i) op_names.push_back(core::op_name(static_cast<core::Op>(i)));
  m.attr("OP_NAMES") = op_names;
  m.attr("SCHEDULE_KINDS") = core::schedule_kind_names();

  m.def(
      "virtual_stage_of",
      [](int64_t rank, int64_t chunk, int64_t stages, const std::string& layout) {
        return core::virtual_stage_of(rank, chunk, stages, core::parse_chunk_layout(layout));
      },
      py::arg("rank"), py::arg("chunk"), py::arg("stages"), py::arg("layout"),
      "The virtual stage (part of the model) of chunk `chunk` of rank `rank` in `layout`.");
  m.def(
      "place_of_virtual",
      [](int64_t virtual_stage, int64_t stages, const std::string& layout) {
        return py::make_tuple(core::rank_of_virtual(virtual_stage, stages, core::parse_chunk_layout(layout)),
                              core::chunk_of_virtual(virtual_stage, stages));
      },
      py::arg("virtual_stage"), py::arg("stages"), py::arg("layout"),
      "(rank, chunk) holding virtual stage `virtual_stage` in `layout`.");
  m.def(
      "schedule_steps",
      [](const std::string& kind, int64_t micro_batches, int64_t stages, int64_t stage_id, int64_t chunks,
         const std::string& layout) {
        const auto spec = make_spec(kind, micro_batches, stages, chunks, layout);
        core::Steps steps;
        {
          py::gil_scoped_release release;
          steps = core::generate_steps(spec, stage_id);
        }
        return steps_to_python(steps);
      },
      py::arg("kind"), py::arg("micro_batches"), py::arg("stages"), py::arg("stage_id"), py::arg("chunks") = 1,
      py::arg("layout") = "");
  m.def(
      "schedule_all_steps",
      [](const std::string& kind, int64_t micro_batches, int64_t stages, int64_t chunks, const std::string& layout) {
        const auto spec = make_spec(kind, micro_batches, stages, chunks, layout);
        std::vector<core::Steps> all;
        {
          py::gil_scoped_release release;
          all = core::generate_all_steps(spec);
        }
        py::list out;
        for (const auto& steps : all) out.append(steps_to_python(steps));
        return out;
      },
      py::arg("kind"), py::arg("micro_batches"), py::arg("stages"), py::arg("chunks") = 1, py::arg("layout") = "");
  m.def(
      "count_all_instructions",
      [](const std::string& kind, int64_t micro_batches, int64_t stages, int64_t chunks, const std::string& layout) {
        // Generation alone, nothing crosses into Python: what the C++ executor pays.
        const auto spec = make_spec(kind, micro_batches, stages, chunks, layout);
        py::gil_scoped_release release;
        int64_t count = 0;
        for (const auto& steps : core::generate_all_steps(spec))
          for (const auto& step : steps) count += static_cast<int64_t>(step.size());
        return count;
      },
      py::arg("kind"), py::arg("micro_batches"), py::arg("stages"), py::arg("chunks") = 1, py::arg("layout") = "");
  m.def(
      "num_pipe_buffers",
      [](const std::string& kind, int64_t micro_batches, int64_t stages, int64_t stage_id, int64_t chunks,
         const std::string& layout) {
        return core::num_pipe_buffers(make_spec(kind, micro_batches, stages, chunks, layout), stage_id);
      },
      py::arg("kind"), py::arg("micro_batches"), py::arg("stages"), py::arg("stage_id"), py::arg("chunks") = 1,
      py::arg("layout") = "");
  m.def(
      "simulate",
      [](const std::string& kind, int64_t micro_batches, int64_t stages, int64_t chunks, double forward,
         double backward_input, double backward_weight, double send_latency, const std::string& layout) {
        const auto spec = make_spec(kind, micro_batches, stages, chunks, layout);
        const auto costs = make_costs(forward, backward_input, backward_weight, send_latency);
        core::SimulationResult r;
        {
          py::gil_scoped_release release;
          r = core::simulate(spec, costs);
        }
        return result_to_python(r);
      },
      py::arg("kind"), py::arg("micro_batches"), py::arg("stages"), py::arg("chunks") = 1, py::arg("forward") = 1.0,
      py::arg("backward_input") = 1.0, py::arg("backward_weight") = 1.0, py::arg("send_latency") = 0.0,
      py::arg("layout") = "");
  m.def(
      "simulate_pass_costs",
      [](const std::string& kind, int64_t micro_batches, int64_t stages, int64_t chunks,
         const std::vector<std::vector<std::tuple<double, double, double>>>& pass_costs, double send_latency,
         const std::string& layout) {
        const auto spec = make_spec(kind, micro_batches, stages, chunks, layout);
        std::vector<std::vector<core::OpCosts>> table;
        for (const auto& stage : pass_costs) {
          table.emplace_back();
          for (const auto& [forward, backward_input, backward_weight] : stage)
            table.back().push_back(core::OpCosts{forward, backward_input, backward_weight, 0.0});
        }
        core::SimulationResult r;
        {
          py::gil_scoped_release release;
          r = core::simulate(spec, table, send_latency);
        }
        return result_to_python(r);
      },
      py::arg("kind"), py::arg("micro_batches"), py::arg("stages"), py::arg("chunks"), py::arg("pass_costs"),
      py::arg("send_latency") = 0.0, py::arg("layout") = "",
      "Simulates with measured costs: pass_costs[stage][chunk] = (forward, backward_input, backward_weight) of one "
      "pass of that chunk.");
  m.def(
      "simulate_streams",
      [](const std::vector<std::vector<std::vector<std::tuple<int, int, int, int>>>>& streams, int64_t micro_batches,
         int64_t chunks, const std::vector<int64_t>& num_buffers, double forward, double backward_input,
         double backward_weight, double send_latency, const std::string& layout) {
        std::vector<core::Steps> converted;
        for (const auto& s : streams) converted.push_back(steps_from_python(s));
        return result_to_python(core::simulate(converted, micro_batches, chunks, num_buffers,
                                               make_costs(forward, backward_input, backward_weight, send_latency),
                                               core::parse_chunk_layout(layout)));
      },
      py::arg("streams"), py::arg("micro_batches"), py::arg("chunks"), py::arg("num_buffers"),
      py::arg("forward") = 1.0, py::arg("backward_input") = 1.0, py::arg("backward_weight") = 1.0,
      py::arg("send_latency") = 0.0, py::arg("layout") = "interleaved");

  m.def(
      "compute_order",
      [](const std::string& kind, int64_t micro_batches, int64_t stages, int64_t chunks, const std::string& layout) {
        const auto spec = make_spec(kind, micro_batches, stages, chunks, layout);
        std::vector<std::vector<std::string>> rows;
        const auto orders = core::compute_orders_of(core::generate_all_steps(spec));
        for (size_t r = 0; r < orders.size(); ++r) {
          rows.emplace_back();
          for (const auto& op : orders[r]) rows.back().push_back(core::format_action(op, stages, r, spec.layout));
        }
        return rows;
      },
      py::arg("kind"), py::arg("micro_batches"), py::arg("stages"), py::arg("chunks") = 1, py::arg("layout") = "",
      "A schedule's compute passes per rank, as action tokens (\"0F3\").");
  m.def(
      "lower_compute_order",
      [](const std::vector<std::vector<std::string>>& rows, int64_t micro_batches, int64_t chunks,
         const std::string& layout) {
        std::vector<int64_t> buffers;
        const auto placed = core::parse_chunk_layout(layout);
        const auto all = core::lower_compute_orders(orders_from_python(rows, placed), micro_batches, &buffers, chunks,
                                                    placed);
        py::list streams;
        for (const auto& steps : all) streams.append(steps_to_python(steps));
        return py::make_tuple(streams, buffers);
      },
      py::arg("rows"), py::arg("micro_batches"), py::arg("chunks") = 1, py::arg("layout") = "interleaved",
      "Every rank's instruction stream for rows of action tokens, and its buffer count.");
  m.def(
      "simulate_compute_order",
      [](const std::vector<std::vector<std::string>>& rows, int64_t micro_batches, double forward,
         double backward_input, double backward_weight, double send_latency, int64_t chunks,
         const std::string& layout) {
        std::vector<int64_t> buffers;
        const auto placed = core::parse_chunk_layout(layout);
        const auto all = core::lower_compute_orders(orders_from_python(rows, placed), micro_batches, &buffers, chunks,
                                                    placed);
        core::SimulationResult r;
        {
          py::gil_scoped_release release;
          r = core::simulate(all, micro_batches, chunks, buffers,
                             make_costs(forward, backward_input, backward_weight, send_latency), placed);
        }
        return result_to_python(r);
      },
      py::arg("rows"), py::arg("micro_batches"), py::arg("forward") = 1.0, py::arg("backward_input") = 1.0,
      py::arg("backward_weight") = 1.0, py::arg("send_latency") = 0.0, py::arg("chunks") = 1,
      py::arg("layout") = "interleaved");

  m.def(
      "check_nccl_order",
      [](const std::vector<std::vector<std::tuple<std::string, int, int64_t, std::string>>>& ranks,
         bool one_stream_per_rank) {
        std::vector<core::CommTrace> traces;
        for (const auto& r : ranks) traces.push_back(trace_from_python(r));
        core::CommCheck result;
        {
          py::gil_scoped_release release;
          result = core::check_nccl_order(traces, one_stream_per_rank);
        }
        return check_to_python(result);
      },
      "Replays every rank's trace (rank i: traces[i], as P2P.trace records it) under NCCL's point-to-point "
      "rules (one in-order queue per pair of ranks, or per rank with one_stream_per_rank); returns "
      "{'ok', 'operations', 'report'} (the report names the ranks and operations stuck).",
      py::arg("traces"), py::arg("one_stream_per_rank") = false);
  m.def(
      "check_schedule_transfers",
      [](const std::string& kind, int64_t micro_batches, int64_t stages, const std::string& order, bool dynamic_shapes,
         bool one_stream_per_rank, int64_t chunks) {
        const auto spec = make_spec(kind, micro_batches, stages, chunks);
        const auto o = parse_transfer_order(order);
        core::CommCheck result;
        {
          py::gil_scoped_release release;
          result = core::check_schedule_transfers(spec, o, dynamic_shapes, one_stream_per_rank);
        }
        return check_to_python(result);
      },
      "Plans every stage's transfers as the executor would ('pair'), or in another order, and checks them "
      "under NCCL's rules.",
      py::arg("kind"), py::arg("micro_batches"), py::arg("stages"), py::arg("order") = "pair",
      py::arg("dynamic_shapes") = false, py::arg("one_stream_per_rank") = false, py::arg("chunks") = 1);

  py::class_<dpe::runtime::P2P>(m, "P2P")
      .def(py::init([](c10::intrusive_ptr<c10d::ProcessGroup> group, double timeout_s, std::string self_name,
                       bool dynamic_shapes, const std::string& device, std::string peer_label) {
             return std::make_unique<dpe::runtime::P2P>(
                 std::move(group), std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000)),
                 std::move(self_name), dynamic_shapes, at::Device(device), std::move(peer_label));
           }),
           py::arg("group"), py::arg("timeout_s"), py::arg("self_name"), py::arg("dynamic_shapes") = false,
           py::arg("device") = "cpu", py::arg("peer_label") = "rank")
      .def(
          "send",
          [](dpe::runtime::P2P& self, py::object value, int peer, int tag, const std::string& what) {
            auto a = activation_from_python(value, "a sent value");
            py::gil_scoped_release release;
            self.send(a, peer, tag, [what] { return what; });
          },
          py::arg("value"), py::arg("peer"), py::arg("tag"), py::arg("what"))
      .def(
          "recv",
          [](dpe::runtime::P2P& self, int peer, int tag, const std::string& what) {
            dpe::runtime::Activation a;
            {
              py::gil_scoped_release release;
              a = self.recv(peer, tag, [&what] { return what; });
            }
            return activation_to_python(a);
          },
          py::arg("peer"), py::arg("tag"), py::arg("what"))
      .def("post_recv", &dpe::runtime::P2P::post_recv, py::arg("peer"), py::arg("tag"),
           py::call_guard<py::gil_scoped_release>(),
           "Starts the next receive on (peer, tag) into buffers of its own; False before the channel's meta is known.")
      .def_property_readonly("pending_sends", &dpe::runtime::P2P::pending_sends)
      .def("wait_sends", &dpe::runtime::P2P::wait_sends, py::call_guard<py::gil_scoped_release>())
      .def("abort", &dpe::runtime::P2P::abort, py::arg("reason"), py::call_guard<py::gil_scoped_release>(),
           "Stops the wait in progress (from any thread) and every later one, with an error giving `reason`.")
      .def("reset", &dpe::runtime::P2P::reset, py::call_guard<py::gil_scoped_release>())
      .def("set_single_tag", &dpe::runtime::P2P::set_single_tag, py::arg("on"),
           "Every transfer on tag 0, so that gloo matches them in issue order as NCCL does (tests).")
      .def("set_recording", &dpe::runtime::P2P::set_recording, py::arg("on"),
           "Records every operation issued and waited for from now on (see trace).")
      .def_property_readonly(
          "trace", [](const dpe::runtime::P2P& self) { return trace_to_python(self.trace()); },
          "The operations recorded: ('send'|'recv', peer, bytes, what) or ('wait', operation index, -1, '').")
      .def_property_readonly("stages_through_host", &dpe::runtime::P2P::stages_through_host)
      .def_property_readonly("rank", &dpe::runtime::P2P::rank)
      .def_property_readonly("size", &dpe::runtime::P2P::size);

  // One stage's instruction stream, buffer count and transfer order for a
  // schedule configuration: built once (the engine caches it), run many times.
  struct StageProgram {
    core::Steps steps;
    int64_t num_buffers;
    core::TransferPlan plan;

    // Plans every stage's transfers (the pair order both sides of every pair
    // agree on) and keeps stage_id's part; `what` names the schedule in errors.
    static StageProgram make(std::vector<core::Steps> all, std::vector<int64_t> buffers, int64_t micro_batches,
                             int64_t chunks, core::ChunkLayout layout, int64_t stage_id, bool dynamic_shapes,
                             const std::string& what, bool check_nccl = false) {
      std::vector<core::TransferPlan> plans;
      try {
        plans = core::plan_transfers(all, micro_batches, chunks, buffers, core::TransferOrder::PairOrder,
                                     dynamic_shapes, layout);
      } catch (const std::logic_error& err) {
        // Some interleaved shapes cannot be put in an order both sides of a pair agree on yet.
        throw std::invalid_argument(
            what + " with " + std::to_string(all.size()) + " stages, " + std::to_string(chunks) +
            " model chunk(s) per rank and " + std::to_string(micro_batches) + " micro-batches" +
            (dynamic_shapes ? " and dynamic shapes" : "") + " has no transfer order both sides of every pair of "
            "ranks agree on (" + err.what() + "): use a number of micro-batches that is a multiple of the stages" +
            (dynamic_shapes ? ", or fixed shapes between stages" : ""));
      }
      if (check_nccl) {
        std::vector<core::CommTrace> traces;
        for (size_t s = 0; s < all.size(); ++s)
          traces.push_back(
              core::trace_of(all[s], plans[s], static_cast<int64_t>(s), all.size(), dynamic_shapes, layout));
        const core::CommCheck check = core::check_nccl_order(traces);
        if (!check.ok) throw std::invalid_argument(what + ": its transfers would hang under NCCL's rules: " + check.report);
      }
      return StageProgram{std::move(all[stage_id]), buffers[stage_id], std::move(plans[stage_id])};
    }
  };
  py::class_<StageProgram>(m, "StageProgram")
      .def(py::init([](const std::string& kind, int64_t micro_batches, int64_t stages, int64_t stage_id,
                       bool dynamic_shapes, int64_t chunks, const std::string& layout) {
             const auto spec = make_spec(kind, micro_batches, stages, chunks, layout);
             core::validate_stage(spec, stage_id);
             py::gil_scoped_release release;
             std::vector<int64_t> buffers;
             auto all = core::generate_all_steps(spec, &buffers);
             // Several chunks with dynamic shapes can deadlock under NCCL's ordering (the core tests show
             // which): those are checked here and refused; the rest are proven by the core tests' sweep.
             return StageProgram::make(std::move(all), std::move(buffers), micro_batches, chunks, spec.layout,
                                       stage_id, dynamic_shapes, "schedule '" + kind + "'",
                                       chunks > 1 && dynamic_shapes);
           }),
           py::arg("kind"), py::arg("micro_batches"), py::arg("stages"), py::arg("stage_id"),
           py::arg("dynamic_shapes") = false, py::arg("chunks") = 1, py::arg("layout") = "")
      .def_static(
          "from_compute_order",
          [](const std::vector<std::vector<std::string>>& rows, int64_t micro_batches, int64_t stage_id,
             bool dynamic_shapes, int64_t chunks, const std::string& layout) {
            const auto placed = core::parse_chunk_layout(layout);
            const auto orders = orders_from_python(rows, placed);
            if (stage_id < 0 || stage_id >= static_cast<int64_t>(orders.size())) {
              throw std::invalid_argument("stage_id " + std::to_string(stage_id) + " is out of range for a "
                                          "compute order of " + std::to_string(orders.size()) + " ranks");
            }
            py::gil_scoped_release release;
            std::vector<int64_t> buffers;
            auto all = core::lower_compute_orders(orders, micro_batches, &buffers, chunks, placed);
            // Proven before it runs: throws ScheduleError naming the rank, step and instruction that cannot
            // proceed; then its transfers are checked under NCCL's rules too.
            core::simulate(all, micro_batches, chunks, buffers, core::OpCosts{1.0, 1.0, 1.0, 0.0}, placed);
            return StageProgram::make(std::move(all), std::move(buffers), micro_batches, chunks, placed, stage_id,
                                      dynamic_shapes, "the compute order", /*check_nccl=*/true);
          },
          py::arg("rows"), py::arg("micro_batches"), py::arg("stage_id"), py::arg("dynamic_shapes") = false,
          py::arg("chunks") = 1, py::arg("layout") = "interleaved",
          "A stage's program for a compute order (rows of action tokens, one per rank), proven by the simulator "
          "first.")
      .def_readonly("num_buffers", &StageProgram::num_buffers)
      .def_property_readonly("steps", [](const StageProgram& p) { return steps_to_python(p.steps); })
      .def_property_readonly(
          "receives_after_meta",
          [](const StageProgram& p) {
            int64_t n = 0;
            for (const auto& at : p.plan.before)
              for (const auto& a : at) n += a.kind == core::TransferAction::Kind::PostRecvAfterMeta;
            return n;
          },
          "Receives this stage takes ahead of another transfer with the same peer whose meta it receives first "
          "(their shapes not known yet; NCCL ordering).")
      .def_property_readonly(
          "posted_receives",
          [](const StageProgram& p) {
            int64_t n = 0;
            for (const auto& at : p.plan.before)
              n += static_cast<int64_t>(at.size());
            return n;
          },
          "Receives this stage posts ahead of their instruction.");

  m.def(
      "run_stage",
      [](dpe::runtime::P2P* p2p, const StageProgram& program, int64_t stages, int64_t stage_id, int tag_base,
         py::object callbacks, bool release_sent_outputs,
         const dpe::runtime::TensorParallelSplit* split, bool split_activations, bool split_grads, int64_t chunks,
         const std::string& layout) {
        const core::ChunkLayout placed = core::parse_chunk_layout(layout);
        // The callbacks object's methods, by name; the optional ones may be missing or None.
        auto required = [&callbacks](const char* name) {
          py::object fn = py::getattr(callbacks, name, py::none());
          if (fn.is_none() || !PyCallable_Check(fn.ptr())) {
            throw py::type_error(std::string("run_stage: the callbacks object has no callable '") + name + "'");
          }
          return py::reinterpret_borrow<py::function>(fn);
        };
        auto optional = [&callbacks](const char* name) -> std::optional<py::function> {
          py::object fn = py::getattr(callbacks, name, py::none());
          if (fn.is_none()) return std::nullopt;
          return py::reinterpret_borrow<py::function>(fn);
        };
        // The rank holding the last virtual stage (rank 0 in the V layout).
        const bool last_stage = core::rank_of_virtual(stages * chunks - 1, stages, placed) == stage_id;
        py::function load = required("load"), reduce_tied_grads = required("reduce_tied_grads"),
                     reduce_grads = required("reduce_grads"), optimizer_step = required("optimizer_step");
        // The last (virtual) stage computes the loss; the others pass outputs on.
        std::optional<py::function> forward, forward_loss;
        if (!last_stage || chunks > 1) forward = required("forward");
        if (last_stage) forward_loss = required("forward_loss");
        std::optional<py::function> before_backward = optional("before_backward"),
                                    after_backward = optional("after_backward"),
                                    loss_to_differentiate = optional("loss_to_differentiate"),
                                    backward_loss = optional("backward_loss");
        if (last_stage && !backward_loss) required("backward_loss");
        dpe::runtime::StageCallbacks cb;
        cb.load = [&]() {
          py::gil_scoped_acquire gil;
          py::object loaded = load();
          if (!py::isinstance<py::tuple>(loaded) || py::len(loaded) != 2) {
            throw py::type_error("run_stage: load() must return (inputs, labels), got " +
                                 std::string(py::str(py::type::of(loaded).attr("__name__"))));
          }
          auto pair = loaded.cast<py::tuple>();
          return dpe::runtime::LoadedMicroBatch{
              activation_from_python(pair[0], "the loaded micro-batch's inputs"), hold(pair[1])};
        };
        if (forward_loss) {
          cb.forward_loss = [&fn = *forward_loss](const dpe::runtime::Activation& inputs,
                                                  const dpe::runtime::Held& labels) {
            py::gil_scoped_acquire gil;
            return hold(fn(activation_to_python(inputs), held(labels)));
          };
        }
        if (forward) {
          cb.forward = [&fn = *forward](const dpe::runtime::Activation& inputs, int64_t chunk) {
            py::gil_scoped_acquire gil;
            return activation_from_python(fn(activation_to_python(inputs), chunk), "a stage's output");
          };
        }
        auto plain = [](py::function& fn) {
          return [&fn]() {
            py::gil_scoped_acquire gil;
            fn();
          };
        };
        if (backward_loss) {
          cb.backward_loss = [&fn = *backward_loss](const dpe::runtime::Held& loss) {
            py::gil_scoped_acquire gil;
            fn(held(loss));
          };
        }
        cb.reduce_tied_grads = plain(reduce_tied_grads);
        cb.reduce_grads = plain(reduce_grads);
        cb.optimizer_step = plain(optimizer_step);
        if (before_backward) cb.before_backward = plain(*before_backward);
        if (after_backward) cb.after_backward = plain(*after_backward);
        if (loss_to_differentiate) {
          cb.loss_to_differentiate = [&fn = *loss_to_differentiate](const dpe::runtime::Held& held_loss) {
            py::gil_scoped_acquire gil;
            py::object loss = fn(held(held_loss));
            TORCH_CHECK(THPVariable_Check(loss.ptr()), "the loss to differentiate must be a tensor, got ",
                        std::string(py::str(py::type::of(loss).attr("__name__"))));
            return THPVariable_Unpack(loss.ptr());
          };
        }
        dpe::runtime::Executor executor(p2p, stage_id, stages, tag_base, release_sent_outputs,
                                        python_wrapper_references(), chunks, placed);
        executor.split_transfers(split, split_activations, split_grads);
        try {
          py::gil_scoped_release release;
          executor.run(program.steps, program.plan, program.num_buffers, cb);
        } catch (py::error_already_set& err) {
          // A callback raised: the same exception goes on, with where the schedule stood.
          err.value().attr("add_note")("deepspeed_pipe_ext: raised on stage " + std::to_string(stage_id) + " at " +
                                       executor.position());
          throw;
        }
        // The compute passes as they ran: (start, end, op code, micro_batch, chunk), monotonic seconds.
        py::list timeline;
        for (const auto& t : executor.timeline()) {
          timeline.append(py::make_tuple(t.start, t.end, static_cast<int>(t.op), t.micro_batch, t.chunk));
        }
        py::dict usage;
        usage["buffers"] = program.num_buffers;
        usage["peak_live_buffers"] = executor.buffer_usage().peak_live_buffers;
        usage["peak_activation_bytes"] = executor.buffer_usage().peak_bytes;
        return py::make_tuple(timeline, usage);
      },
      "Runs one stage's program (a StageProgram) for a whole batch, calling back into Python only for "
      "loading, forward (+ loss), the loss backward, reductions and the optimizer step. The executor holds "
      "each micro-batch's inputs, labels, outputs and loss and passes them to the methods of `callbacks`: "
      "load() -> (inputs, labels); on stages other than the last forward(inputs, chunk) -> outputs; on the last "
      "forward_loss(inputs, labels) -> the loss (None: nothing to keep for a backward) and "
      "backward_loss(loss); reduce_tied_grads(), reduce_grads(), optimizer_step(); and if present (not None) "
      "loss_to_differentiate(loss) -> tensor, before_backward(), after_backward(). Returns the measured "
      "timeline and the activation buffers' usage.",
      py::arg("p2p"), py::arg("program"), py::arg("stages"), py::arg("stage_id"), py::arg("tag_base"),
      py::arg("callbacks"), py::arg("release_sent_outputs") = true,
      py::arg("split") = nullptr, py::arg("split_activations") = false, py::arg("split_grads") = false,
      py::arg("chunks") = 1, py::arg("layout") = "interleaved");

  py::class_<dpe::runtime::TensorParallelSplit>(m, "TensorParallelSplit",
                                                "DeepSpeed's pipe_partitioned / grad_partitioned: the first tensor "
                                                "between stages travels as 1/TP shares, gathered over the "
                                                "tensor-parallel group on arrival.")
      .def(py::init([](c10::intrusive_ptr<c10d::ProcessGroup> group, double timeout_s, std::string self_name) {
             return std::make_unique<dpe::runtime::TensorParallelSplit>(
                 std::move(group), std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000)),
                 std::move(self_name));
           }),
           py::arg("group"), py::arg("timeout_s"), py::arg("self_name"))
      .def(
          "split",
          [](const dpe::runtime::TensorParallelSplit& self, py::object value) {
            auto a = activation_from_python(value, "a split value");
            dpe::runtime::Activation out;
            {
              py::gil_scoped_release release;
              out = self.split(a);
            }
            return activation_to_python(out);
          },
          py::arg("value"), "What this rank sends instead of `value`: (meta, its share of the first tensor, the rest).")
      .def(
          "gather",
          [](const dpe::runtime::TensorParallelSplit& self, py::object received) {
            auto a = activation_from_python(received, "a received split value");
            dpe::runtime::Activation out;
            {
              py::gil_scoped_release release;
              out = self.gather(a, "a split value");
            }
            return activation_to_python(out);
          },
          py::arg("received"), "The value every rank of the group split (a collective of the group).");

  py::class_<dpe::runtime::DeferredWeightGrads>(m, "DeferredWeightGrads")
      .def_property_readonly("empty", &dpe::runtime::DeferredWeightGrads::empty)
      .def("run", &dpe::runtime::DeferredWeightGrads::run, py::call_guard<py::gil_scoped_release>(),
           "W: accumulates the deferred weight gradients into .grad and releases the graph.");
  m.def("backward_input", &dpe::runtime::backward_input, py::call_guard<py::gil_scoped_release>(),
        "B of a split backward: gradients of `outputs` (seeded with `output_grads`) w.r.t. the leaves `inputs` "
        "only (set as their .grad); returns the deferred weight gradients (W).",
        py::arg("outputs"), py::arg("output_grads"), py::arg("inputs"));

  m.def(
      "checkpoint",
      [](py::function forward, const std::vector<at::Tensor>& inputs, const std::vector<at::Tensor>& params,
         bool reentrant) {
        auto fn = group_forward_from_python(std::move(forward));
        py::gil_scoped_release release;
        return reentrant ? dpe::runtime::checkpoint_reentrant(std::move(fn), inputs)
                         : dpe::runtime::checkpoint_non_reentrant(std::move(fn), inputs, params);
      },
      "Runs forward(*inputs) without keeping its activations; recomputes it during backward. "
      "params: the parameters whose gradients flow through the checkpoint in non-reentrant mode.",
      py::arg("forward"), py::arg("inputs"), py::arg("params"), py::arg("reentrant"));

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
