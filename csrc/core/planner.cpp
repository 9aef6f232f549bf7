#include "planner.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <stdexcept>

namespace dpe::core {

namespace {

// What one part (a virtual stage: layers [first, end)) costs per micro-batch.
struct PartCost {
  double forward = 0, backward_input = 0, backward_weight = 0;
  double activation_bytes = 0;  // held from its forward until its last backward pass
  double transient_bytes = 0;   // a checkpointed group's recomputed activations, during its backward
  double gradient_bytes = 0;    // its largest layer's new weight gradient, before it is accumulated
  double state_bytes = 0, optimizer = 0, output_bytes = 0;
  // The runtime's own: a receive posted ahead and a send in flight, of an
  // activation and of a gradient (the part's input and output sizes).
  double transfer_bytes = 0;
};

// DeepSpeed's checkpointing: layers go in groups of `interval` from the
// part's first layer; a group with parameters keeps only its input and is
// recomputed in its backward (reentrant: its weights get their gradients
// there too, so a split backward's W has nothing left of it).
PartCost part_cost(const PlanRequest& r, int64_t first, int64_t end, int64_t interval, bool split) {
  PartCost p;
  const auto& L = r.layers;
  const int64_t step = interval > 0 ? interval : end - first;
  for (int64_t g = first; g < end; g += step) {
    const int64_t group_end = std::min(end, g + step);
    double f = 0, bi = 0, bw = 0, saved = 0;
    bool has_parameters = false;
    for (int64_t l = g; l < group_end; ++l) {
      f += L[l].forward;
      bi += L[l].backward_input;
      bw += L[l].backward_weight;
      saved += L[l].saved_bytes;
      has_parameters = has_parameters || L[l].has_parameters;
      p.gradient_bytes = std::max(p.gradient_bytes, L[l].parameter_bytes);
      p.state_bytes += L[l].state_bytes;
      p.optimizer += L[l].optimizer;
    }
    p.forward += f;
    if (interval > 0 && has_parameters) {
      p.activation_bytes += g == 0 ? r.input_bytes : L[g - 1].output_bytes;
      p.transient_bytes = std::max(p.transient_bytes, saved);
      p.backward_input += bi + f + (split ? bw : 0.0);
      p.backward_weight += split ? 0.0 : bw;
    } else {
      p.activation_bytes += saved;
      p.backward_input += bi;
      p.backward_weight += bw;
    }
  }
  p.output_bytes = L[end - 1].output_bytes;
  p.transfer_bytes = 2 * ((first == 0 ? r.input_bytes : L[first - 1].output_bytes) + p.output_bytes);
  return p;
}

std::string schedule_label(ScheduleKind kind, int64_t chunks) {
  std::string s = schedule_kind_name(kind);
  if (kind == ScheduleKind::Interleaved1F1B) s += " (" + std::to_string(chunks) + " chunks)";
  return s;
}

// The most micro-batches each rank holds between a forward and the pass
// that frees it (B, or W when the backward is split), walking its order.
std::vector<int64_t> in_flight_per_rank(const std::vector<ComputeOrder>& orders) {
  std::vector<int64_t> out;
  for (const auto& order : orders) {
    int64_t held = 0, peak = 0;
    for (const auto& op : order) {
      if (op.what == Compute::F) peak = std::max(peak, ++held);
      if (op.what == Compute::B || op.what == Compute::W) --held;
    }
    out.push_back(peak);
  }
  return out;
}

// Per layer: what it adds to the time a part takes per micro-batch.
std::vector<double> time_weights(const PlanRequest& r, int64_t interval) {
  std::vector<double> w;
  for (const auto& l : r.layers) {
    const double recompute = interval > 0 && l.has_parameters ? l.forward : 0.0;
    w.push_back(l.forward + l.backward_input + l.backward_weight + recompute);
  }
  return w;
}

// The min-max partition of `weights` into one part per rank such that each
// rank's memory (its parts' state, plus in_flight[rank] micro-batches of
// activations) fits `cap`. Empty when no partition fits. Bisection over the
// bound on a part's weight, with the greedy test (each rank takes the longest
// run of layers within both bounds), exact where memory grows with a part.
Boundaries memory_bounded_partition(const PlanRequest& r, const std::vector<double>& weights,
                                    const std::vector<int64_t>& in_flight, int64_t interval, bool split) {
  const int64_t n = static_cast<int64_t>(weights.size()), S = r.stages;
  std::vector<double> prefix(n + 1, 0.0);
  for (int64_t i = 0; i < n; ++i) prefix[i + 1] = prefix[i] + weights[i];
  auto memory = [&](int64_t rank, int64_t first, int64_t end) {
    const PartCost p = part_cost(r, first, end, interval, split);
    return r.base_bytes + p.state_bytes + p.transfer_bytes + static_cast<double>(in_flight[rank]) * p.activation_bytes +
           p.transient_bytes + p.gradient_bytes;
  };
  auto fits = [&](double bound, Boundaries* parts) {
    Boundaries b{0};
    int64_t first = 0;
    for (int64_t rank = 0; rank < S; ++rank) {
      const int64_t last_allowed = n - (S - rank - 1);  // leave a layer for every later rank
      int64_t end = first;
      while (end < last_allowed && prefix[end + 1] - prefix[first] <= bound &&
             memory(rank, first, end + 1) <= r.memory_per_rank)
        ++end;
      if (rank == S - 1 && end != n) return false;
      if (end == first) return false;
      b.push_back(end);
      first = end;
    }
    if (parts) *parts = b;
    return true;
  };
  double lo = 0, hi = prefix[n];
  if (!fits(hi, nullptr)) return {};
  for (int it = 0; it < 100 && hi - lo > 1e-12 * hi; ++it) {
    const double mid = 0.5 * (lo + hi);
    if (fits(mid, nullptr)) {
      hi = mid;
    } else {
      lo = mid;
    }
  }
  Boundaries parts;
  fits(hi, &parts);
  return parts;
}

void check_request(const PlanRequest& r) {
  if (r.layers.empty()) throw std::invalid_argument("the plan needs the costs of at least one layer");
  if (r.stages < 1) throw std::invalid_argument("stages must be >= 1, got " + std::to_string(r.stages));
  if (r.micro_batches.empty()) throw std::invalid_argument("give at least one micro-batch count");
  for (int64_t m : r.micro_batches)
    if (m < 1) throw std::invalid_argument("micro-batch counts must be >= 1, got " + std::to_string(m));
  for (int64_t k : r.checkpoint_intervals)
    if (k < 0) throw std::invalid_argument("checkpoint intervals must be >= 0, got " + std::to_string(k));
  for (size_t i = 0; i < r.layers.size(); ++i) {
    const LayerCost& l = r.layers[i];
    for (double v :
         {l.forward, l.backward_input, l.backward_weight, l.saved_bytes, l.output_bytes, l.state_bytes, l.optimizer}) {
      if (!(v >= 0 && std::isfinite(v))) {
        throw std::invalid_argument("layer " + std::to_string(i) +
                                    ": every cost must be a finite number >= 0 (re-run the profile)");
      }
    }
  }
  const RuntimeCost& c = r.runtime;
  for (double v :
       {c.pass_overhead, c.transfer_overhead, c.latency, c.bandwidth, r.memory_per_rank, r.base_bytes, r.input_bytes}) {
    if (!(v >= 0 && std::isfinite(v))) throw std::invalid_argument("runtime costs and memory must be finite and >= 0");
  }
}

}  // namespace

std::string PlanCandidate::name() const {
  std::string s = schedule_label(kind, chunks);
  if (checkpoint_interval > 0) s += ", checkpoint every " + std::to_string(checkpoint_interval);
  return s;
}

namespace {

// A schedule's streams for one shape (kind, chunks, micro-batches), built
// once and shared by every partition and interval the search tries.
struct ScheduleShape {
  std::vector<Steps> streams;
  std::vector<int64_t> buffers;
  std::vector<ComputeOrder> orders;
  std::string error;  // why no such schedule exists
};

ScheduleShape shape_of(ScheduleKind kind, int64_t chunks, int64_t stages, int64_t micro_batches) {
  ScheduleShape shape;
  try {
    shape.streams =
        generate_all_steps(ScheduleSpec{kind, micro_batches, stages, chunks, layout_of(kind)}, &shape.buffers);
    shape.orders = compute_orders_of(shape.streams);
  } catch (const std::invalid_argument& e) {
    shape.error = e.what();
  }
  return shape;
}

// A candidate's identity, before anything is predicted for it.
PlanCandidate candidate_of(ScheduleKind kind, int64_t chunks, int64_t interval, int64_t micro_batches) {
  PlanCandidate c;
  c.kind = kind;
  c.chunks = chunks;
  c.layout = layout_of(kind);
  c.checkpoint_interval = interval;
  c.micro_batches = micro_batches;
  return c;
}

PlanCandidate evaluate(const PlanRequest& r, const ScheduleShape& shape, ScheduleKind kind, int64_t chunks,
                       int64_t interval, int64_t micro_batches, const Boundaries& parts) {
  PlanCandidate c = candidate_of(kind, chunks, interval, micro_batches);
  c.parts = parts;
  const int64_t S = r.stages, V = chunks, n = static_cast<int64_t>(r.layers.size());
  if (static_cast<int64_t>(parts.size()) != S * V + 1 || parts.front() != 0 || parts.back() != n) {
    throw std::invalid_argument("a partition into " + std::to_string(S * V) + " parts over " + std::to_string(n) +
                                " layers needs " + std::to_string(S * V + 1) + " boundaries from 0 to " +
                                std::to_string(n));
  }
  for (int64_t p = 0; p < S * V; ++p) {
    if (parts[p + 1] <= parts[p]) {
      c.unavailable = "part " + std::to_string(p) + " has no layers";
      return c;
    }
    const int64_t first = parts[p], group_end = std::min(parts[p + 1], first + std::max<int64_t>(interval, 1));
    bool checkpointed = false;
    for (int64_t l = first; l < group_end; ++l) checkpointed = checkpointed || r.layers[l].has_parameters;
    if (interval > 0 && checkpointed && !r.layers[first].differentiable_input) {
      c.unavailable = "checkpointing from layer " + std::to_string(first) +
                      ", whose input cannot carry a gradient (token ids), would stop its gradients";
      return c;
    }
  }
  if (!shape.error.empty()) {
    c.unavailable = shape.error;
    return c;
  }
  const std::vector<Steps>& streams = shape.streams;
  const std::vector<int64_t>& buffers = shape.buffers;
  const bool split = schedule_kind_info(kind).splits_backward;
  const RuntimeCost& rt = r.runtime;
  std::vector<std::vector<OpCosts>> costs(S, std::vector<OpCosts>(V));
  std::vector<std::vector<PartCost>> part(S, std::vector<PartCost>(V));
  for (int64_t rank = 0; rank < S; ++rank) {
    for (int64_t chunk = 0; chunk < V; ++chunk) {
      const int64_t vs = virtual_stage_of(rank, chunk, S, c.layout);
      const PartCost p = part_cost(r, parts[vs], parts[vs + 1], interval, split);
      part[rank][chunk] = p;
      OpCosts& o = costs[rank][chunk];
      o.forward = p.forward + rt.pass_overhead;
      o.backward_input = p.backward_input + rt.pass_overhead + (split ? 0.0 : p.backward_weight);
      o.backward_weight = split ? p.backward_weight + rt.pass_overhead : 0.0;
      o.send_latency = rt.latency + (rt.bandwidth > 0 ? p.output_bytes / rt.bandwidth : 0.0);
      o.transfer = rt.transfer_overhead;
    }
  }
  const SimulationResult sim = simulate(streams, micro_batches, V, buffers, costs, c.layout);
  const std::vector<ComputeOrder>& orders = shape.orders;
  c.bubble = sim.bubble_fraction();
  c.stage_compute = sim.busy;
  for (int64_t rank = 0; rank < S; ++rank) {
    double finish = 0, optimizer = 0, state = 0;
    for (const auto& op : sim.timeline[rank]) finish = std::max(finish, op.end);
    for (const auto& p : part[rank]) {
      optimizer += p.optimizer;
      state += p.state_bytes + p.transfer_bytes;
    }
    c.step_time = std::max(c.step_time, finish + optimizer);
    // Activations live from a chunk's forward to the pass that frees them;
    // a checkpointed group's recomputation adds its own during a backward,
    // and a weight gradient is computed whole before it is added to .grad.
    double held = 0, peak = 0;
    for (const auto& op : orders[rank]) {
      const PartCost& p = part[rank][op.chunk];
      if (op.what == Compute::F) {
        held += p.activation_bytes;
        peak = std::max(peak, held);
      } else {
        peak = std::max(peak, held + p.transient_bytes + (op.what == Compute::BInput ? 0.0 : p.gradient_bytes));
      }
      if (op.what == Compute::B || op.what == Compute::W) held -= p.activation_bytes;
    }
    c.peak_bytes.push_back(r.base_bytes + state + peak);
  }
  c.fits = r.memory_per_rank <= 0 ||
           std::all_of(c.peak_bytes.begin(), c.peak_bytes.end(), [&](double b) { return b <= r.memory_per_rank; });
  return c;
}

// Whether `a` is the better of two evaluated candidates: one that fits before
// one that does not, then the faster.
bool better(const PlanCandidate& a, const PlanCandidate& b) {
  if (!a.unavailable.empty()) return false;
  if (!b.unavailable.empty()) return true;
  if (a.fits != b.fits) return a.fits;
  return a.step_time < b.step_time * (1 - 1e-12);
}

// Partitions of n layers into P non-empty parts: C(n - 1, P - 1), capped.
double count_partitions(int64_t n, int64_t P, double cap) {
  double count = 1;
  for (int64_t i = 1; i < P && count <= cap; ++i)
    count = count * static_cast<double>(n - P + i) / static_cast<double>(i);
  return count;
}

// Min-max balances what each part costs per micro-batch, which bounds the
// steady state but not the fill, the drain or the transfers. Where there are
// few partitions (kExhaustive at most) every one is simulated; otherwise each
// boundary moves by a layer while the simulated step gets faster (and the
// memory still fits), within kMoves evaluations.
PlanCandidate refine(const PlanRequest& r, const ScheduleShape& shape, PlanCandidate c) {
  constexpr double kExhaustive = 4096;
  constexpr int kMoves = 256;
  if (!c.unavailable.empty()) return c;
  const int64_t n = static_cast<int64_t>(r.layers.size()), P = static_cast<int64_t>(c.parts.size()) - 1;
  if (count_partitions(n, P, kExhaustive) <= kExhaustive) {
    Boundaries parts(P + 1, 0);
    parts[P] = n;
    std::function<void(int64_t)> place = [&](int64_t b) {
      if (b == P) {
        PlanCandidate next = evaluate(r, shape, c.kind, c.chunks, c.checkpoint_interval, c.micro_batches, parts);
        if (better(next, c)) c = std::move(next);
        return;
      }
      for (int64_t at = parts[b - 1] + 1; at <= n - (P - b); ++at) {
        parts[b] = at;
        place(b + 1);
      }
    };
    place(1);
    return c;
  }
  int moves = 0;
  for (bool improved = true; improved && moves < kMoves;) {
    improved = false;
    for (int64_t b = 1; b < P && moves < kMoves; ++b) {
      for (int64_t delta : {-1, 1}) {
        Boundaries moved = c.parts;
        moved[b] += delta;
        if (moved[b] <= moved[b - 1] || moved[b] >= moved[b + 1]) continue;
        ++moves;
        PlanCandidate next = evaluate(r, shape, c.kind, c.chunks, c.checkpoint_interval, c.micro_batches, moved);
        if (better(next, c)) {
          c = std::move(next);
          improved = true;
        }
      }
    }
  }
  return c;
}

}  // namespace

PlanCandidate evaluate_candidate(const PlanRequest& r, ScheduleKind kind, int64_t chunks, int64_t interval,
                                 int64_t micro_batches, const Boundaries& parts) {
  check_request(r);
  return evaluate(r, shape_of(kind, chunks, r.stages, micro_batches), kind, chunks, interval, micro_batches, parts);
}

Plan plan_pipeline(const PlanRequest& r) {
  check_request(r);
  std::vector<std::pair<ScheduleKind, int64_t>> shapes;
  const int64_t n = static_cast<int64_t>(r.layers.size());
  std::vector<ScheduleKind> kinds = r.kinds;
  if (kinds.empty()) {
    for (int k = 0; k < kNumScheduleKinds; ++k)
      if (schedule_kind_info(static_cast<ScheduleKind>(k)).trains) kinds.push_back(static_cast<ScheduleKind>(k));
  }
  for (ScheduleKind kind : kinds) {
    const ScheduleKindInfo& info = schedule_kind_info(kind);
    if (!info.trains) {
      throw std::invalid_argument(std::string("'") + info.name + "' is not a training schedule the planner can pick");
    }
    if (kind == ScheduleKind::Interleaved1F1B) {
      for (int64_t v : r.interleaved_chunks) {
        if (v < 2) throw std::invalid_argument("interleaved-1f1b needs 2 or more chunks, got " + std::to_string(v));
        shapes.push_back({kind, v});
      }
    } else {
      shapes.push_back({kind, info.min_chunks});
    }
  }
  Plan plan;
  for (int64_t m : r.micro_batches) {
    for (const auto& [kind, chunks] : shapes) {
      const ScheduleShape shape = shape_of(kind, chunks, r.stages, m);
      for (int64_t interval : r.checkpoint_intervals) {
        const int64_t num_parts = r.stages * chunks;
        if (layout_of(kind) == ChunkLayout::V && r.stages < 2) continue;
        if (n < num_parts) {
          PlanCandidate c = candidate_of(kind, chunks, interval, m);
          c.unavailable = "needs at least " + std::to_string(num_parts) + " layers, the model has " + std::to_string(n);
          plan.candidates.push_back(c);
          continue;
        }
        const bool split = schedule_kind_info(kind).splits_backward;
        const std::vector<double> weights = time_weights(r, interval);
        Boundaries parts;
        if (chunks == 1 && r.memory_per_rank > 0 && shape.error.empty()) {
          parts = memory_bounded_partition(r, weights, in_flight_per_rank(shape.orders), interval, split);
        }
        if (parts.empty()) parts = partition_minmax(weights, num_parts);
        plan.candidates.push_back(refine(r, shape, evaluate(r, shape, kind, chunks, interval, m, parts)));
      }
    }
  }
  // Fastest per micro-batch first (the same order as by step time when there is one micro-batch count).
  std::stable_sort(plan.candidates.begin(), plan.candidates.end(), [](const PlanCandidate& a, const PlanCandidate& b) {
    if (a.unavailable.empty() != b.unavailable.empty()) return a.unavailable.empty();
    return a.step_time / static_cast<double>(a.micro_batches) < b.step_time / static_cast<double>(b.micro_batches);
  });
  for (size_t i = 0; i < plan.candidates.size(); ++i) {
    const PlanCandidate& c = plan.candidates[i];
    if (c.unavailable.empty() && c.fits) {
      plan.best = static_cast<int64_t>(i);
      break;
    }
  }
  return plan;
}

}  // namespace dpe::core
