// Runs one stage's instruction stream (from csrc/core's schedule generators)
// for a whole train or eval batch. Buffers, sends and receives, gradient
// bookkeeping and the backward of non-last stages happen here; what must be
// Python (loading a micro-batch, a layer's forward and the loss, the loss
// backward with DeepSpeed's scaling, reductions, the optimizer step) comes in
// as callbacks.
#pragma once

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/comm_order.h"
#include "core/schedule.h"
#include "core/stage_program.h"
#include "runtime/errors.h"
#include "runtime/p2p.h"
#include "runtime/split_backward.h"
#include "runtime/tensor_parallel_split.h"

namespace dpe::runtime {

// A value the executor keeps for a micro-batch and hands back to a callback
// without reading it: the labels (any Python value DeepSpeed passes to the
// loss: tensors, ints, dicts, None) and the loss. The bindings put Python
// objects here; the runtime needs no Python headers.
using Held = std::shared_ptr<void>;

// What LoadMicroBatch produced: the stage inputs (first stage; empty
// elsewhere) and the labels (kept until the loss stage's forward).
struct LoadedMicroBatch {
  Activation inputs;
  Held labels;
};

// Python's part of a stage, by micro-batch: the executor holds each
// micro-batch's inputs, labels, outputs and loss in its buffers and passes
// them in; the callbacks keep no per-micro-batch state of their own.
struct StageCallbacks {
  // Loads the next micro-batch.
  std::function<LoadedMicroBatch()> load;
  // Stages other than the last (virtual stages, with several model chunks
  // per rank): runs chunk `chunk`'s layers on `inputs`.
  std::function<Activation(const Activation& inputs, int64_t chunk)> forward;
  // The last (virtual) stage: runs its layers and the loss on (inputs, labels);
  // returns the loss (kept for the backward while training).
  std::function<Held(const Activation& inputs, const Held& labels)> forward_loss;
  // The last stage: backward of a micro-batch's loss.
  std::function<void(const Held& loss)> backward_loss;
  // The last stage, split backward (zero-bubble schedules): the scalar that
  // backward_loss would differentiate (the loss scaled as it scales it); the
  // executor splits its backward.
  std::function<at::Tensor(const Held& loss)> loss_to_differentiate;
  // Other stages, optional: run just before and after the executor's own
  // backward of a micro-batch (DeepSpeed's bf16 optimizer moves gradients
  // there). Not supported with split backward passes.
  std::function<void()> before_backward, after_backward;
  std::function<void()> reduce_tied_grads;
  std::function<void()> reduce_grads;
  std::function<void()> optimizer_step;
};

// A compute instruction as it ran: seconds on the machine's monotonic clock
// (comparable across processes on one machine).
struct TimedInstruction {
  double start, end;
  core::Op op;
  int32_t micro_batch, chunk;
};

// What the stage's activation buffers held at their fullest during a run:
// buffers in use (a micro-batch between its forward and its last backward
// pass) and the bytes of the activation tensors the executor holds (stage
// inputs, outputs, received gradients; not what autograd saves inside the
// graph, nor the p2p receive buffers).
struct BufferUsage {
  int64_t peak_live_buffers = 0;
  int64_t peak_bytes = 0;
};

// How a run treats its transfers, beyond what the program says.
struct RunOptions {
  // A stage output's storage is freed once it is sent (its autograd graph is
  // kept for the backward) if nothing else holds it.
  bool release_sent_outputs = true;
  // 3D parallelism: activations (and/or gradients) travel split across the
  // stage's tensor-parallel ranks (DeepSpeed's pipe_partitioned and
  // grad_partitioned); `split` must outlive the run.
  const TensorParallelSplit* split = nullptr;
  bool split_activations = false;
  bool split_grads = false;
  // A failed batch on a CUDA stage waits at most this long for the stage's
  // queued device work before freeing its buffers (the engine's p2p_timeout).
  std::chrono::milliseconds failure_wait{300000};
};

class Executor {
 public:
  // Runs `program` (which must outlive the executor). p2p's group is the
  // pipe-parallel group: stage s is its rank s, so each transfer's peer is the
  // rank of the neighbouring virtual stage, on the tag the program gives it.
  // `wrapper_references`: the references a tensor's Python object holds once
  // Python code let go of it (1 where the object keeps its tensor alive, as
  // torch's PyObject preservation does in recent releases; 0 before). With
  // several chunks per rank, a hand-over between two chunks of this rank (the
  // turn of the V) stays in memory.
  Executor(P2P* p2p, const core::StageProgram& program, RunOptions options = {}, int64_t wrapper_references = 0);

  // Executes every step, issuing transfers as the program's plan orders
  // them; throws (naming stage, step and instruction) on error. A P2PError
  // leaves with the position the schedule stood at. Success or failure, the
  // buffers are freed before run() returns, on the calling thread.
  void run(const StageCallbacks& callbacks);
  // The forward and backward passes of the last run, in order.
  const std::vector<TimedInstruction>& timeline() const { return timeline_; }
  const BufferUsage& buffer_usage() const { return usage_; }
  // The instruction the last run was executing ("step 3, ForwardPass
  // (micro-batch 1)"): where a run that threw stopped.
  std::string position() const;

 private:
  void run_steps(const StageCallbacks& cb);
  void execute(const core::Instruction& in, const StageCallbacks& cb);
  void take_action(const core::TransferAction& action);
  void send(const core::Instruction& in, Activation value);
  // After its send, a stage output that only autograd still needs keeps its
  // graph but not its storage (Megatron's deallocate_output_tensor).
  void release_sent_outputs(int64_t buffer);
  bool held_only_here(const at::Tensor& t) const;
  void account_buffers();
  void clear_buffers();
  // A run that throws: waits (bounded) for the stage's device, then frees the buffers as a run that succeeds does.
  void abandon_batch();
  // The floating-point outputs of `buffer` that require grad, paired with their received gradients.
  void backward_seeds(const core::Instruction& in, std::vector<at::Tensor>* outs, std::vector<at::Tensor>* grads) const;
  std::string where(const core::Instruction& in) const;
  int64_t virtual_stage(const core::Instruction& in) const {
    return core::virtual_stage_of(stage_id_, in.chunk, num_stages_, layout_);
  }
  bool first_virtual(const core::Instruction& in) const { return virtual_stage(in) == 0; }
  bool last_virtual(const core::Instruction& in) const { return virtual_stage(in) == num_stages_ * chunks_ - 1; }
  bool holds_last_virtual() const {
    return core::rank_of_virtual(num_stages_ * chunks_ - 1, num_stages_, layout_) == stage_id_;
  }
  // The rank (in p2p's group) and tag of a transfer instruction.
  int peer_of(const core::Instruction& in) const;
  int tag_of(const core::Instruction& in) const { return program_.tag_of(in); }
  // A transfer between two chunks of this rank: handed over in memory.
  bool is_local(const core::Instruction& in) const { return chunks_ > 1 && peer_of(in) == stage_id_; }
  void hand_over(const core::Instruction& in, Activation value);
  Activation take_over(const core::Instruction& in);

  P2P* p2p_;
  const core::StageProgram& program_;
  const TensorParallelSplit* split_;
  bool split_activations_, split_grads_;
  int64_t stage_id_, num_stages_, chunks_;
  core::ChunkLayout layout_;
  bool release_sent_outputs_;
  std::chrono::milliseconds failure_wait_;
  int64_t wrapper_references_;
  int64_t step_ = 0;
  // The flat stream of the current run.
  std::vector<core::Located> flat_;
  // Everything a batch holds, freed together when it ends (a failed batch whose device work does not finish
  // keeps it for the life of the process).
  struct Buffers {
    // Hand-overs between this rank's chunks, by (gradient?, receiving virtual stage, micro-batch).
    std::map<std::tuple<bool, int64_t, int32_t>, Activation> handed_over;
    std::vector<Activation> inputs, outputs;
    // Labels by micro-batch, from LoadMicroBatch to the loss (a rank holding both ends of a V loads once, at the
    // first chunk); losses per buffer, from the loss to its backward.
    std::map<int32_t, Held> labels;
    std::vector<Held> losses;
    std::vector<std::vector<at::Tensor>> output_grads;
    std::vector<DeferredWeightGrads> deferred_weight_grads;  // between BackwardInput and BackwardWeight
  };
  Buffers buffers_;
  int32_t position_ = 0;  // flat index of the instruction running
  std::vector<TimedInstruction> timeline_;
  BufferUsage usage_;
};

}  // namespace dpe::runtime
