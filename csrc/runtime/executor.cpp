#include "runtime/executor.h"

#include <ATen/record_function.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/function.h>

#include <c10/core/Event.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <utility>

namespace dpe::runtime {

namespace {

double monotonic_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

bool is_compute(core::Op op) { return core::op_info(op).is_compute; }

// How torch.profiler shows a pass or transfer: "pipe stage 1 forward mb 3"
// (built only while a profiler records).
std::string profiler_label(int64_t stage, const core::Instruction& in) {
  std::string label = "pipe stage " + std::to_string(stage) + " " + core::op_info(in.op).label;
  if (in.micro_batch >= 0) label += " mb " + std::to_string(in.micro_batch);
  if (in.chunk > 0) label += " chunk " + std::to_string(in.chunk);  // virtual stages
  return label;
}

// torch::autograd::backward, minus its check that each gradient has its
// output's shape: a sent output's storage is released (release_sent_outputs),
// while its graph node still knows the shape the gradient must have.
void backward_from(const std::vector<at::Tensor>& outputs, const std::vector<at::Tensor>& grads) {
  torch::autograd::edge_list roots;
  torch::autograd::variable_list root_grads;
  for (size_t i = 0; i < outputs.size(); ++i) {
    roots.push_back(torch::autograd::impl::gradient_edge(outputs[i]));
    root_grads.push_back(grads[i]);
  }
  torch::autograd::Engine::get_default_engine().execute(roots, root_grads, /*keep_graph=*/false,
                                                        /*create_graph=*/false, /*accumulate_grad=*/true);
}

// Whether the work queued so far on this thread's current stream of `device`
// finishes within `limit` (device-generic c10 events: no CUDA headers).
bool device_idle_within(const at::Device& device, std::chrono::milliseconds limit) {
  try {
    const auto* impl = c10::impl::getDeviceGuardImpl(device.type());
    c10::Event done(device.type());
    done.record(impl->getStream(device));
    const auto deadline = std::chrono::steady_clock::now() + limit;
    while (!done.query()) {
      if (std::chrono::steady_clock::now() >= deadline) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return true;
  } catch (const std::exception&) {  // a device already in error: its work will not run on
    return true;
  }
}

// Received tensors become this stage's leaves: float ones collect the
// gradient to send back (as DeepSpeed's engine does).
Activation as_stage_inputs(const Activation& received) {
  Activation out{{}, received.is_tuple};
  out.tensors.reserve(received.tensors.size());
  for (const auto& t : received.tensors) {
    // P2P reuses its own buffers for the next receive; a posted receive's are ours already.
    at::Tensor mine = received.owned ? t.detach() : t.clone().detach();
    if (mine.is_floating_point()) mine.requires_grad_(true);
    out.tensors.push_back(std::move(mine));
  }
  return out;
}
}  // namespace

Executor::Executor(P2P* p2p, const core::StageProgram& program, RunOptions options, int64_t wrapper_references)
    : p2p_(p2p),
      program_(program),
      split_(options.split),
      split_activations_(options.split != nullptr && options.split_activations),
      split_grads_(options.split != nullptr && options.split_grads),
      stage_id_(program.stage),
      num_stages_(program.stages),
      chunks_(program.chunks),
      layout_(program.layout),
      release_sent_outputs_(options.release_sent_outputs),
      failure_wait_(options.failure_wait),
      wrapper_references_(wrapper_references) {
  TORCH_CHECK(num_stages_ == 1 || p2p != nullptr, "a pipeline of ", num_stages_, " stages needs p2p");
  TORCH_CHECK(chunks_ >= 1 && (chunks_ == 1 || num_stages_ >= 2), "virtual stages (", chunks_,
              " model chunks per rank) need at least 2 pipeline stages, got ", num_stages_);
  TORCH_CHECK(p2p == nullptr || p2p->size() == num_stages_, "stage ", stage_id_, ": the program is for ", num_stages_,
              " stages, but the p2p group has ", p2p->size(), " ranks");
}

int Executor::peer_of(const core::Instruction& in) const {
  return core::transfer_peer(in, stage_id_, num_stages_, layout_);  // stage ids are the ranks of the pipe group
}

std::string Executor::where(const core::Instruction& in) const { return core::describe_step(step_, in); }

namespace {
// Captures values only (16 bytes, so std::function stores it without
// allocating); the string is built only if the transfer fails.
Describe lazily(int64_t step, const core::Instruction& in) {
  return [step = static_cast<int32_t>(step), in] { return core::describe_step(step, in); };
}
}  // namespace

void Executor::run(const StageCallbacks& cb) {
  try {
    run_steps(cb);
  } catch (P2PError& err) {
    if (err.position().empty()) err.set_position(position());
    abandon_batch();
    throw;
  } catch (...) {
    abandon_batch();
    throw;
  }
}

void Executor::abandon_batch() {
  // A CUDA stage's kernels may still use what the buffers hold: wait (bounded:
  // the compute stream may be queued behind a transfer or collective that a
  // failed peer will never match) for the work queued so far on this thread's
  // stream, before anything is freed and before the error reaches Python.
  std::optional<at::Device> cuda;
  auto note = [&cuda](const at::Tensor& t) {
    if (!cuda && t.defined() && t.is_cuda()) cuda = t.device();
  };
  for (const auto* values : {&buffers_.inputs, &buffers_.outputs}) {
    for (const auto& value : *values) {
      for (const auto& t : value.tensors) note(t);
    }
  }
  for (const auto& grads : buffers_.output_grads) {
    for (const auto& t : grads) note(t);
  }
  if (!cuda && p2p_ != nullptr && p2p_->device().is_cuda()) cuda = p2p_->device();
  if (cuda && !device_idle_within(*cuda, failure_wait_)) {
    // Still running: freeing now could hand its memory to new work. Kept for the life of the process.
    static std::mutex mutex;
    static auto* kept = new std::vector<std::unique_ptr<Executor::Buffers>>();
    std::lock_guard<std::mutex> lock(mutex);
    kept->push_back(std::make_unique<Buffers>(std::exchange(buffers_, Buffers{})));
    return;
  }
  // Freed here, as a batch that succeeds frees them (end of run_steps): on
  // the calling thread, with the GIL released, and not later in ~Executor.
  clear_buffers();
}

void Executor::run_steps(const StageCallbacks& cb) {
  const core::Steps& steps = program_.steps;
  const core::TransferPlan& plan = program_.plan;
  const int64_t num_buffers = program_.num_buffers;
  clear_buffers();
  buffers_.inputs.resize(num_buffers);
  buffers_.outputs.resize(num_buffers);
  buffers_.losses.resize(num_buffers);
  buffers_.output_grads.resize(num_buffers);
  buffers_.deferred_weight_grads.resize(num_buffers);
  step_ = 0;
  timeline_.clear();
  usage_ = BufferUsage{};
  flat_ = core::flatten(steps);
  size_t p = 0;
  for (const auto& step : steps) {
    for (const auto& in : step) {
      for (const auto& action : plan.before[p]) take_action(action);
      TORCH_CHECK(!core::op_has_buffer(in.op) || (in.buffer_id >= 0 && in.buffer_id < num_buffers), "stage ", stage_id_,
                  ", ", where(in), ": buffer ", in.buffer_id, " outside the ", num_buffers, " allocated");
      const double start = is_compute(in.op) ? monotonic_seconds() : 0.0;
      {
        RECORD_USER_SCOPE(profiler_label(stage_id_, in));
        position_ = static_cast<int32_t>(p);
        execute(in, cb);
      }
      if (is_compute(in.op)) timeline_.push_back({start, monotonic_seconds(), in.op, in.micro_batch, in.chunk});
      ++p;
    }
    if (p2p_) p2p_->reap_sends();  // frees sends a backend completed on its own (NCCL); gloo waits per channel
    account_buffers();
    ++step_;
  }
  for (const auto& action : plan.before[p]) take_action(action);
  if (p2p_) p2p_->wait_sends();
  clear_buffers();
  flat_.clear();
}

void Executor::clear_buffers() { buffers_ = Buffers{}; }

std::string Executor::position() const {
  if (position_ < 0 || position_ >= static_cast<int32_t>(flat_.size())) return "outside the schedule";
  return core::describe_step(flat_[position_].step, flat_[position_].instr);
}

void Executor::take_action(const core::TransferAction& action) {
  const auto& [step, in] = flat_.at(action.instruction);
  const int64_t saved_step = step_;
  step_ = step;  // errors name the instruction the action belongs to
  if (action.kind == core::TransferAction::Kind::PostRecv) {
    const bool posted = p2p_->post_recv(peer_of(in), tag_of(in));
    TORCH_CHECK(posted, "stage ", stage_id_, ", ", where(in),
                ": the transfer plan posts this receive ahead, but its shapes are not known yet");
  } else {  // its shapes are not known yet: its meta first
    p2p_->post_recv_after_meta(peer_of(in), tag_of(in), lazily(step_, in));
  }
  step_ = saved_step;
}

void Executor::hand_over(const core::Instruction& in, Activation value) {
  // Detached aliases, as a receiver gets them: the receiving chunk's leaves are its own.
  for (auto& t : value.tensors) t = t.detach();
  value.owned = true;
  buffers_.handed_over[{in.op == core::Op::SendGrad, program_.receiving_virtual_stage(in), in.micro_batch}] =
      std::move(value);
}

Activation Executor::take_over(const core::Instruction& in) {
  const bool grad = in.op == core::Op::RecvGrad;
  auto found = buffers_.handed_over.find({grad, virtual_stage(in), in.micro_batch});
  TORCH_CHECK(found != buffers_.handed_over.end(), "stage ", stage_id_, ", ", where(in),
              ": nothing was handed over from this rank's other chunk (virtual stage ",
              virtual_stage(in) + (grad ? 1 : -1), ") for this micro-batch");
  Activation value = std::move(found->second);
  buffers_.handed_over.erase(found);
  return value;
}

void Executor::send(const core::Instruction& in, Activation value) {
  if (is_local(in)) return hand_over(in, std::move(value));
  p2p_->send(value, peer_of(in), tag_of(in), lazily(step_, in));
}

void Executor::account_buffers() {
  int64_t live = 0, bytes = 0;
  for (size_t b = 0; b < buffers_.inputs.size(); ++b) {
    bool used = !buffers_.deferred_weight_grads[b].empty() || buffers_.losses[b] != nullptr;
    for (const auto* tensors : {&buffers_.inputs[b].tensors, &buffers_.outputs[b].tensors, &buffers_.output_grads[b]}) {
      for (const auto& t : *tensors) {
        bytes += static_cast<int64_t>(t.nbytes());
        used = true;
      }
    }
    live += used;
  }
  usage_.peak_live_buffers = std::max(usage_.peak_live_buffers, live);
  usage_.peak_bytes = std::max(usage_.peak_bytes, bytes);
}

bool Executor::held_only_here(const at::Tensor& t) const {
  const auto* slot = t.unsafeGetTensorImpl()->pyobj_slot();
  if (slot->load_pyobj() == nullptr) return t.use_count() == 1u;
  return slot->has_unique_reference() && static_cast<int64_t>(t.use_count()) == 1 + wrapper_references_;
}

void Executor::release_sent_outputs(int64_t buffer) {
  for (auto& t : buffers_.outputs[buffer].tensors) {
    // Only a tensor that autograd produced, that nothing views and nothing
    // else holds (a graph node saving it as an input, or Python code, would
    // read the released storage): its own node keeps what the backward needs,
    // the send its alias.
    if (t.requires_grad() && t.grad_fn() && !t.is_view() && t.numel() > 0 && held_only_here(t)) {
      t.set_data(at::empty({0}, t.options()));
    }
  }
}

void Executor::backward_seeds(const core::Instruction& in, std::vector<at::Tensor>* outs,
                              std::vector<at::Tensor>* grads) const {
  const int64_t b = in.buffer_id;
  // Floating-point outputs pair with the received gradients, in order.
  size_t next_grad = 0;
  for (const auto& t : buffers_.outputs[b].tensors) {
    if (!t.is_floating_point()) continue;
    TORCH_CHECK(next_grad < buffers_.output_grads[b].size(), "stage ", stage_id_, ", ", where(in),
                ": no gradient received for an output");
    const at::Tensor& g = buffers_.output_grads[b][next_grad++];
    if (t.requires_grad()) {
      outs->push_back(t);
      grads->push_back(g);
    }
  }
}

void Executor::execute(const core::Instruction& in, const StageCallbacks& cb) {
  using core::Op;
  const int64_t b = in.buffer_id;
  switch (in.op) {
    case Op::LoadMicroBatch: {
      LoadedMicroBatch loaded = cb.load();
      if (first_virtual(in)) buffers_.inputs[b] = std::move(loaded.inputs);
      if (holds_last_virtual()) buffers_.labels[in.micro_batch] = std::move(loaded.labels);
      break;
    }
    case Op::RecvActivation: {
      if (is_local(in)) {
        buffers_.inputs[b] = as_stage_inputs(take_over(in));
        break;
      }
      Activation received = p2p_->recv(peer_of(in), tag_of(in), lazily(step_, in));
      if (split_activations_) received = split_->gather(received, where(in));
      buffers_.inputs[b] = as_stage_inputs(received);
      break;
    }
    case Op::ForwardPass: {
      // Forward on clones so the buffer's leaves receive the input gradient.
      Activation x{{}, buffers_.inputs[b].is_tuple};
      for (const auto& t : buffers_.inputs[b].tensors) x.tensors.push_back(t.clone());
      if (last_virtual(in)) {
        auto labels = buffers_.labels.find(in.micro_batch);
        TORCH_CHECK(labels != buffers_.labels.end(), "stage ", stage_id_, ", ", where(in),
                    ": the loss stage has no labels for "
                    "this micro-batch (no LoadMicroBatch before it)");
        Held loss = cb.forward_loss(x, labels->second);
        buffers_.labels.erase(labels);
        if (program_.traffic == core::Traffic::Train) buffers_.losses[b] = std::move(loss);  // for its backward
      } else {
        buffers_.outputs[b] = cb.forward(x, in.chunk);
      }
      break;
    }
    case Op::SendActivation:
      send(in, split_activations_ && !is_local(in) ? split_->split(buffers_.outputs[b]) : buffers_.outputs[b]);
      if (release_sent_outputs_) release_sent_outputs(b);
      break;
    case Op::RecvGrad: {
      const bool local = is_local(in);
      Activation grads = local ? take_over(in) : p2p_->recv(peer_of(in), tag_of(in), lazily(step_, in));
      if (split_grads_ && !local) grads = split_->gather(grads, where(in));
      std::vector<at::Tensor> outs, grad_tensors;
      for (const auto& t : buffers_.outputs[b].tensors) {
        if (t.is_floating_point()) outs.push_back(t);
      }
      TORCH_CHECK(outs.size() == grads.tensors.size(), "stage ", stage_id_, ", ", where(in), ": received ",
                  grads.tensors.size(), " gradients for ", outs.size(), " floating-point outputs");
      // Copied unless they are ours: p2p reuses its receive buffers on the next receive.
      for (auto& g : grads.tensors) grad_tensors.push_back(grads.owned ? std::move(g) : g.clone());
      buffers_.output_grads[b] = std::move(grad_tensors);
      break;
    }
    case Op::BackwardPass:
      if (last_virtual(in)) {
        cb.backward_loss(buffers_.losses[b]);
        buffers_.losses[b].reset();
      } else {
        std::vector<at::Tensor> outs, grads;
        backward_seeds(in, &outs, &grads);
        if (cb.before_backward) cb.before_backward();
        if (!outs.empty()) backward_from(outs, grads);
        if (cb.after_backward) cb.after_backward();
      }
      buffers_.outputs[b] = Activation{};
      buffers_.output_grads[b].clear();
      break;
    case Op::BackwardInput: {
      TORCH_CHECK(!cb.before_backward && !cb.after_backward, "stage ", stage_id_, ", ", where(in),
                  ": split backward passes cannot run the bf16 optimizer's gradient bookkeeping; use the 1f1b "
                  "schedule with bf16");
      std::vector<at::Tensor> outs, grads;
      if (last_virtual(in)) {
        TORCH_CHECK(cb.loss_to_differentiate, "stage ", stage_id_, ", ", where(in),
                    ": a split backward on the last stage needs the loss_to_differentiate callback");
        at::Tensor loss = cb.loss_to_differentiate(buffers_.losses[b]);
        buffers_.losses[b].reset();
        TORCH_CHECK(loss.defined() && loss.numel() == 1, "stage ", stage_id_, ", ", where(in),
                    ": the loss must be a scalar tensor (got shape ", loss.defined() ? loss.sizes() : at::IntArrayRef{},
                    "); give the PipelineModule a loss_fn that reduces to one value");
        outs.push_back(loss);
        grads.push_back(at::ones_like(loss));
      } else {
        backward_seeds(in, &outs, &grads);
      }
      // The first stage sends no gradient back, so all of its backward waits for W.
      std::vector<at::Tensor> stage_inputs;
      if (!first_virtual(in)) {
        for (const auto& t : buffers_.inputs[b].tensors) {
          if (t.requires_grad()) stage_inputs.push_back(t);
        }
      }
      buffers_.deferred_weight_grads[b] = backward_input(outs, grads, stage_inputs);
      buffers_.outputs[b] = Activation{};
      buffers_.output_grads[b].clear();
      break;
    }
    case Op::BackwardWeight:
      buffers_.deferred_weight_grads[b].run();
      buffers_.deferred_weight_grads[b] = DeferredWeightGrads{};
      break;
    case Op::SendGrad: {
      Activation grads{{}, true};
      for (const auto& t : buffers_.inputs[b].tensors) {
        if (!t.is_floating_point()) continue;
        TORCH_CHECK(t.grad().defined(), "stage ", stage_id_, ", ", where(in),
                    ": an input activation received no gradient; every "
                    "floating-point tensor a stage receives must be used by its layers (or made an integer/bool "
                    "tensor)");
        grads.tensors.push_back(t.grad());
      }
      send(in, split_grads_ && !is_local(in) ? split_->split(grads) : std::move(grads));
      buffers_.inputs[b] = Activation{};
      break;
    }
    case Op::ReduceTiedGrads:
      cb.reduce_tied_grads();
      break;
    case Op::ReduceGrads:
      cb.reduce_grads();
      break;
    case Op::OptimizerStep:
      cb.optimizer_step();
      break;
  }
}

}  // namespace dpe::runtime
