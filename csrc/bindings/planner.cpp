// Binds csrc/core/planner: measured costs in, every candidate plan out.
#include "core/planner.h"
#include "bindings/convert.h"
#include "bindings/modules.h"

namespace dpe::bindings {

void bind_planner(py::module_& m) {
  py::class_<core::LayerCost>(m, "LayerCost", "One layer's measured costs for one micro-batch (core/planner.h).")
      .def(py::init<>())
      .def_readwrite("forward", &core::LayerCost::forward)
      .def_readwrite("backward_input", &core::LayerCost::backward_input)
      .def_readwrite("backward_weight", &core::LayerCost::backward_weight)
      .def_readwrite("saved_bytes", &core::LayerCost::saved_bytes)
      .def_readwrite("output_bytes", &core::LayerCost::output_bytes)
      .def_readwrite("state_bytes", &core::LayerCost::state_bytes)
      .def_readwrite("parameter_bytes", &core::LayerCost::parameter_bytes)
      .def_readwrite("optimizer", &core::LayerCost::optimizer)
      .def_readwrite("has_parameters", &core::LayerCost::has_parameters)
      .def_readwrite("differentiable_input", &core::LayerCost::differentiable_input);

  py::class_<core::RuntimeCost>(m, "RuntimeCost", "What the runtime itself costs between stage ranks.")
      .def(py::init<>())
      .def_readwrite("pass_overhead", &core::RuntimeCost::pass_overhead)
      .def_readwrite("transfer_overhead", &core::RuntimeCost::transfer_overhead)
      .def_readwrite("latency", &core::RuntimeCost::latency)
      .def_readwrite("bandwidth", &core::RuntimeCost::bandwidth);

  py::class_<core::PlanRequest>(m, "PlanRequest", "What the planner searches over (core/planner.h).")
      .def(py::init<>())
      .def_readwrite("layers", &core::PlanRequest::layers)
      .def_readwrite("input_bytes", &core::PlanRequest::input_bytes)
      .def_readwrite("stages", &core::PlanRequest::stages)
      .def_readwrite("micro_batches", &core::PlanRequest::micro_batches)
      .def_readwrite("memory_per_rank", &core::PlanRequest::memory_per_rank)
      .def_readwrite("base_bytes", &core::PlanRequest::base_bytes)
      .def_readwrite("runtime", &core::PlanRequest::runtime)
      .def_property(
          "kinds",
          [](const core::PlanRequest& r) {
            std::vector<std::string> names;
            for (auto k : r.kinds) names.push_back(core::schedule_kind_name(k));
            return names;
          },
          [](core::PlanRequest& r, const py::iterable& kinds) {
            r.kinds.clear();
            for (const auto& k : kinds) r.kinds.push_back(kind_arg(k));
          },
          "The schedules to consider (names or ScheduleKind); empty: every training schedule.")
      .def_readwrite("interleaved_chunks", &core::PlanRequest::interleaved_chunks)
      .def_readwrite("checkpoint_intervals", &core::PlanRequest::checkpoint_intervals);

  py::class_<core::PlanCandidate>(m, "PlanCandidate", "One candidate plan and its predictions.")
      .def_readonly("kind", &core::PlanCandidate::kind)
      .def_readonly("chunks", &core::PlanCandidate::chunks)
      .def_readonly("layout", &core::PlanCandidate::layout)
      .def_readonly("checkpoint_interval", &core::PlanCandidate::checkpoint_interval)
      .def_readonly("micro_batches", &core::PlanCandidate::micro_batches)
      .def_readonly("parts", &core::PlanCandidate::parts)
      .def_readonly("step_time", &core::PlanCandidate::step_time)
      .def_readonly("bubble", &core::PlanCandidate::bubble)
      .def_readonly("peak_bytes", &core::PlanCandidate::peak_bytes)
      .def_readonly("stage_compute", &core::PlanCandidate::stage_compute)
      .def_readonly("fits", &core::PlanCandidate::fits)
      .def_readonly("unavailable", &core::PlanCandidate::unavailable)
      .def_property_readonly("name", &core::PlanCandidate::name);

  m.def(
      "plan_pipeline",
      [](const core::PlanRequest& request) {
        core::Plan plan = without_gil([&] { return core::plan_pipeline(request); });
        return py::make_tuple(plan.candidates, plan.best);
      },
      py::arg("request"),
      "Every candidate of the request, fastest per micro-batch first, and the index of the fastest that fits "
      "(-1: none).");
  m.def(
      "evaluate_candidate",
      [](const core::PlanRequest& request, const py::object& kind, int64_t chunks, int64_t checkpoint_interval,
         int64_t micro_batches, const core::Boundaries& parts) {
        const auto k = kind_arg(kind);
        return without_gil(
            [&] { return core::evaluate_candidate(request, k, chunks, checkpoint_interval, micro_batches, parts); });
      },
      py::arg("request"), py::arg("kind"), py::arg("chunks"), py::arg("checkpoint_interval"), py::arg("micro_batches"),
      py::arg("parts"), "One candidate on a given partition: its predicted step time and memory.");
  m.def(
      "v_activation_limit",
      [](const py::object& kind, int64_t stages) { return core::v_activation_limit(kind_arg(kind), stages); },
      py::arg("kind"), py::arg("stages"),
      "The most chunk micro-batches a rank of a V schedule keeps between a forward and its weight gradient.");
}

}  // namespace dpe::bindings
