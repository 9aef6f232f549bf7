#include "runtime/split_backward.h"

#include <algorithm>
#include <numeric>
#include <unordered_map>

#include <c10/util/Exception.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/variable.h>

namespace dpe::runtime {
namespace {

using torch::autograd::Edge;
using torch::autograd::edge_list;
using torch::autograd::Node;
// The graph's own node pointer type (std::shared_ptr in older torch, c10::intrusive_ptr in newer).
using NodePtr = decltype(torch::autograd::Edge::function);

// By name: dynamic_cast across libtorch's and this extension's RTTI is not reliable.
bool is_leaf_accumulator(const Node& node) { return node.name() == "torch::autograd::AccumulateGrad"; }

// The backward graph reachable from the roots, nodes numbered in discovery order.
struct Graph {
  std::vector<NodePtr> nodes;
  std::vector<std::vector<size_t>> children, parents;  // along next edges, and against them
  std::unordered_map<const Node*, size_t> index;

  size_t add(const NodePtr& node) {
    auto [it, inserted] = index.emplace(node.get(), nodes.size());
    if (inserted) {
      nodes.push_back(node);
      children.emplace_back();
      parents.emplace_back();
    }
    return it->second;
  }

  explicit Graph(const edge_list& roots) {
    std::vector<size_t> stack;
    for (const auto& edge : roots) {
      if (!edge.function) continue;
      const size_t before = nodes.size();
      const size_t i = add(edge.function);
      if (nodes.size() > before) stack.push_back(i);
    }
    while (!stack.empty()) {
      const size_t i = stack.back();
      stack.pop_back();
      for (const auto& edge : nodes[i]->next_edges()) {
        if (!edge.function) continue;
        const size_t before = nodes.size();
        const size_t j = add(edge.function);
        children[i].push_back(j);
        parents[j].push_back(i);
        if (nodes.size() > before) stack.push_back(j);
      }
    }
  }

  // Marks every node reachable from `start` against (up) or along (down) the edges.
  std::vector<bool> closure(const std::vector<size_t>& start, bool up) const {
    std::vector<bool> seen(nodes.size(), false);
    std::vector<size_t> stack(start);
    while (!stack.empty()) {
      const size_t i = stack.back();
      stack.pop_back();
      if (seen[i]) continue;
      seen[i] = true;
      for (size_t j : up ? parents[i] : children[i]) stack.push_back(j);
    }
    return seen;
  }
};

size_t find_root(std::vector<size_t>& parent, size_t x) {
  while (parent[x] != x) x = parent[x] = parent[parent[x]];
  return x;
}

// Weights (leaf accumulators that are not stage inputs) grouped for W, with
// the nodes each group restarts from. Each weight's gradient path is walked up
// from its accumulator until it meets the input path or a root: the nodes
// where it meets are where W restarts, with the gradient B saw flowing into
// them. Weights sharing a restart node form one group (one engine call in W).
struct WeightGroups {
  std::vector<std::vector<size_t>> weights, restarts;  // per group; restarts sorted, unique
};

WeightGroups group_weights(const Graph& graph, const std::vector<bool>& is_input, const std::vector<bool>& is_root,
                           const std::vector<bool>& on_input_path) {
  const size_t n = graph.nodes.size();
  std::vector<size_t> weights;
  std::unordered_map<size_t, std::vector<size_t>> restarts_of;
  std::vector<size_t> seen_by(n, n);  // the last weight whose walk visited each node (n: none)
  std::vector<size_t> stack;
  for (size_t w = 0; w < n; ++w) {
    if (is_input[w] || !is_leaf_accumulator(*graph.nodes[w])) continue;
    weights.push_back(w);
    stack.assign(graph.parents[w].begin(), graph.parents[w].end());
    auto& restarts = restarts_of[w];
    if (is_root[w]) restarts.push_back(w);  // an output that is the weight itself
    while (!stack.empty()) {
      const size_t i = stack.back();
      stack.pop_back();
      if (seen_by[i] == w) continue;
      seen_by[i] = w;
      if (on_input_path[i] || is_root[i]) {
        restarts.push_back(i);
        continue;
      }
      for (size_t p : graph.parents[i]) stack.push_back(p);
    }
  }
  std::vector<size_t> group_of(n);
  std::iota(group_of.begin(), group_of.end(), 0);
  std::unordered_map<size_t, size_t> first_weight_at;  // restart node -> a weight restarting there
  for (size_t w : weights) {
    for (size_t r : restarts_of[w]) {
      auto [it, inserted] = first_weight_at.emplace(r, w);
      if (!inserted) group_of[find_root(group_of, w)] = find_root(group_of, it->second);
    }
  }
  WeightGroups groups;
  std::unordered_map<size_t, size_t> slot_of;  // union-find root -> group
  for (size_t w : weights) {
    auto [it, inserted] = slot_of.emplace(find_root(group_of, w), groups.weights.size());
    if (inserted) {
      groups.weights.emplace_back();
      groups.restarts.emplace_back();
    }
    groups.weights[it->second].push_back(w);
    auto& rs = groups.restarts[it->second];
    rs.insert(rs.end(), restarts_of[w].begin(), restarts_of[w].end());
  }
  for (auto& rs : groups.restarts) {
    std::sort(rs.begin(), rs.end());
    rs.erase(std::unique(rs.begin(), rs.end()), rs.end());
  }
  return groups;
}

}  // namespace

DeferredWeightGrads backward_input(const std::vector<at::Tensor>& outputs, const std::vector<at::Tensor>& output_grads,
                                   const std::vector<at::Tensor>& inputs) {
  TORCH_CHECK(outputs.size() == output_grads.size(), "backward_input: ", outputs.size(), " outputs but ",
              output_grads.size(), " gradients");
  edge_list roots;
  std::vector<at::Tensor> root_grads;
  for (size_t i = 0; i < outputs.size(); ++i) {
    if (!outputs[i].requires_grad()) continue;
    roots.push_back(torch::autograd::impl::gradient_edge(outputs[i]));
    root_grads.push_back(output_grads[i]);
  }
  DeferredWeightGrads deferred;
  if (roots.empty()) return deferred;

  const Graph graph(roots);
  const size_t n = graph.nodes.size();
  // The inputs whose gradients B computes: those that require grad.
  edge_list input_edges;
  std::vector<size_t> input_of_edge;  // which of `inputs` each edge belongs to
  std::vector<bool> is_input(n, false), is_root(n, false);
  std::vector<size_t> input_nodes;
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (!inputs[i].requires_grad()) continue;
    input_edges.push_back(torch::autograd::impl::gradient_edge(inputs[i]));
    input_of_edge.push_back(i);
    auto it = graph.index.find(input_edges.back().function.get());
    if (it == graph.index.end()) continue;  // not used by the outputs: no gradient
    is_input[it->second] = true;
    input_nodes.push_back(it->second);
  }
  for (const auto& edge : roots) {
    if (edge.function) is_root[graph.index.at(edge.function.get())] = true;
  }
  // The activation-gradient path: nodes from which an input is reachable. B runs these.
  const std::vector<bool> on_input_path = graph.closure(input_nodes, /*up=*/true);

  const WeightGroups groups = group_weights(graph, is_input, is_root, on_input_path);
  const auto& group_restarts = groups.restarts;

  // B: the input gradients, and what flows into every restart node (all its inputs).
  edge_list capture = input_edges;
  std::vector<std::pair<size_t, size_t>> capture_range(groups.weights.size());  // [begin, end) per group
  std::vector<std::vector<Edge>> restart_edges(groups.weights.size());
  for (size_t g = 0; g < groups.weights.size(); ++g) {
    const auto& rs = group_restarts[g];
    capture_range[g].first = capture.size();
    for (size_t r : rs) {
      for (uint32_t k = 0; k < graph.nodes[r]->num_inputs(); ++k) {
        capture.emplace_back(graph.nodes[r], k);
        restart_edges[g].emplace_back(graph.nodes[r], k);
      }
    }
    capture_range[g].second = capture.size();
  }
  auto& engine = torch::autograd::Engine::get_default_engine();
  std::vector<at::Tensor> captured;
  if (!capture.empty()) {
    captured = engine.execute(roots, root_grads, /*keep_graph=*/true, /*create_graph=*/false,
                              /*accumulate_grad=*/false, capture);
  }
  for (size_t e = 0; e < input_edges.size(); ++e) {
    if (!captured[e].defined()) continue;
    at::Tensor input = inputs[input_of_edge[e]];
    input.mutable_grad() = captured[e];
  }

  for (size_t g = 0; g < groups.weights.size(); ++g) {
    DeferredWeightGrads::Group group;
    for (size_t w : groups.weights[g]) group.weights.emplace_back(graph.nodes[w], 0);
    // Restarting from two nodes where one leads to the other would count the
    // lower one's gradient twice (a weight used at two depths of one stage,
    // e.g. tied inside a stage); such a group reruns the whole backward
    // towards its weights instead, correct at the cost of the activation path.
    const auto& rs = group_restarts[g];
    bool nested = false;
    for (size_t a = 0; a < rs.size() && !nested && rs.size() > 1; ++a) {
      const std::vector<bool> below = graph.closure(graph.children[rs[a]], /*up=*/false);
      for (size_t b = 0; b < rs.size() && !nested; ++b) nested = b != a && below[rs[b]];
    }
    if (nested) {
      group.roots = roots;
      group.grads = root_grads;
    } else {
      for (size_t c = capture_range[g].first; c < capture_range[g].second; ++c) {
        if (!captured[c].defined()) continue;
        group.roots.push_back(restart_edges[g][c - capture_range[g].first]);
        group.grads.push_back(captured[c]);
      }
    }
    if (!group.roots.empty()) deferred.groups_.push_back(std::move(group));
  }
  return deferred;
}

void DeferredWeightGrads::run() {
  auto& engine = torch::autograd::Engine::get_default_engine();
  for (auto& group : groups_) {
    // keep_graph: a rerun group (above) goes over nodes other groups restart from.
    engine.execute(group.roots, group.grads, /*keep_graph=*/true, /*create_graph=*/false, /*accumulate_grad=*/true,
                   group.weights);
  }
  groups_.clear();
}

}  // namespace dpe::runtime
