// One stage's program: everything the executor needs to run a batch on one
// rank, built once (the engine caches it) and run many times. It is the one
// truth about the run: the pipeline's shape (stages, this stage, chunks and
// their layout), the instruction stream, the activation buffers, the order of
// the transfers and the tag space its messages use (core/tags.h).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/comm_order.h"
#include "core/schedule.h"
#include "core/tags.h"

namespace dpe::core {

struct StageProgram {
  int64_t stages = 1;
  int64_t stage = 0;
  int64_t chunks = 1;
  ChunkLayout layout = ChunkLayout::Interleaved;
  int64_t micro_batches = 1;
  bool dynamic_shapes = false;
  Traffic traffic = Traffic::Train;
  Steps steps;
  int64_t num_buffers = 0;
  TransferPlan plan;
  std::string what;  // names the schedule in errors ("schedule 'zb-h1'", "the compute order")

  // The channel tag of a transfer instruction of this stage (core/tags.h).
  int tag_of(const Instruction& transfer) const;
  // The virtual stage a transfer instruction delivers to (its own for a receive).
  int64_t receiving_virtual_stage(const Instruction& transfer) const;
  // The rank holding the last virtual stage (where the loss is): rank 0 in the V layout.
  bool holds_loss() const;
  // Receives posted ahead of their instruction, and those of them that take
  // their meta first (their shapes not known yet; NCCL ordering).
  int64_t posted_receives() const;
  int64_t receives_after_meta() const;
};

// The program of `stage` for a built-in schedule. Interleaved programs with
// dynamic shapes are checked under NCCL's ordering rules and refused if they
// would hang; the others are proven by the core tests' sweep. Throws
// std::invalid_argument naming what does not fit.
StageProgram program_for_schedule(const ScheduleSpec& spec, int64_t stage, bool dynamic_shapes);

// The program of `stage` for a compute order (one row per rank), proven
// before it runs: by the simulator (ScheduleError names the rank, step and
// instruction that cannot proceed), then its transfers under NCCL's rules.
StageProgram program_for_compute_order(const std::vector<ComputeOrder>& orders, int64_t micro_batches, int64_t stage,
                                       bool dynamic_shapes, int64_t chunks, ChunkLayout layout);

}  // namespace dpe::core
