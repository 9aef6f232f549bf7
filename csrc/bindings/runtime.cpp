// Binds csrc/runtime: P2P transfers and their typed errors, the
// tensor-parallel split, the split backward, activation recomputation, and
// run_stage, which runs a StageProgram with Python's callbacks.
#include <optional>

#include "bindings/convert.h"
#include "bindings/modules.h"
#include "core/stage_program.h"
#include "runtime/crash_stack.h"
#include "runtime/errors.h"
#include "runtime/executor.h"
#include "runtime/p2p.h"
#include "runtime/recompute.h"
#include "runtime/split_backward.h"
#include "runtime/tensor_parallel_split.h"

namespace dpe::bindings {

namespace {

std::chrono::milliseconds milliseconds(double seconds) {
  return std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000));
}

// P2PError and its subclasses become Python exceptions of the same names
// (subclasses of RuntimeError) with .stage, .peer and .position.
void bind_errors(py::module_& m) {
  static py::handle base, timeout, aborted, closed;  // module attributes keep them alive
  base = py::exception<runtime::P2PError>(m, "P2PError", PyExc_RuntimeError).release();
  timeout = py::exception<runtime::P2PTimeout>(m, "P2PTimeout", base.ptr()).release();
  aborted = py::exception<runtime::P2PAborted>(m, "P2PAborted", base.ptr()).release();
  closed = py::exception<runtime::PeerClosed>(m, "PeerClosed", base.ptr()).release();
  // What every instance carries; set on each one raised.
  py::setattr(base, "stage", py::str(""));
  py::setattr(base, "peer", py::int_(-1));
  py::setattr(base, "position", py::str(""));
  py::register_exception_translator([](std::exception_ptr thrown) {
    if (!thrown) return;
    auto raise = [](py::handle type, const runtime::P2PError& err) {
      py::object value = py::reinterpret_borrow<py::object>(type)(err.what());
      value.attr("stage") = err.stage();
      value.attr("peer") = err.peer();
      value.attr("position") = err.position();
      PyErr_SetObject(type.ptr(), value.ptr());
    };
    try {
      std::rethrow_exception(thrown);
    } catch (const runtime::P2PTimeout& err) {
      raise(timeout, err);
    } catch (const runtime::P2PAborted& err) {
      raise(aborted, err);
    } catch (const runtime::PeerClosed& err) {
      raise(closed, err);
    } catch (const runtime::P2PError& err) {
      raise(base, err);
    }
  });
}

void bind_p2p(py::module_& m) {
  using runtime::P2P;
  py::class_<P2P>(m, "P2P")
      .def(
          py::init([](c10::intrusive_ptr<c10d::ProcessGroup> group, double timeout_s, std::string self_name,
                      bool dynamic_shapes, const std::string& device, std::string peer_label, bool stage_through_host) {
            return std::make_unique<P2P>(std::move(group), milliseconds(timeout_s), std::move(self_name),
                                         dynamic_shapes, at::Device(device), std::move(peer_label), stage_through_host);
          }),
          py::arg("group"), py::arg("timeout_s"), py::arg("self_name"), py::arg("dynamic_shapes") = false,
          py::arg("device") = "cpu", py::arg("peer_label") = "rank", py::arg("stage_through_host") = false,
          "stage_through_host (tests): CPU tensors take the host-staged path CUDA tensors take over gloo.")
      .def(
          "send",
          [](P2P& self, py::object value, int peer, int tag, const std::string& what) {
            auto a = activation_from_python(value, "a sent value");
            py::gil_scoped_release release;
            self.send(a, peer, tag, [what] { return what; });
          },
          py::arg("value"), py::arg("peer"), py::arg("tag"), py::arg("what"))
      .def(
          "recv",
          [](P2P& self, int peer, int tag, const std::string& what) {
            const auto a = without_gil([&] { return self.recv(peer, tag, [&what] { return what; }); });
            return activation_to_python(a);
          },
          py::arg("peer"), py::arg("tag"), py::arg("what"))
      .def("post_recv", &P2P::post_recv, py::arg("peer"), py::arg("tag"), py::call_guard<py::gil_scoped_release>(),
           "Starts the next receive on (peer, tag) into buffers of its own; False before the channel's meta is known.")
      .def_property_readonly("pending_sends", &P2P::pending_sends)
      .def("wait_sends", &P2P::wait_sends, py::call_guard<py::gil_scoped_release>())
      .def("abort", &P2P::abort, py::arg("reason"), py::call_guard<py::gil_scoped_release>(),
           "Stops the wait in progress (from any thread) and every later one, with an error giving `reason`.")
      .def("reset", &P2P::reset, py::call_guard<py::gil_scoped_release>())
      .def("set_single_tag", &P2P::set_single_tag, py::arg("on"),
           "Every transfer on tag 0, so that gloo matches them in issue order as NCCL does (tests).")
      .def("set_recording", &P2P::set_recording, py::arg("on"),
           "Records every operation issued and waited for from now on (see trace).")
      .def_property_readonly(
          "trace", [](const P2P& self) { return trace_to_python(self.trace()); },
          "The operations recorded: ('send'|'recv', peer, bytes, what) or ('wait', operation index, -1, '').")
      .def_property_readonly("stages_through_host", &P2P::stages_through_host)
      .def_property_readonly("rank", &P2P::rank)
      .def_property_readonly("size", &P2P::size);

  using runtime::TensorParallelSplit;
  py::class_<TensorParallelSplit>(m, "TensorParallelSplit",
                                  "DeepSpeed's pipe_partitioned / grad_partitioned: the first tensor between stages "
                                  "travels as 1/TP shares, gathered over the tensor-parallel group on arrival.")
      .def(py::init([](c10::intrusive_ptr<c10d::ProcessGroup> group, double timeout_s, std::string self_name) {
             return std::make_unique<TensorParallelSplit>(std::move(group), milliseconds(timeout_s),
                                                          std::move(self_name));
           }),
           py::arg("group"), py::arg("timeout_s"), py::arg("self_name"))
      .def(
          "split",
          [](const TensorParallelSplit& self, py::object value) {
            auto a = activation_from_python(value, "a split value");
            const auto out = without_gil([&] { return self.split(a); });
            return activation_to_python(out);
          },
          py::arg("value"), "What this rank sends instead of `value`: (meta, its share of the first tensor, the rest).")
      .def(
          "gather",
          [](const TensorParallelSplit& self, py::object received) {
            auto a = activation_from_python(received, "a received split value");
            const auto out = without_gil([&] { return self.gather(a, "a split value"); });
            return activation_to_python(out);
          },
          py::arg("received"), "The value every rank of the group split (a collective of the group).");
}

// A Python callable the autograd graph may hold and drop on any thread:
// calls and the final release take the GIL.
runtime::GroupForward group_forward_from_python(py::function fn) {
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

void bind_backward_and_recomputation(py::module_& m) {
  py::class_<runtime::DeferredWeightGrads>(m, "DeferredWeightGrads")
      .def_property_readonly("empty", &runtime::DeferredWeightGrads::empty)
      .def("run", &runtime::DeferredWeightGrads::run, py::call_guard<py::gil_scoped_release>(),
           "W: accumulates the deferred weight gradients into .grad and releases the graph.");
  m.def("backward_input", &runtime::backward_input, py::call_guard<py::gil_scoped_release>(),
        "B of a split backward: gradients of `outputs` (seeded with `output_grads`) w.r.t. the leaves `inputs` "
        "only (set as their .grad); returns the deferred weight gradients (W).",
        py::arg("outputs"), py::arg("output_grads"), py::arg("inputs"));
  m.def(
      "recompute",
      [](py::function forward, const std::vector<at::Tensor>& inputs, const std::vector<at::Tensor>& params,
         bool reentrant) {
        auto fn = group_forward_from_python(std::move(forward));
        py::gil_scoped_release release;
        return reentrant ? runtime::checkpoint_reentrant(std::move(fn), inputs)
                         : runtime::checkpoint_non_reentrant(std::move(fn), inputs, params);
      },
      "Activation recomputation: runs forward(*inputs) without keeping its activations; recomputes it during "
      "backward. params: the parameters whose gradients flow through it in non-reentrant mode.",
      py::arg("forward"), py::arg("inputs"), py::arg("params"), py::arg("reentrant"));
  m.def("print_native_stack_on_crash", &runtime::print_native_stack_on_crash,
        "Debugging aid: on a fatal signal (a segmentation fault, an abort) print the native stack to stderr, then "
        "run the handler installed before (call faulthandler.enable() first for the Python stacks too).");
}

// References a tensor's Python object holds once Python code let go of it
// (torch's PyObject preservation): measured once, on a tensor of our own.
int64_t python_wrapper_references() {
  static const int64_t count = [] {
    at::Tensor t = at::empty({1});
    {
      py::object wrapper = py::cast(t);
    }
    return static_cast<int64_t>(t.use_count()) - 1;
  }();
  return count;
}

// A loss as the caller gets it back: detached (a tensor, or a list of them), so
// that holding it keeps no graph alive; anything else as it is.
py::object detached(const py::handle& value) {
  if (THPVariable_Check(value.ptr())) return py::cast(THPVariable_Unpack(value.ptr()).detach());
  if (py::isinstance<py::tuple>(value) || py::isinstance<py::list>(value)) {
    py::list out;
    for (const auto& item : value) out.append(detached(item));
    return std::move(out);
  }
  return py::reinterpret_borrow<py::object>(value);
}

// The callbacks object's methods as the executor's StageCallbacks, checked
// once before the run: which are required depends on the stage's place.
struct PythonCallbacks {
  py::object callbacks;
  py::list losses;  // what forward_loss returned, detached, in the order it ran
  std::optional<py::function> load, forward, forward_loss, backward_loss, loss_to_differentiate, before_backward,
      after_backward, reduce_tied_grads, reduce_grads, optimizer_step;

  PythonCallbacks(py::object object, const core::StageProgram& program) : callbacks(std::move(object)) {
    load = required("load");
    reduce_tied_grads = required("reduce_tied_grads");
    reduce_grads = required("reduce_grads");
    optimizer_step = required("optimizer_step");
    // The rank holding the last virtual stage computes the loss; the others pass outputs on.
    if (!program.holds_loss() || program.chunks > 1) forward = required("forward");
    if (program.holds_loss()) forward_loss = required("forward_loss");
    before_backward = optional("before_backward");
    after_backward = optional("after_backward");
    loss_to_differentiate = optional("loss_to_differentiate");
    backward_loss = optional("backward_loss");
    if (program.holds_loss() && !backward_loss) required("backward_loss");
  }

  py::function required(const char* name) const {
    py::object fn = py::getattr(callbacks, name, py::none());
    if (fn.is_none() || !PyCallable_Check(fn.ptr())) {
      throw py::type_error(std::string("run_stage: the callbacks object has no callable '") + name + "'");
    }
    return py::reinterpret_borrow<py::function>(fn);
  }

  std::optional<py::function> optional(const char* name) const {
    py::object fn = py::getattr(callbacks, name, py::none());
    if (fn.is_none()) return std::nullopt;
    return py::reinterpret_borrow<py::function>(fn);
  }

  // Valid while this object lives (the lambdas refer to its functions).
  runtime::StageCallbacks for_executor() {
    runtime::StageCallbacks cb;
    cb.load = [fn = &*load]() {
      py::gil_scoped_acquire gil;
      py::object loaded = (*fn)();
      if (!py::isinstance<py::tuple>(loaded) || py::len(loaded) != 2) {
        throw py::type_error("run_stage: load() must return (inputs, labels), got " +
                             std::string(py::str(py::type::of(loaded).attr("__name__"))));
      }
      auto pair = loaded.cast<py::tuple>();
      return runtime::LoadedMicroBatch{activation_from_python(pair[0], "the loaded micro-batch's inputs"),
                                       hold(pair[1])};
    };
    if (forward_loss) {
      cb.forward_loss = [fn = &*forward_loss, losses = &losses](const runtime::Activation& inputs,
                                                                const runtime::Held& labels) {
        py::gil_scoped_acquire gil;
        py::object loss = (*fn)(activation_to_python(inputs), held(labels));
        losses->append(detached(loss));
        return hold(loss);
      };
    }
    if (forward) {
      cb.forward = [fn = &*forward](const runtime::Activation& inputs, int64_t chunk) {
        py::gil_scoped_acquire gil;
        return activation_from_python((*fn)(activation_to_python(inputs), chunk), "a stage's output");
      };
    }
    auto plain = [](py::function* fn) {
      return [fn]() {
        py::gil_scoped_acquire gil;
        (*fn)();
      };
    };
    if (backward_loss) {
      cb.backward_loss = [fn = &*backward_loss](const runtime::Held& loss) {
        py::gil_scoped_acquire gil;
        (*fn)(held(loss));
      };
    }
    cb.reduce_tied_grads = plain(&*reduce_tied_grads);
    cb.reduce_grads = plain(&*reduce_grads);
    cb.optimizer_step = plain(&*optimizer_step);
    if (before_backward) cb.before_backward = plain(&*before_backward);
    if (after_backward) cb.after_backward = plain(&*after_backward);
    if (loss_to_differentiate) {
      cb.loss_to_differentiate = [fn = &*loss_to_differentiate](const runtime::Held& held_loss) {
        py::gil_scoped_acquire gil;
        py::object loss = (*fn)(held(held_loss));
        TORCH_CHECK(THPVariable_Check(loss.ptr()), "the loss to differentiate must be a tensor, got ",
                    std::string(py::str(py::type::of(loss).attr("__name__"))));
        return THPVariable_Unpack(loss.ptr());
      };
    }
    return cb;
  }
};

// A callback raised: the same exception goes on, saying where the schedule stood.
void mark_position(py::error_already_set& err, int64_t stage, const std::string& position) {
  const std::string where = "stage " + std::to_string(stage) + " at " + position;
  try {
    err.value().attr("pipeline_position") = where;
  } catch (const py::error_already_set&) {  // an exception type that takes no attributes: the note still says it
  }
  if (py::hasattr(err.value(), "add_note")) {  // Python 3.11+
    err.value().attr("add_note")("deepspeed_pipe_ext: raised on " + where);
  }
}

void bind_run_stage(py::module_& m) {
  py::class_<runtime::RunOptions>(m, "RunOptions", "How run_stage treats transfers beyond what the program says.")
      .def(py::init([](bool release_sent_outputs, const runtime::TensorParallelSplit* split, bool split_activations,
                       bool split_grads, double failure_wait_s) {
             TORCH_CHECK(failure_wait_s >= 0, "failure_wait_s must not be negative, got ", failure_wait_s);
             return runtime::RunOptions{release_sent_outputs, split, split_activations, split_grads,
                                        milliseconds(failure_wait_s)};
           }),
           py::arg("release_sent_outputs") = true, py::arg("split") = nullptr, py::arg("split_activations") = false,
           py::arg("split_grads") = false, py::arg("failure_wait_s") = 300.0, py::keep_alive<1, 3>(),
           "release_sent_outputs: free a sent stage output's storage (its graph stays for the backward); split: "
           "a TensorParallelSplit for DeepSpeed's pipe_partitioned (split_activations) and grad_partitioned "
           "(split_grads); failure_wait_s: how long a failed batch on a CUDA stage waits for the device work it "
           "queued before freeing its buffers (kept forever if it does not finish).")
      .def_readonly("release_sent_outputs", &runtime::RunOptions::release_sent_outputs)
      .def_readonly("split_activations", &runtime::RunOptions::split_activations)
      .def_readonly("split_grads", &runtime::RunOptions::split_grads)
      .def_property_readonly("failure_wait_s", [](const runtime::RunOptions& o) {
        return std::chrono::duration<double>(o.failure_wait).count();
      });

  m.def(
      "run_stage",
      [](const core::StageProgram& program, runtime::P2P* p2p, py::object callbacks,
         const runtime::RunOptions& options) {
        PythonCallbacks python(std::move(callbacks), program);
        const runtime::StageCallbacks cb = python.for_executor();
        runtime::Executor executor(p2p, program, options, python_wrapper_references());
        try {
          py::gil_scoped_release release;
          executor.run(cb);
        } catch (py::error_already_set& err) {
          mark_position(err, program.stage, executor.position());
          throw;
        }
        py::dict result;
        // The compute passes as they ran: (start, end, op code, micro_batch, chunk), monotonic seconds.
        py::list timeline;
        for (const auto& t : executor.timeline()) {
          timeline.append(py::make_tuple(t.start, t.end, static_cast<int>(t.op), t.micro_batch, t.chunk));
        }
        result["timeline"] = timeline;
        py::dict usage;
        usage["buffers"] = program.num_buffers;
        usage["peak_live_buffers"] = executor.buffer_usage().peak_live_buffers;
        usage["peak_activation_bytes"] = executor.buffer_usage().peak_bytes;
        result["buffer_usage"] = usage;
        result["losses"] = python.losses;
        return result;
      },
      "Runs one stage's program for a whole batch, calling back into Python only for loading, forward (+ loss), "
      "the loss backward, reductions and the optimizer step. The executor holds each micro-batch's inputs, labels, "
      "outputs and loss and passes them to the methods of `callbacks` (checked once, before the run): "
      "load() -> (inputs, labels); on stages other than the last forward(inputs, chunk) -> outputs; on the last "
      "forward_loss(inputs, labels) -> the loss, and backward_loss(loss); reduce_tied_grads(), reduce_grads(), "
      "optimizer_step(); and if present (not None) loss_to_differentiate(loss) -> tensor, before_backward(), "
      "after_backward(). Returns {'timeline': the compute passes as they ran, 'buffer_usage': the activation "
      "buffers' usage, 'losses': what forward_loss returned, detached, in the order it ran}.",
      py::arg("program"), py::arg("p2p"), py::arg("callbacks"), py::arg("options") = runtime::RunOptions{});
}

}  // namespace

void bind_runtime(py::module_& m) {
  bind_errors(m);
  bind_p2p(m);
  bind_backward_and_recomputation(m);
  bind_run_stage(m);
}

}  // namespace dpe::bindings
