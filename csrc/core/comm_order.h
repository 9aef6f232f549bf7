// Point-to-point ordering under NCCL's rules, and the executor's receive
// posting policy that obeys them.
//
// NCCL ignores tags. Between two ranks, every send and receive runs on one
// stream, in the order the rank issued them, and a send completes only
// together with its receive. So an order of transfers that is deadlock-free on
// gloo (which matches by tag and lets a posted receive wait beside a send) can
// hang on NCCL: stage 0 holding "receive gradient 0, then send activation 1"
// while stage 1 holds "receive activation 1, then send gradient 0".
//
// check_nccl_order replays what every rank issued (a trace per rank) under
// those rules and reports a deadlock naming the ranks and operations stuck.
// plan_transfers gives every stage the order in which the executor issues its
// transfers, and trace_of the operations that follow from it, so every
// generated schedule can be checked without running it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "schedule.h"
#include "simulator.h"

namespace dpe::core {

enum class CommKind : uint8_t { Send, Recv };

// One event of a rank's trace. An issue starts an operation and never blocks;
// a wait blocks the rank (and every operation it issues afterwards) until the
// operation it names completed. Issues with the same group >= 0 in a row form
// one batch (ncclGroupStart/End, torch's batch_isend_irecv) that starts as a
// whole and lets its operations progress together.
struct CommEvent {
  bool is_wait = false;
  CommKind kind = CommKind::Send;  // issue only
  int32_t peer = -1;               // issue only: the other rank
  int64_t bytes = -1;              // issue only: -1 when unknown (not compared)
  int64_t message = -1;            // issue only: what is moved, when known (plans); compared like bytes
  int32_t group = -1;              // issue only
  int32_t op = -1;                 // wait only: index of the operation among this rank's issues
  std::string label;               // what the operation moves, for reports
};
using CommTrace = std::vector<CommEvent>;

// The two kinds of event, as every trace (recorded, planned, hand-written) builds them.
CommEvent issued(CommKind kind, int32_t peer, int64_t bytes, std::string label, int64_t message = -1,
                 int32_t group = -1);
CommEvent waited(int32_t op);

struct CommCheck {
  bool ok = true;
  int64_t operations = 0;  // operations that completed
  std::string report;      // why not ok: the ranks, trace positions and operations involved
};

// Replays `ranks` (trace i is rank i) under NCCL's rules: per ordered pair of
// ranks, the k-th send from a to b matches the k-th receive on b from a, and
// their byte counts must agree; on each rank, the operations with one peer run
// in issue order (a batch is one item that heads every peer queue it touches);
// a matched send and receive complete when both head their queues and both
// ranks have passed every wait issued before them. With one_stream_per_rank,
// a rank's operations with all its peers share one queue (stricter: NCCL
// setups that run every point-to-point operation of a rank on one stream).
CommCheck check_nccl_order(const std::vector<CommTrace>& ranks, bool one_stream_per_rank = false);

// How a stage's transfers are ordered.
enum class TransferOrder : uint8_t {
  // What the executor does. Every pair of stages agrees on one order of the
  // messages between them (the order in which a simulation of the schedule
  // sends them), and each side issues its operations with that peer in that
  // order: a receive whose message comes first is posted ahead of the stage's
  // own send or receive (into buffers of its own); where its shapes are not
  // known yet (the channel's first transfer, dynamic shapes), its meta is
  // received first, then its data posted. (Holding the send back instead
  // deadlocks some interleaved programs with dynamic shapes under NCCL's
  // rules.) Receives are also posted ahead of the compute before them, one per
  // channel, where their shapes are known.
  PairOrder,
  // Transfers in the stream's order, receives posted ahead of compute only.
  // Enough for DeepSpeed's 1F1B; two stages can both send first under zb-h1.
  ProgramOrder,
  // Receives posted as soon as the previous one on their channel arrived, ahead
  // of sends to the same peer: safe on gloo only (the executor's order before
  // NCCL was considered; kept to show the hazard).
  AsSoonAsChannelFree,
};

// One transfer action the executor takes right before an instruction runs.
struct TransferAction {
  // PostRecvAfterMeta: a receive whose shapes are not known yet (the
  // channel's first transfer, or dynamic shapes) that must go ahead of a
  // transfer with the same peer: its meta is received now (waited for), then
  // its data receive is posted.
  enum class Kind : uint8_t { PostRecv, PostRecvAfterMeta } kind;
  int32_t instruction;  // flat index of the receive to post
};

// One stage's plan, in flat instruction order. before[p] runs right before
// instruction p (p == size: after the last); a receive not posted by one of
// them is issued (and waited for) by its own instruction.
struct TransferPlan {
  std::vector<std::vector<TransferAction>> before;
};

// The peer stage of a transfer instruction in a pipeline of `stages` stages
// (with chunks, a virtual stage sends to the next virtual stage, on the rank
// `layout` puts it); -1 for other instructions. The stage itself where the
// two chunks are on one rank (the turn of the V): such a hand-over is done in
// memory, never through p2p, and no plan or trace has it.
int32_t transfer_peer(const Instruction& in, int64_t stage_id, int64_t stages,
                      ChunkLayout layout = ChunkLayout::Interleaved);
// A transfer instruction whose peer is another rank.
bool is_p2p_transfer(const Instruction& in, int64_t stage_id, int64_t stages,
                     ChunkLayout layout = ChunkLayout::Interleaved);

// Plans every stage's transfers. `streams` are every stage's steps (from
// generate_all_steps, with its buffer counts). With dynamic shapes every
// transfer carries its meta and nothing is posted ahead.
std::vector<TransferPlan> plan_transfers(const std::vector<Steps>& streams, int64_t micro_batches, int64_t chunks,
                                         const std::vector<int64_t>& num_buffers, TransferOrder order,
                                         bool dynamic_shapes = false, ChunkLayout layout = ChunkLayout::Interleaved);
std::vector<TransferPlan> plan_transfers(const ScheduleSpec& spec, TransferOrder order, bool dynamic_shapes = false);

// The p2p trace the executor issues for a stage following `plan`: one tensor
// per transfer; the first transfer of a channel (every one with dynamic
// shapes) is preceded by one fixed-size meta message; a send first waits for
// the previous send on its channel, as on gloo (on NCCL the executor does not
// wait for sends, so this model is the stricter one); all sends are waited
// for at the end. Labels name step, instruction and micro-batch; each
// operation carries the identity of its message, so the checker also proves
// that every receive gets the message it expects.
CommTrace trace_of(const Steps& steps, const TransferPlan& plan, int64_t stage_id, int64_t stages,
                   bool dynamic_shapes = false, ChunkLayout layout = ChunkLayout::Interleaved);

// Plans every stage of `spec` and checks the traces together.
CommCheck check_schedule_transfers(const ScheduleSpec& spec, TransferOrder order, bool dynamic_shapes = false,
                                   bool one_stream_per_rank = false);

// Fixed size of a transfer's meta message, in int64 words (the receiver can
// post it before knowing anything about the transfer).
constexpr int64_t kMetaWords = 256;

}  // namespace dpe::core
