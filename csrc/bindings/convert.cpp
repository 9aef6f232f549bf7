#include "bindings/convert.h"

namespace dpe::bindings {

namespace {
bool is_text(const py::handle& value) { return py::isinstance<py::str>(value); }
}  // namespace

core::ScheduleKind kind_arg(const py::handle& value) {
  if (is_text(value)) return core::parse_schedule_kind(value.cast<std::string>());
  return value.cast<core::ScheduleKind>();
}

core::ChunkLayout layout_arg(const py::handle& value, core::ChunkLayout fallback) {
  if (value.is_none()) return fallback;
  if (is_text(value)) {
    const auto name = value.cast<std::string>();
    return name.empty() ? fallback : core::parse_chunk_layout(name);
  }
  return value.cast<core::ChunkLayout>();
}

core::TransferOrder transfer_order_arg(const py::handle& value) {
  if (!is_text(value)) return value.cast<core::TransferOrder>();
  const auto name = value.cast<std::string>();
  for (auto order :
       {core::TransferOrder::PairOrder, core::TransferOrder::ProgramOrder, core::TransferOrder::AsSoonAsChannelFree})
    if (name == transfer_order_name(order)) return order;
  throw std::invalid_argument("transfer order must be 'pair' (the executor's), 'program' or 'channel-free', got '" +
                              name + "'");
}

const char* transfer_order_name(core::TransferOrder order) {
  switch (order) {
    case core::TransferOrder::PairOrder:
      return "pair";
    case core::TransferOrder::ProgramOrder:
      return "program";
    case core::TransferOrder::AsSoonAsChannelFree:
      return "channel-free";
  }
  return "?";
}

core::ScheduleSpec make_spec(const py::handle& kind, int64_t micro_batches, int64_t stages, int64_t chunks,
                             const py::handle& layout) {
  core::ScheduleSpec spec;
  spec.kind = kind_arg(kind);
  spec.micro_batches = micro_batches;
  spec.stages = stages;
  spec.chunks = chunks;
  spec.layout = layout_arg(layout, core::layout_of(spec.kind));
  core::validate(spec);
  return spec;
}

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

core::Steps steps_from_python(const std::vector<std::vector<PyInstruction>>& steps) {
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
    for (const auto& t : stage)
      ops.append(py::make_tuple(t.start, t.end, static_cast<int>(t.op), t.micro_batch, t.chunk));
    timeline.append(std::move(ops));
  }
  d["timeline"] = timeline;
  return d;
}

std::vector<core::ComputeOrder> orders_from_python(const std::vector<std::vector<std::string>>& rows,
                                                   core::ChunkLayout layout) {
  const int64_t stages = static_cast<int64_t>(rows.size());
  if (stages < 1) throw std::invalid_argument("a compute order needs one row of actions per rank; got none");
  std::vector<core::ComputeOrder> orders(stages);
  for (int64_t r = 0; r < stages; ++r)
    for (const auto& token : rows[r]) orders[r].push_back(core::parse_action(token, stages, r, layout));
  return orders;
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

py::dict check_to_python(const core::CommCheck& c) {
  return py::dict(py::arg("ok") = c.ok, py::arg("operations") = c.operations, py::arg("report") = c.report);
}

py::object activation_to_python(const runtime::Activation& a) {
  if (!a.is_tuple && a.tensors.size() == 1) return py::cast(a.tensors[0]);
  py::tuple out(a.tensors.size());
  for (size_t i = 0; i < a.tensors.size(); ++i) out[i] = py::cast(a.tensors[i]);
  return std::move(out);
}

runtime::Activation activation_from_python(const py::handle& obj, const char* what) {
  runtime::Activation a;
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

runtime::Held hold(const py::handle& obj) {
  if (obj.is_none()) return nullptr;
  return runtime::Held(new py::object(py::reinterpret_borrow<py::object>(obj)), [](void* p) {
    py::gil_scoped_acquire gil;
    delete static_cast<py::object*>(p);
  });
}

py::object held(const runtime::Held& value) {
  return value ? *static_cast<const py::object*>(value.get()) : py::none();
}

}  // namespace dpe::bindings
