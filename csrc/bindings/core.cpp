// Binds csrc/core: partitions, topology, the schedule IR and its facts, the
// simulator, compute orders, the NCCL-order checker and stage programs.
#include "bindings/convert.h"
#include "bindings/modules.h"
#include "core/comm_order.h"
#include "core/partition.h"
#include "core/schedule.h"
#include "core/simulator.h"
#include "core/stage_program.h"
#include "core/topology.h"

namespace dpe::bindings {

namespace {

core::OpCosts make_costs(double forward, double backward_input, double backward_weight, double send_latency) {
  return core::OpCosts{forward, backward_input, backward_weight, send_latency};
}

void bind_partition_and_topology(py::module_& m) {
  m.def("partition_uniform", &core::partition_uniform, py::arg("num_items"), py::arg("num_parts"),
        py::call_guard<py::gil_scoped_release>());
  m.def("partition_balanced", &core::partition_balanced, py::arg("weights"), py::arg("num_parts"),
        py::call_guard<py::gil_scoped_release>());
  m.def("partition_minmax", &core::partition_minmax, py::arg("weights"), py::arg("num_parts"),
        py::call_guard<py::gil_scoped_release>());
  m.def("max_part_weight", &core::max_part_weight, py::arg("weights"), py::arg("parts"));
  m.def("check_weights", &core::check_weights, py::arg("weights"));
  m.def("prime_factors", &core::prime_factors, py::arg("n"));

  using core::Topology;
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

// The schedule IR's vocabulary, with the facts every Python tool derives its
// checks, letters and labels from.
void bind_schedule_facts(py::module_& m) {
  py::enum_<core::Op> op(m, "Op", "An instruction of the schedule IR (csrc/core/schedule.h).");
  for (int i = 0; i < core::kNumOps; ++i) op.value(core::op_name(static_cast<core::Op>(i)), static_cast<core::Op>(i));
  op.def_property_readonly(
        "letter", [](core::Op o) { return core::op_info(o).letter; },
        "F, B, I or W for a compute pass (as in action tokens and timelines); '' otherwise.")
      .def_property_readonly(
          "label", [](core::Op o) { return core::op_info(o).label; },
          "How profiler traces and timelines name it ('backward input').")
      .def_property_readonly("is_compute", [](core::Op o) { return core::op_info(o).is_compute; })
      .def_property_readonly("is_transfer", [](core::Op o) { return core::op_info(o).is_transfer; });

  py::enum_<core::ChunkLayout>(m, "ChunkLayout", "Where a rank's model chunks sit among the virtual stages.")
      .value("Interleaved", core::ChunkLayout::Interleaved)
      .value("V", core::ChunkLayout::V)
      .def_property_readonly(
          "config_name", [](core::ChunkLayout l) { return core::chunk_layout_name(l); },
          "'interleaved' or 'v', as PipelineModule(virtual_layout=...) names it.")
      .def_static("parse", &core::parse_chunk_layout, py::arg("name"));

  // Enumerator names as C++ spells them; config_name is what a config says.
  py::enum_<core::ScheduleKind>(m, "ScheduleKind", "A built-in schedule and what it is.")
      .value("Train1F1B", core::ScheduleKind::Train1F1B)
      .value("Inference", core::ScheduleKind::Inference)
      .value("DataParallel", core::ScheduleKind::DataParallel)
      .value("GPipe", core::ScheduleKind::GPipe)
      .value("Interleaved1F1B", core::ScheduleKind::Interleaved1F1B)
      .value("ZeroBubbleH1", core::ScheduleKind::ZeroBubbleH1)
      .value("ZeroBubbleV", core::ScheduleKind::ZeroBubbleV)
      .value("VHalf", core::ScheduleKind::VHalf)
      .value("VMin", core::ScheduleKind::VMin)
      .def_property_readonly(
          "config_name", [](core::ScheduleKind k) { return core::schedule_kind_info(k).name; },
          "The name a config gives it: \"pipeline\": {\"schedule\": ...}.")
      .def_property_readonly("layout", [](core::ScheduleKind k) { return core::schedule_kind_info(k).layout; })
      .def_property_readonly("min_chunks", [](core::ScheduleKind k) { return core::schedule_kind_info(k).min_chunks; })
      .def_property_readonly(
          "max_chunks", [](core::ScheduleKind k) { return core::schedule_kind_info(k).max_chunks; },
          "0: no upper bound.")
      .def_property_readonly("splits_backward",
                             [](core::ScheduleKind k) { return core::schedule_kind_info(k).splits_backward; })
      .def_property_readonly(
          "trains", [](core::ScheduleKind k) { return core::schedule_kind_info(k).trains; },
          "The engine trains with it (inference and data-parallel are other streams).")
      .def_static("parse", &core::parse_schedule_kind, py::arg("name"));

  py::enum_<core::TransferOrder>(m, "TransferOrder", "How a stage's transfers are ordered (core/comm_order.h).")
      .value("PairOrder", core::TransferOrder::PairOrder)
      .value("ProgramOrder", core::TransferOrder::ProgramOrder)
      .value("AsSoonAsChannelFree", core::TransferOrder::AsSoonAsChannelFree);

  py::enum_<core::Traffic>(m, "Traffic", "Training or evaluation transfers: separate channels (core/tags.h).")
      .value("Train", core::Traffic::Train)
      .value("Eval", core::Traffic::Eval);
  m.def("channel_tag", &core::channel_tag, py::arg("traffic"), py::arg("gradient"), py::arg("receiving_chunk"),
        "The tag of a transfer channel (core/tags.h documents the tag space).");
}

void bind_schedules(py::module_& m) {
  py::register_exception<core::ScheduleError>(m, "ScheduleError", PyExc_RuntimeError);

  m.def(
      "virtual_stage_of",
      [](int64_t rank, int64_t chunk, int64_t stages, const py::object& layout) {
        return core::virtual_stage_of(rank, chunk, stages, layout_arg(layout, core::ChunkLayout::Interleaved));
      },
      py::arg("rank"), py::arg("chunk"), py::arg("stages"), py::arg("layout"),
      "The virtual stage (part of the model) of chunk `chunk` of rank `rank` in `layout`.");
  m.def(
      "place_of_virtual",
      [](int64_t virtual_stage, int64_t stages, const py::object& layout) {
        const auto placed = layout_arg(layout, core::ChunkLayout::Interleaved);
        return py::make_tuple(core::rank_of_virtual(virtual_stage, stages, placed),
                              core::chunk_of_virtual(virtual_stage, stages));
      },
      py::arg("virtual_stage"), py::arg("stages"), py::arg("layout"),
      "(rank, chunk) holding virtual stage `virtual_stage` in `layout`.");
  m.def(
      "schedule_steps",
      [](const py::object& kind, int64_t micro_batches, int64_t stages, int64_t stage_id, int64_t chunks,
         const py::object& layout) {
        const auto spec = make_spec(kind, micro_batches, stages, chunks, layout);
        const auto steps = without_gil([&] { return core::generate_steps(spec, stage_id); });
        return steps_to_python(steps);
      },
      py::arg("kind"), py::arg("micro_batches"), py::arg("stages"), py::arg("stage_id"), py::arg("chunks") = 1,
      py::arg("layout") = py::none());
  m.def(
      "schedule_all_steps",
      [](const py::object& kind, int64_t micro_batches, int64_t stages, int64_t chunks, const py::object& layout) {
        const auto spec = make_spec(kind, micro_batches, stages, chunks, layout);
        const auto all = without_gil([&] { return core::generate_all_steps(spec); });
        py::list out;
        for (const auto& steps : all) out.append(steps_to_python(steps));
        return out;
      },
      py::arg("kind"), py::arg("micro_batches"), py::arg("stages"), py::arg("chunks") = 1,
      py::arg("layout") = py::none());
  m.def(
      "count_all_instructions",
      [](const py::object& kind, int64_t micro_batches, int64_t stages, int64_t chunks, const py::object& layout) {
        // Generation alone, nothing crosses into Python: what the C++ executor pays.
        const auto spec = make_spec(kind, micro_batches, stages, chunks, layout);
        py::gil_scoped_release release;
        int64_t count = 0;
        for (const auto& steps : core::generate_all_steps(spec))
          for (const auto& step : steps) count += static_cast<int64_t>(step.size());
        return count;
      },
      py::arg("kind"), py::arg("micro_batches"), py::arg("stages"), py::arg("chunks") = 1,
      py::arg("layout") = py::none());
  m.def(
      "num_pipe_buffers",
      [](const py::object& kind, int64_t micro_batches, int64_t stages, int64_t stage_id, int64_t chunks,
         const py::object& layout) {
        return core::num_pipe_buffers(make_spec(kind, micro_batches, stages, chunks, layout), stage_id);
      },
      py::arg("kind"), py::arg("micro_batches"), py::arg("stages"), py::arg("stage_id"), py::arg("chunks") = 1,
      py::arg("layout") = py::none());
  m.def(
      "compute_order",
      [](const py::object& kind, int64_t micro_batches, int64_t stages, int64_t chunks, const py::object& layout) {
        const auto spec = make_spec(kind, micro_batches, stages, chunks, layout);
        std::vector<std::vector<std::string>> rows;
        const auto orders = core::compute_orders_of(core::generate_all_steps(spec));
        for (size_t r = 0; r < orders.size(); ++r) {
          rows.emplace_back();
          for (const auto& op : orders[r]) rows.back().push_back(core::format_action(op, stages, r, spec.layout));
        }
        return rows;
      },
      py::arg("kind"), py::arg("micro_batches"), py::arg("stages"), py::arg("chunks") = 1,
      py::arg("layout") = py::none(), "A schedule's compute passes per rank, as action tokens (\"0F3\").");
  m.def(
      "parse_action_token",
      [](const std::string& token, int64_t rank) {
        const auto parsed = core::parse_action_token(token, rank);
        return py::make_tuple(parsed.virtual_stage, core::compute_letter(parsed.what), parsed.micro_batch);
      },
      py::arg("token"), py::arg("rank") = 0,
      "(virtual_stage, letter, micro_batch) of an action token (\"0F3\"); ValueError naming what is wrong.");
  m.def(
      "lower_compute_order",
      [](const std::vector<std::vector<std::string>>& rows, int64_t micro_batches, int64_t chunks,
         const py::object& layout) {
        std::vector<int64_t> buffers;
        const auto placed = layout_arg(layout, core::ChunkLayout::Interleaved);
        const auto all =
            core::lower_compute_orders(orders_from_python(rows, placed), micro_batches, &buffers, chunks, placed);
        py::list streams;
        for (const auto& steps : all) streams.append(steps_to_python(steps));
        return py::make_tuple(streams, buffers);
      },
      py::arg("rows"), py::arg("micro_batches"), py::arg("chunks") = 1, py::arg("layout") = py::none(),
      "Every rank's instruction stream for rows of action tokens, and its buffer count.");
}

void bind_simulator(py::module_& m) {
  m.def(
      "simulate",
      [](const py::object& kind, int64_t micro_batches, int64_t stages, int64_t chunks, double forward,
         double backward_input, double backward_weight, double send_latency, const py::object& layout) {
        const auto spec = make_spec(kind, micro_batches, stages, chunks, layout);
        const auto costs = make_costs(forward, backward_input, backward_weight, send_latency);
        const auto r = without_gil([&] { return core::simulate(spec, costs); });
        return result_to_python(r);
      },
      py::arg("kind"), py::arg("micro_batches"), py::arg("stages"), py::arg("chunks") = 1, py::arg("forward") = 1.0,
      py::arg("backward_input") = 1.0, py::arg("backward_weight") = 1.0, py::arg("send_latency") = 0.0,
      py::arg("layout") = py::none());
  m.def(
      "simulate_pass_costs",
      [](const py::object& kind, int64_t micro_batches, int64_t stages, int64_t chunks,
         const std::vector<std::vector<std::tuple<double, double, double>>>& pass_costs, double send_latency,
         const py::object& layout) {
        const auto spec = make_spec(kind, micro_batches, stages, chunks, layout);
        std::vector<std::vector<core::OpCosts>> table;
        for (const auto& stage : pass_costs) {
          table.emplace_back();
          for (const auto& [forward, backward_input, backward_weight] : stage)
            table.back().push_back(core::OpCosts{forward, backward_input, backward_weight, 0.0});
        }
        const auto r = without_gil([&] { return core::simulate(spec, table, send_latency); });
        return result_to_python(r);
      },
      py::arg("kind"), py::arg("micro_batches"), py::arg("stages"), py::arg("chunks"), py::arg("pass_costs"),
      py::arg("send_latency") = 0.0, py::arg("layout") = py::none(),
      "Simulates with measured costs: pass_costs[stage][chunk] = (forward, backward_input, backward_weight) of one "
      "pass of that chunk.");
  m.def(
      "simulate_streams",
      [](const std::vector<std::vector<std::vector<PyInstruction>>>& streams, int64_t micro_batches, int64_t chunks,
         const std::vector<int64_t>& num_buffers, double forward, double backward_input, double backward_weight,
         double send_latency, const py::object& layout) {
        std::vector<core::Steps> converted;
        for (const auto& s : streams) converted.push_back(steps_from_python(s));
        return result_to_python(core::simulate(converted, micro_batches, chunks, num_buffers,
                                               make_costs(forward, backward_input, backward_weight, send_latency),
                                               layout_arg(layout, core::ChunkLayout::Interleaved)));
      },
      py::arg("streams"), py::arg("micro_batches"), py::arg("chunks"), py::arg("num_buffers"), py::arg("forward") = 1.0,
      py::arg("backward_input") = 1.0, py::arg("backward_weight") = 1.0, py::arg("send_latency") = 0.0,
      py::arg("layout") = py::none());
  m.def(
      "simulate_compute_order",
      [](const std::vector<std::vector<std::string>>& rows, int64_t micro_batches, double forward,
         double backward_input, double backward_weight, double send_latency, int64_t chunks, const py::object& layout) {
        std::vector<int64_t> buffers;
        const auto placed = layout_arg(layout, core::ChunkLayout::Interleaved);
        const auto all =
            core::lower_compute_orders(orders_from_python(rows, placed), micro_batches, &buffers, chunks, placed);
        const auto r = without_gil([&] {
          return core::simulate(all, micro_batches, chunks, buffers,
                                make_costs(forward, backward_input, backward_weight, send_latency), placed);
        });
        return result_to_python(r);
      },
      py::arg("rows"), py::arg("micro_batches"), py::arg("forward") = 1.0, py::arg("backward_input") = 1.0,
      py::arg("backward_weight") = 1.0, py::arg("send_latency") = 0.0, py::arg("chunks") = 1,
      py::arg("layout") = py::none());
}

void bind_transfer_checks(py::module_& m) {
  m.def(
      "check_nccl_order",
      [](const std::vector<std::vector<std::tuple<std::string, int, int64_t, std::string>>>& ranks,
         bool one_stream_per_rank) {
        std::vector<core::CommTrace> traces;
        for (const auto& r : ranks) traces.push_back(trace_from_python(r));
        const auto result = without_gil([&] { return core::check_nccl_order(traces, one_stream_per_rank); });
        return check_to_python(result);
      },
      "Replays every rank's trace (rank i: traces[i], as P2P.trace records it) under NCCL's point-to-point "
      "rules (one in-order queue per pair of ranks, or per rank with one_stream_per_rank); returns "
      "{'ok', 'operations', 'report'} (the report names the ranks and operations stuck).",
      py::arg("traces"), py::arg("one_stream_per_rank") = false);
  m.def(
      "check_schedule_transfers",
      [](const py::object& kind, int64_t micro_batches, int64_t stages, const py::object& order, bool dynamic_shapes,
         bool one_stream_per_rank, int64_t chunks) {
        const auto spec = make_spec(kind, micro_batches, stages, chunks, py::none());
        const auto o = transfer_order_arg(order);
        const auto result =
            without_gil([&] { return core::check_schedule_transfers(spec, o, dynamic_shapes, one_stream_per_rank); });
        return check_to_python(result);
      },
      "Plans every stage's transfers as the executor would ('pair'), or in another order, and checks them "
      "under NCCL's rules.",
      py::arg("kind"), py::arg("micro_batches"), py::arg("stages"), py::arg("order") = "pair",
      py::arg("dynamic_shapes") = false, py::arg("one_stream_per_rank") = false, py::arg("chunks") = 1);
}

void bind_stage_program(py::module_& m) {
  using core::StageProgram;
  py::class_<StageProgram>(m, "StageProgram",
                           "One stage's program: the pipeline's shape, its instruction stream, buffers, transfer "
                           "order and tags. Built once, run many times by run_stage.")
      .def(py::init([](const py::object& kind, int64_t micro_batches, int64_t stages, int64_t stage_id,
                       bool dynamic_shapes, int64_t chunks, const py::object& layout) {
             const auto spec = make_spec(kind, micro_batches, stages, chunks, layout);
             py::gil_scoped_release release;
             return core::program_for_schedule(spec, stage_id, dynamic_shapes);
           }),
           py::arg("kind"), py::arg("micro_batches"), py::arg("stages"), py::arg("stage_id"),
           py::arg("dynamic_shapes") = false, py::arg("chunks") = 1, py::arg("layout") = py::none())
      .def_static(
          "from_compute_order",
          [](const std::vector<std::vector<std::string>>& rows, int64_t micro_batches, int64_t stage_id,
             bool dynamic_shapes, int64_t chunks, const py::object& layout) {
            const auto placed = layout_arg(layout, core::ChunkLayout::Interleaved);
            const auto orders = orders_from_python(rows, placed);
            py::gil_scoped_release release;
            return core::program_for_compute_order(orders, micro_batches, stage_id, dynamic_shapes, chunks, placed);
          },
          py::arg("rows"), py::arg("micro_batches"), py::arg("stage_id"), py::arg("dynamic_shapes") = false,
          py::arg("chunks") = 1, py::arg("layout") = py::none(),
          "A stage's program for a compute order (rows of action tokens, one per rank), proven by the simulator "
          "first.")
      .def_readonly("stages", &StageProgram::stages)
      .def_readonly("stage", &StageProgram::stage)
      .def_readonly("chunks", &StageProgram::chunks)
      .def_readonly("layout", &StageProgram::layout)
      .def_readonly("micro_batches", &StageProgram::micro_batches)
      .def_readonly("dynamic_shapes", &StageProgram::dynamic_shapes)
      .def_readonly("traffic", &StageProgram::traffic)
      .def_readonly("num_buffers", &StageProgram::num_buffers)
      .def_property_readonly("holds_loss", &StageProgram::holds_loss,
                             "This rank holds the last virtual stage, where the loss is computed.")
      .def_property_readonly("steps", [](const StageProgram& p) { return steps_to_python(p.steps); })
      .def_property_readonly("receives_after_meta", &StageProgram::receives_after_meta,
                             "Receives this stage takes ahead of another transfer with the same peer whose meta it "
                             "receives first (their shapes not known yet; NCCL ordering).")
      .def_property_readonly("posted_receives", &StageProgram::posted_receives,
                             "Receives this stage posts ahead of their instruction.");
}

}  // namespace

void bind_core(py::module_& m) {
  bind_partition_and_topology(m);
  bind_schedule_facts(m);
  bind_schedules(m);
  bind_simulator(m);
  bind_transfer_checks(m);
  bind_stage_program(m);
}

}  // namespace dpe::bindings
