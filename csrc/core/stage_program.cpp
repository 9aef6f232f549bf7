#include "core/stage_program.h"

#include <stdexcept>

#include "core/simulator.h"

namespace dpe::core {

namespace {

// Plans every stage's transfers (the pair order both sides of every pair
// agree on), optionally checks them under NCCL's rules, and keeps `stage`'s part.
StageProgram make(std::vector<Steps> all, std::vector<int64_t> buffers, int64_t micro_batches, int64_t chunks,
                  ChunkLayout layout, int64_t stage, bool dynamic_shapes, Traffic traffic, const std::string& what,
                  bool check_nccl) {
  std::vector<TransferPlan> plans;
  try {
    plans = plan_transfers(all, micro_batches, chunks, buffers, TransferOrder::PairOrder, dynamic_shapes, layout);
  } catch (const std::logic_error& err) {
    // Some interleaved shapes cannot be put in an order both sides of a pair agree on yet.
    throw std::invalid_argument(what + " with " + std::to_string(all.size()) + " stages, " + std::to_string(chunks) +
                                " model chunk(s) per rank and " + std::to_string(micro_batches) + " micro-batches" +
                                (dynamic_shapes ? " and dynamic shapes" : "") +
                                " has no transfer order both sides of every pair of "
                                "ranks agree on (" +
                                err.what() + "): use a number of micro-batches that is a multiple of the stages" +
                                (dynamic_shapes ? ", or fixed shapes between stages" : ""));
  }
  const auto stages = static_cast<int64_t>(all.size());
  if (check_nccl) {
    std::vector<CommTrace> traces;
    for (int64_t s = 0; s < stages; ++s)
      traces.push_back(trace_of(all[s], plans[s], s, stages, dynamic_shapes, layout));
    const CommCheck check = check_nccl_order(traces);
    if (!check.ok) throw std::invalid_argument(what + ": its transfers would hang under NCCL's rules: " + check.report);
  }
  return StageProgram{stages,
                      stage,
                      chunks,
                      layout,
                      micro_batches,
                      dynamic_shapes,
                      traffic,
                      std::move(all[stage]),
                      buffers[stage],
                      std::move(plans[stage]),
                      what};
}

}  // namespace

int64_t StageProgram::receiving_virtual_stage(const Instruction& in) const {
  const int64_t own = virtual_stage_of(stage, in.chunk, stages, layout);
  if (in.op == Op::SendActivation) return own + 1;
  if (in.op == Op::SendGrad) return own - 1;
  return own;
}

int StageProgram::tag_of(const Instruction& in) const {
  // Sender and receiver agree on the receiving chunk: that of the next
  // virtual stage for an activation, of the previous one for a gradient.
  const bool gradient = in.op == Op::SendGrad || in.op == Op::RecvGrad;
  return channel_tag(traffic, gradient, chunk_of_virtual(receiving_virtual_stage(in), stages));
}

bool StageProgram::holds_loss() const { return rank_of_virtual(stages * chunks - 1, stages, layout) == stage; }

int64_t StageProgram::posted_receives() const {
  int64_t n = 0;
  for (const auto& at : plan.before) n += static_cast<int64_t>(at.size());
  return n;
}

int64_t StageProgram::receives_after_meta() const {
  int64_t n = 0;
  for (const auto& at : plan.before)
    for (const auto& a : at) n += a.kind == TransferAction::Kind::PostRecvAfterMeta;
  return n;
}

StageProgram program_for_schedule(const ScheduleSpec& spec, int64_t stage, bool dynamic_shapes) {
  validate_stage(spec, stage);
  std::vector<int64_t> buffers;
  auto all = generate_all_steps(spec, &buffers);
  const Traffic traffic = spec.kind == ScheduleKind::Inference ? Traffic::Eval : Traffic::Train;
  // Several chunks with dynamic shapes can deadlock under NCCL's ordering (the core tests show
  // which): those are checked here and refused; the rest are proven by the core tests' sweep.
  return make(std::move(all), std::move(buffers), spec.micro_batches, spec.chunks, spec.layout, stage, dynamic_shapes,
              traffic, std::string("schedule '") + schedule_kind_name(spec.kind) + "'",
              spec.chunks > 1 && dynamic_shapes);
}

StageProgram program_for_compute_order(const std::vector<ComputeOrder>& orders, int64_t micro_batches, int64_t stage,
                                       bool dynamic_shapes, int64_t chunks, ChunkLayout layout) {
  if (stage < 0 || stage >= static_cast<int64_t>(orders.size())) {
    throw std::invalid_argument("stage_id " + std::to_string(stage) + " is out of range for a compute order of " +
                                std::to_string(orders.size()) + " ranks");
  }
  std::vector<int64_t> buffers;
  auto all = lower_compute_orders(orders, micro_batches, &buffers, chunks, layout);
  simulate(all, micro_batches, chunks, buffers, OpCosts{1.0, 1.0, 1.0, 0.0}, layout);
  return make(std::move(all), std::move(buffers), micro_batches, chunks, layout, stage, dynamic_shapes, Traffic::Train,
              "the compute order", /*check_nccl=*/true);
}

}  // namespace dpe::core
