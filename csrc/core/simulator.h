// Discrete-event simulation of a whole pipeline's instruction streams: proves
// a schedule (matching sends and receives, no deadlock, each micro-batch's
// passes exactly once, buffers never overwritten while needed, optimizer step
// last) and measures it (makespan, bubble, peak activations).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "schedule.h"

namespace dpe::core {

// Thrown when a schedule is invalid; the message names stage, step and instruction.
class ScheduleError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Per micro-batch costs of one whole stage; with chunks > 1 each chunk costs
// 1/chunks of it. BackwardPass costs backward_input + backward_weight. Sends
// are asynchronous; a message arrives send_latency after it was sent. Each
// send or receive between two ranks also takes `transfer` of the rank's own
// time (the runtime's work to post and complete it; a hand-over inside a
// rank takes none).
struct OpCosts {
  double forward = 1.0;
  double backward_input = 1.0;
  double backward_weight = 1.0;
  double send_latency = 0.0;
  double transfer = 0.0;
};

struct TimedOp {
  double start;
  double end;
  Op op;
  int32_t micro_batch;
  int32_t chunk;
};

struct SimulationResult {
  double makespan = 0;
  std::vector<double> busy;                    // compute time per stage
  std::vector<double> idle_fraction;           // 1 - busy / makespan, per stage
  std::vector<int64_t> peak_activations;       // most micro-batches between F and B (input grad) at once
  std::vector<int64_t> peak_buffers;           // most buffers holding a live micro-batch at once
  std::vector<std::vector<TimedOp>> timeline;  // compute ops per stage
  // Per stage, per instruction in flat order: its place in one global order of
  // execution (a receive comes after its send; each stage's order is kept).
  std::vector<std::vector<int64_t>> sequence;
  double bubble_fraction() const;  // the largest idle fraction of any stage
};

// Simulates the given streams (one per stage), whose chunks sit in `layout`.
// num_buffers[i] is stage i's buffer count. A hand-over between two chunks of
// one rank (the turn of the V) arrives at once. Throws ScheduleError when the
// schedule is invalid.
SimulationResult simulate(const std::vector<Steps>& streams, int64_t micro_batches, int64_t chunks,
                          const std::vector<int64_t>& num_buffers, const OpCosts& costs,
                          ChunkLayout layout = ChunkLayout::Interleaved);

// Generates every stage's stream for `spec` and simulates it.
SimulationResult simulate(const ScheduleSpec& spec, const OpCosts& costs);

// The costs of each pass of each chunk on each stage as measured
// (pass_costs[stage][chunk], whole seconds of one micro-batch's pass of that
// chunk, not divided by the chunks); every message's send_latency is
// `send_latency`.
SimulationResult simulate(const ScheduleSpec& spec, const std::vector<std::vector<OpCosts>>& pass_costs,
                          double send_latency);
// The same with every chunk's own costs as given, its send_latency and
// transfer included (a message takes its sender's chunk's latency).
SimulationResult simulate(const std::vector<Steps>& streams, int64_t micro_batches, int64_t chunks,
                          const std::vector<int64_t>& num_buffers, const std::vector<std::vector<OpCosts>>& pass_costs,
                          ChunkLayout layout);

}  // namespace dpe::core
