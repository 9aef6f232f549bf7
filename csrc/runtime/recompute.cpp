#include "runtime/recompute.h"

#include <mutex>
#include <unordered_set>
#include <utility>

#include <ATen/CPUGeneratorImpl.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/accumulate_grad.h>
#include <torch/custom_class.h>

namespace dpe::runtime {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The states of the generators a group can draw from: the CPU generator and
// the default generator of every accelerator device among its inputs.
class RngStates {
 public:
  static RngStates capture(const std::vector<at::Tensor>& tensors) {
    RngStates states;
    states.add(at::detail::getDefaultCPUGenerator());
    for (const auto& t : tensors) {
      if (t.defined() && !t.is_cpu() && !t.is_meta()) states.add(at::globalContext().defaultGenerator(t.device()));
    }
    return states;
  }
  void restore() const {
    for (const auto& [generator, state] : entries_) {
      at::Generator gen = generator;
      std::lock_guard<std::mutex> lock(gen.mutex());
      gen.set_state(state);
    }
  }

 private:
  void add(at::Generator gen) {
    for (const auto& entry : entries_) {
      if (entry.first == gen) return;
    }
    std::lock_guard<std::mutex> lock(gen.mutex());
    entries_.emplace_back(gen, gen.get_state());
  }
  std::vector<std::pair<at::Generator, at::Tensor>> entries_;
};

// What one checkpointed call keeps between its forward and its backward,
// besides the saved inputs.
struct Group : torch::CustomClassHolder {
  GroupForward forward;
  RngStates rng;
  std::vector<bool> input_requires_grad;
  std::vector<at::Tensor> params;  // non-reentrant mode only
};

c10::intrusive_ptr<Group> group_of(AutogradContext* ctx) {
  return c10::static_intrusive_pointer_cast<Group>(ctx->saved_data.at("group").toCapsule());
}

variable_list first_forward(AutogradContext* ctx, const c10::intrusive_ptr<Group>& group, at::TensorList inputs) {
  std::vector<at::Tensor> in(inputs.begin(), inputs.end());
  for (const auto& t : in) group->input_requires_grad.push_back(t.requires_grad());
  group->rng = RngStates::capture(in);
  variable_list outputs;
  {
    at::NoGradGuard no_grad;  // the point: no graph, so no intermediate activations are kept
    outputs = group->forward(in);
  }
  ctx->save_for_backward(in);
  ctx->saved_data["group"] = at::IValue::make_capsule(group);
  ctx->set_materialize_grads(false);
  variable_list integral;
  for (const auto& t : outputs) {
    if (!t.is_floating_point() && !t.is_complex()) integral.push_back(t);
  }
  ctx->mark_non_differentiable(integral);
  return outputs;
}

// Runs the group's forward again with gradients on, from detached copies of
// the saved inputs, under the RNG state of the first forward; the caller's
// RNG state is put back afterwards.
struct Recomputed {
  std::vector<at::Tensor> inputs, outputs;
};

Recomputed recompute(AutogradContext* ctx, Group& group) {
  Recomputed r;
  const auto saved = ctx->get_saved_variables();
  for (size_t i = 0; i < saved.size(); ++i) {
    r.inputs.push_back(saved[i].detach().requires_grad_(group.input_requires_grad[i]));
  }
  const RngStates callers = RngStates::capture(r.inputs);
  group.rng.restore();
  try {
    at::AutoGradMode grad_mode(true);
    r.outputs = group.forward(r.inputs);
  } catch (...) {
    callers.restore();
    throw;
  }
  callers.restore();
  return r;
}

// The recomputed outputs that take part in backward, with their incoming gradients.
std::pair<variable_list, variable_list> differentiable(const Recomputed& r, const variable_list& grad_outputs) {
  TORCH_CHECK(r.outputs.size() == grad_outputs.size(), "activation checkpointing: the checkpointed group returned ",
              r.outputs.size(), " tensors when recomputed but ", grad_outputs.size(),
              " in its first forward; a checkpointed group must be deterministic in what it returns");
  variable_list outs, grads;
  for (size_t i = 0; i < r.outputs.size(); ++i) {
    if (r.outputs[i].requires_grad() && grad_outputs[i].defined()) {
      outs.push_back(r.outputs[i]);
      grads.push_back(grad_outputs[i]);
    }
  }
  TORCH_CHECK(!outs.empty(),
              "activation checkpointing: none of the checkpointed group's outputs requires grad, "
              "so it has nothing to backpropagate; leave this group out of checkpointing");
  return {outs, grads};
}

// Non-reentrant mode returns gradients only for the tensors that were inputs
// of the checkpoint node; a parameter the group used but that is not among
// them would silently get no gradient, so find such leaves and refuse.
void check_all_leaves_are_inputs(const variable_list& outs, const variable_list& wrt) {
  std::unordered_set<const c10::TensorImpl*> known;
  for (const auto& t : wrt) known.insert(t.unsafeGetTensorImpl());
  std::unordered_set<const torch::autograd::Node*> seen;
  std::vector<torch::autograd::Node*> stack;
  for (const auto& o : outs) {
    if (o.grad_fn()) stack.push_back(o.grad_fn().get());
  }
  while (!stack.empty()) {
    torch::autograd::Node* node = stack.back();
    stack.pop_back();
    if (!seen.insert(node).second) continue;
    // By name: dynamic_cast across libtorch's and this extension's RTTI is not reliable.
    if (node->name() == "torch::autograd::AccumulateGrad") {
      auto* acc = static_cast<torch::autograd::AccumulateGrad*>(node);
      TORCH_CHECK(known.count(acc->variable.unsafeGetTensorImpl()),
                  "activation checkpointing (non-reentrant): the checkpointed group uses a tensor that requires grad "
                  "(shape ",
                  acc->variable.sizes(),
                  ") but is neither one of its inputs nor in `params`, so its "
                  "gradient would be lost; pass every parameter the group uses in `params`");
      continue;
    }
    for (const auto& edge : node->next_edges()) {
      if (edge.function) stack.push_back(edge.function.get());
    }
  }
}

struct ReentrantCheckpoint : torch::autograd::Function<ReentrantCheckpoint> {
  static variable_list forward(AutogradContext* ctx, c10::intrusive_ptr<Group> group, at::TensorList inputs) {
    return first_forward(ctx, group, inputs);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto group = group_of(ctx);
    const Recomputed r = recompute(ctx, *group);
    auto [outs, grads] = differentiable(r, grad_outputs);
    torch::autograd::backward(outs, grads);
    variable_list result{at::Tensor()};  // the group argument
    for (const auto& in : r.inputs) result.push_back(in.requires_grad() ? in.grad() : at::Tensor());
    return result;
  }
};

struct NonReentrantCheckpoint : torch::autograd::Function<NonReentrantCheckpoint> {
  static variable_list forward(AutogradContext* ctx, c10::intrusive_ptr<Group> group, at::TensorList inputs,
                               at::TensorList params) {
    group->params.assign(params.begin(), params.end());
    return first_forward(ctx, group, inputs);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto group = group_of(ctx);
    const Recomputed r = recompute(ctx, *group);
    auto [outs, grads] = differentiable(r, grad_outputs);
    variable_list wrt;
    for (const auto& in : r.inputs) {
      if (in.requires_grad()) wrt.push_back(in);
    }
    for (const auto& p : group->params) wrt.push_back(p);
    check_all_leaves_are_inputs(outs, wrt);
    // Gradients come back as this node's outputs rather than being
    // accumulated here, so they reach the parameters through the outer graph.
    const variable_list found =
        wrt.empty() ? variable_list{} : torch::autograd::grad(outs, wrt, grads, false, false, /*allow_unused=*/true);
    variable_list result{at::Tensor()};
    size_t next = 0;
    for (const auto& in : r.inputs) result.push_back(in.requires_grad() ? found[next++] : at::Tensor());
    for (size_t i = 0; i < group->params.size(); ++i) result.push_back(found[next++]);
    return result;
  }
};

}  // namespace

std::vector<at::Tensor> checkpoint_reentrant(GroupForward forward, const std::vector<at::Tensor>& inputs) {
  auto group = c10::make_intrusive<Group>();
  group->forward = std::move(forward);
  return ReentrantCheckpoint::apply(group, at::TensorList(inputs));
}

std::vector<at::Tensor> checkpoint_non_reentrant(GroupForward forward, const std::vector<at::Tensor>& inputs,
                                                 const std::vector<at::Tensor>& params) {
  auto group = c10::make_intrusive<Group>();
  group->forward = std::move(forward);
  std::vector<at::Tensor> trainable;
  for (const auto& p : params) {
    if (p.requires_grad()) trainable.push_back(p);
  }
  return NonReentrantCheckpoint::apply(group, at::TensorList(inputs), at::TensorList(trainable));
}

}  // namespace dpe::runtime
