// Zero-bubble schedules split a stage's backward in two: B computes only the
// gradients the previous stage waits for (w.r.t. the stage inputs), W the
// weight gradients later, in what would otherwise be a bubble.
//
// The split follows the autograd graph, not layer boundaries: B runs the
// activation-gradient path and records the gradient flowing into each node
// where a weight's gradient path leaves it (for a Linear, its addmm node);
// W restarts from those nodes towards the weights only, so no part of the
// activation-gradient chain runs twice. (torch.distributed.pipelining's
// stage_backward_input / stage_backward_weight split the same way.)
#pragma once

#include <vector>

#include <ATen/core/Tensor.h>
#include <torch/csrc/autograd/edge.h>

namespace dpe::runtime {

// What W needs of one micro-batch. Holding it keeps the micro-batch's graph
// (and its saved activations) alive until run().
class DeferredWeightGrads {
 public:
  bool empty() const { return groups_.empty(); }
  // W: accumulates the weight gradients into .grad (through the weights'
  // AccumulateGrad nodes, so their hooks run as in a full backward), then
  // releases the graph.
  void run();

 private:
  friend DeferredWeightGrads backward_input(const std::vector<at::Tensor>& outputs,
                                            const std::vector<at::Tensor>& output_grads,
                                            const std::vector<at::Tensor>& inputs);
  // Weights whose gradient paths share a node are one group: one engine call each.
  struct Group {
    std::vector<torch::autograd::Edge> roots;  // (node, input) where B left off
    std::vector<at::Tensor> grads;             // what flowed into them during B
    std::vector<torch::autograd::Edge> weights;
  };
  std::vector<Group> groups_;
};

// B: backward from `outputs` (seeded with `output_grads`) to the leaves
// `inputs` only, whose .grad it sets (an input with no path from the outputs
// keeps an undefined .grad). Weight gradients are left to the returned W.
DeferredWeightGrads backward_input(const std::vector<at::Tensor>& outputs, const std::vector<at::Tensor>& output_grads,
                                   const std::vector<at::Tensor>& inputs);

}  // namespace dpe::runtime
