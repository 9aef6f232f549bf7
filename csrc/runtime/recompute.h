// Activation recomputation (DeepSpeed calls it activation checkpointing): a group of layers runs without keeping its
// intermediate activations; its forward is recomputed during backward from
// the group's saved inputs, with the RNG state of the first forward restored
// so dropout draws the same masks.
#pragma once

#include <functional>
#include <vector>

#include <ATen/ATen.h>

namespace dpe::runtime {

// A group's forward: the group's tensor inputs in, its tensor outputs out.
using GroupForward = std::function<std::vector<at::Tensor>(const std::vector<at::Tensor>&)>;

// Reentrant mode (DeepSpeed's default checkpoint): the backward of the
// recomputed group runs as a nested autograd backward, which accumulates the
// parameters' gradients directly. Only inputs that require grad connect the
// group to the rest of the graph, so at least one must (DeepSpeed's rule).
std::vector<at::Tensor> checkpoint_reentrant(GroupForward forward, const std::vector<at::Tensor>& inputs);

// Non-reentrant mode ("use_reentrant": false): `params` (the group's
// parameters that require grad) are inputs of the checkpoint node, so their
// gradients flow back through the outer graph like any other node's and the
// group works even when none of its inputs requires grad (an embedding on the
// first stage).
std::vector<at::Tensor> checkpoint_non_reentrant(GroupForward forward, const std::vector<at::Tensor>& inputs,
                                                 const std::vector<at::Tensor>& params);

}  // namespace dpe::runtime
