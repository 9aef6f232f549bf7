// The planner: from measured per-layer costs and a memory cap to a pipeline
// plan (the partition, the schedule, its model chunks and the activation
// checkpoint interval), by predicting every candidate's step time with the
// simulator and its per-rank peak memory from the schedule's own order.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "partition.h"
#include "schedule.h"
#include "simulator.h"

namespace dpe::core {

// One layer's costs for one micro-batch, as measured (the loss is charged to
// the last layer: its forward and backward run with the last stage's).
struct LayerCost {
  double forward = 0;           // seconds
  double backward_input = 0;    // seconds of the gradient w.r.t. its input (B)
  double backward_weight = 0;   // seconds of the gradient w.r.t. its weights (W)
  double saved_bytes = 0;       // what its forward keeps for the backward
  double output_bytes = 0;      // its output: what crosses to the next stage when a stage ends here
  double state_bytes = 0;       // parameters, gradients and optimizer state, held all step
  double parameter_bytes = 0;   // its parameters alone: the gradient its backward makes before adding it to .grad
  double optimizer = 0;         // seconds of its share of the optimizer step
  bool has_parameters = false;  // DeepSpeed checkpoints only layer groups with parameters
  // Its input can carry a gradient (a floating-point tensor; not token ids). A
  // reentrant checkpoint over a group whose input cannot returns an output
  // without a gradient, and the stage before it would stop learning.
  bool differentiable_input = true;
};

// What the runtime itself costs, measured between the stage ranks.
struct RuntimeCost {
  double pass_overhead = 0;      // seconds added to every compute pass (the callback, bookkeeping)
  double transfer_overhead = 0;  // seconds of a rank's own time per send or receive to another rank
  double latency = 0;            // seconds for a message to arrive, before its bytes
  double bandwidth = 0;          // bytes per second between ranks; 0: unlimited
};

struct PlanRequest {
  std::vector<LayerCost> layers;
  double input_bytes = 0;  // one micro-batch's input to the first layer
  int64_t stages = 1;
  std::vector<int64_t> micro_batches{1};  // each is a candidate (of the profiled micro-batch size)
  double memory_per_rank = 0;             // bytes; 0: no cap
  double base_bytes = 0;                  // what every rank holds whatever its layers
  RuntimeCost runtime;
  // The candidates: every training schedule by default (interleaved-1f1b with
  // each of interleaved_chunks), each with each checkpoint interval (0: none).
  std::vector<ScheduleKind> kinds;
  std::vector<int64_t> interleaved_chunks{2, 3, 4};
  std::vector<int64_t> checkpoint_intervals{0, 1, 2, 4};
};

struct PlanCandidate {
  ScheduleKind kind = ScheduleKind::Train1F1B;
  int64_t chunks = 1;
  ChunkLayout layout = ChunkLayout::Interleaved;
  int64_t checkpoint_interval = 0;
  int64_t micro_batches = 1;
  Boundaries parts;      // stages * chunks + 1 layer boundaries; part p is virtual stage p
  double step_time = 0;  // predicted seconds of one step, optimizer included
  double bubble = 0;     // the largest idle fraction of a rank
  // Predicted peak memory per rank: its layers' state, the runtime's transfer
  // buffers, and the activations of the micro-batches in flight at the fullest.
  std::vector<double> peak_bytes;
  std::vector<double> stage_compute;  // seconds of compute per rank, all micro-batches
  bool fits = true;                   // every rank within memory_per_rank
  std::string unavailable;            // why the candidate cannot run (then nothing else is set)
  std::string name() const;           // "zb-v", "interleaved-1f1b x3", with "+ checkpoint every 2"
};

struct Plan {
  std::vector<PlanCandidate> candidates;  // fastest per micro-batch first; unavailable ones last
  int64_t best = -1;                      // the fastest that fits; -1 when none does
};

// Every candidate of the request, each with its own partition: the exact
// min-max partition of the cost that bounds the schedule (each part's forward,
// backward and recomputation), and for one chunk per rank under a memory cap,
// of that cost subject to each rank's memory with the schedule's own count of
// micro-batches in flight. Throws std::invalid_argument on a bad request.
Plan plan_pipeline(const PlanRequest& request);

// One candidate on a given partition (as a user or DeepSpeed's partition
// methods would place it): its predicted time and memory.
PlanCandidate evaluate_candidate(const PlanRequest& request, ScheduleKind kind, int64_t chunks,
                                 int64_t checkpoint_interval, int64_t micro_batches, const Boundaries& parts);

}  // namespace dpe::core
