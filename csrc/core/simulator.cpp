#include "simulator.h"

#include <algorithm>
#include <deque>
#include <map>
#include <tuple>

namespace dpe::core {

namespace {

struct Message {
  int64_t micro_batch;
  int64_t chunk;  // sender's chunk
  double arrival;
};

enum class Channel : int { Activation = 0, Grad = 1 };

std::string describe(const Instruction& in) {
  std::string s = op_name(in.op);
  if (!op_has_buffer(in.op)) return s + "()";
  s += "(buffer " + std::to_string(in.buffer_id) + ", micro-batch " + std::to_string(in.micro_batch);
  if (in.chunk != 0) s += ", chunk " + std::to_string(in.chunk);
  return s + ")";
}

class Simulator {
 public:
  // pass_costs[stage][chunk]: what one pass of that chunk costs; empty: `costs` for a whole stage, each chunk
  // a 1/chunks share.
  Simulator(const std::vector<Steps>& streams, int64_t micro_batches, int64_t chunks,
            const std::vector<int64_t>& num_buffers, const OpCosts& costs, ChunkLayout layout,
            std::vector<std::vector<OpCosts>> pass_costs = {})
      : S_(static_cast<int64_t>(streams.size())),
        M_(micro_batches),
        V_(chunks),
        layout_(layout),
        pass_costs_(std::move(pass_costs)) {
    if (pass_costs_.empty()) {
      const double v = static_cast<double>(V_);
      const OpCosts per_chunk{costs.forward / v, costs.backward_input / v, costs.backward_weight / v,
                              costs.send_latency, costs.transfer};
      pass_costs_.assign(S_, std::vector<OpCosts>(V_, per_chunk));
    }
    if (static_cast<int64_t>(pass_costs_.size()) != S_) {
      throw std::invalid_argument("pass costs for " + std::to_string(pass_costs_.size()) +
                                  " stages, the schedule has " + std::to_string(S_));
    }
    for (const auto& stage : pass_costs_) {
      if (static_cast<int64_t>(stage.size()) != V_) {
        throw std::invalid_argument("pass costs for " + std::to_string(stage.size()) +
                                    " chunks on a stage, the "
                                    "schedule has " +
                                    std::to_string(V_) + " per stage");
      }
      for (const auto& c : stage) {
        if (!(c.forward >= 0 && c.backward_input >= 0 && c.backward_weight >= 0 && c.send_latency >= 0 &&
              c.transfer >= 0)) {
          throw std::invalid_argument("pass costs must be >= 0");
        }
      }
    }
    if (S_ < 1) throw ScheduleError("no stage streams to simulate");
    if (static_cast<int64_t>(num_buffers.size()) != S_) {
      throw ScheduleError("num_buffers has " + std::to_string(num_buffers.size()) + " entries for " +
                          std::to_string(S_) + " stages");
    }
    stages_.resize(S_);
    for (int64_t i = 0; i < S_; ++i) {
      StageState& st = stages_[i];
      st.num_buffers = num_buffers[i];
      st.holder.assign(std::max<int64_t>(num_buffers[i], 0), -1);
      st.uses_left.assign(M_ * V_, 0);
      st.fwd_input.assign(M_ * V_, 0);
      st.label_loaded.assign(M_, 0);  // per micro-batch: one load serves both ends of a V
      st.fwd_done.assign(M_ * V_, 0);
      st.grad_ready.assign(M_ * V_, 0);
      st.b_done.assign(M_ * V_, 0);
      st.w_done.assign(M_ * V_, 0);
      st.program = flatten(streams[i]);
      for (const auto& [k, in] : st.program) {
        if (in.op == Op::BackwardPass || in.op == Op::BackwardInput || in.op == Op::BackwardWeight) training_ = true;
        if (op_has_buffer(in.op)) {
          check_ids(i, k, in);
          ++st.uses_left[key(in)];
        }
      }
    }
    result_.busy.assign(S_, 0.0);
    result_.peak_activations.assign(S_, 0);
    result_.peak_buffers.assign(S_, 0);
    result_.timeline.resize(S_);
    result_.sequence.resize(S_);
    for (int64_t i = 0; i < S_; ++i) result_.sequence[i].reserve(stages_[i].program.size());
  }

  SimulationResult run() {
    bool progress = true;
    while (progress) {
      progress = false;
      for (int64_t i = 0; i < S_; ++i) {
        StageState& st = stages_[i];
        while (st.pc < st.program.size() && execute(i, st.program[st.pc])) {
          result_.sequence[i].push_back(executed_++);
          ++st.pc;
          progress = true;
        }
      }
    }
    report_deadlock();
    finish_checks();
    result_.makespan = 0;
    for (const StageState& st : stages_) result_.makespan = std::max(result_.makespan, st.time);
    for (int64_t i = 0; i < S_; ++i) {
      result_.idle_fraction.push_back(result_.makespan > 0 ? 1.0 - result_.busy[i] / result_.makespan : 0.0);
    }
    return result_;
  }

 private:
  struct StageState {
    std::vector<Located> program;
    size_t pc = 0;
    double time = 0;
    int64_t num_buffers = 0;
    std::vector<int64_t> holder;  // buffer -> key of the micro-batch it holds, -1 when free
    std::vector<int64_t> uses_left;
    std::vector<char> fwd_input, label_loaded, fwd_done, grad_ready, b_done, w_done;
    int64_t active = 0, live_buffers = 0;
    bool reduced = false, stepped = false;
  };

  int64_t executed_ = 0;  // instructions executed so far, all stages together

  int64_t key(const Instruction& in) const { return static_cast<int64_t>(in.micro_batch) * V_ + in.chunk; }
  int64_t virtual_stage(int64_t stage, int64_t chunk) const { return virtual_stage_of(stage, chunk, S_, layout_); }
  int64_t rank_of(int64_t vs) const { return rank_of_virtual(vs, S_, layout_); }
  // Posts a message from `src`'s chunk to stage dst: the sender pays its
  // transfer time, and the message arrives its latency later.
  double send(int64_t src, int64_t chunk, int64_t dst) {
    if (src == dst) return stages_[src].time;
    const OpCosts& c = pass_costs_[src][chunk];
    stages_[src].time += c.transfer;
    return stages_[src].time + c.send_latency;
  }

  [[noreturn]] void fail(int64_t stage, int64_t step, const Instruction& in, const std::string& what) const {
    throw ScheduleError("stage " + std::to_string(stage) + ", step " + std::to_string(step) + ", " + describe(in) +
                        ": " + what);
  }

  void check_ids(int64_t stage, int64_t step, const Instruction& in) const {
    if (in.micro_batch < 0 || in.micro_batch >= M_) {
      fail(stage, step, in, "micro-batch out of range [0, " + std::to_string(M_) + ")");
    }
    if (in.chunk < 0 || in.chunk >= V_) fail(stage, step, in, "chunk out of range [0, " + std::to_string(V_) + ")");
    if (in.buffer_id < 0 || in.buffer_id >= stages_[stage].num_buffers) {
      fail(stage, step, in,
           "buffer id out of range: the stage has " + std::to_string(stages_[stage].num_buffers) + " buffers");
    }
  }

  void claim_buffer(int64_t stage, const Located& at) {
    StageState& st = stages_[stage];
    const int64_t k = key(at.instr), b = at.instr.buffer_id;
    if (st.holder[b] == k) return;
    if (st.holder[b] != -1) {
      const int64_t other = st.holder[b];
      fail(stage, at.step, at.instr,
           "overwrites buffer " + std::to_string(b) + " while it still holds micro-batch " +
               std::to_string(other / V_) + (V_ > 1 ? " chunk " + std::to_string(other % V_) : "") +
               ", which later instructions need");
    }
    st.holder[b] = k;
    st.live_buffers++;
    result_.peak_buffers[stage] = std::max(result_.peak_buffers[stage], st.live_buffers);
  }

  void use_buffer(int64_t stage, const Located& at) {
    StageState& st = stages_[stage];
    const int64_t k = key(at.instr), b = at.instr.buffer_id;
    if (st.holder[b] != k) {
      fail(stage, at.step, at.instr,
           st.holder[b] == -1 ? "buffer " + std::to_string(b) + " holds nothing (no load or receive before it)"
                              : "buffer " + std::to_string(b) + " holds micro-batch " +
                                    std::to_string(st.holder[b] / V_) + ", not this one");
    }
  }

  void release(int64_t stage, const Instruction& in) {
    StageState& st = stages_[stage];
    const int64_t k = key(in);
    if (--st.uses_left[k] == 0) {
      if (st.holder[in.buffer_id] == k) {
        st.holder[in.buffer_id] = -1;
        st.live_buffers--;
      }
      if (st.fwd_done[k] && !st.b_done[k]) st.active--;  // inference: activations die with the buffer
    }
  }

  // Runs a pass of in.chunk on `stage` costing `cost` (of OpCosts: forward, backward_input, or both backwards).
  void compute(int64_t stage, const Instruction& in, double OpCosts::* cost, double OpCosts::* also = nullptr) {
    StageState& st = stages_[stage];
    const OpCosts& c = pass_costs_[stage][in.chunk];
    const double seconds = c.*cost + (also ? c.*also : 0.0);
    result_.timeline[stage].push_back({st.time, st.time + seconds, in.op, in.micro_batch, in.chunk});
    st.time += seconds;
    result_.busy[stage] += seconds;
  }

  std::deque<Message>& channel(int64_t src, int64_t dst, Channel kind) {
    return channels_[std::make_tuple(src, dst, static_cast<int>(kind))];
  }

  // Takes the next message from virtual stage src_vs, checking it is the one
  // the instruction expects; false when none has been sent yet.
  bool receive(int64_t i, const Located& at, Channel kind, int64_t src_vs) {
    const Instruction& in = at.instr;
    const int64_t src = rank_of(src_vs), src_chunk = chunk_of_virtual(src_vs, S_);
    auto& q = channel(src, i, kind);
    if (q.empty()) return false;
    const Message msg = q.front();
    if (msg.micro_batch != in.micro_batch || msg.chunk != src_chunk) {
      fail(i, at.step, in,
           std::string("the next ") + (kind == Channel::Activation ? "activation" : "gradient") + " from stage " +
               std::to_string(src) + " is for micro-batch " + std::to_string(msg.micro_batch) + " (chunk " +
               std::to_string(msg.chunk) + "): sends and receives are out of order");
    }
    q.pop_front();
    stages_[i].time = std::max(stages_[i].time, msg.arrival);
    if (src != i) stages_[i].time += pass_costs_[i][in.chunk].transfer;
    return true;
  }

  // Returns false when the instruction must wait for a message.
  bool execute(int64_t i, const Located& at) {
    StageState& st = stages_[i];
    const Instruction& in = at.instr;
    const int64_t k = op_has_buffer(in.op) ? key(in) : -1;
    const int64_t vs = virtual_stage(i, in.chunk), last_vs = S_ * V_ - 1;
    switch (in.op) {
      case Op::LoadMicroBatch:
        if (vs != 0 && vs != last_vs) fail(i, at.step, in, "only the first and last stages load micro-batches");
        claim_buffer(i, at);
        if (vs == 0) st.fwd_input[k] = 1;
        st.label_loaded[in.micro_batch] = 1;
        break;
      case Op::RecvActivation: {
        if (vs == 0) fail(i, at.step, in, "the first stage has no previous stage to receive from");
        if (!receive(i, at, Channel::Activation, vs - 1)) return false;
        claim_buffer(i, at);
        st.fwd_input[k] = 1;
        break;
      }
      case Op::ForwardPass:
        use_buffer(i, at);
        if (st.fwd_done[k]) fail(i, at.step, in, "second forward pass of the same micro-batch");
        if (!st.fwd_input[k]) fail(i, at.step, in, "forward pass before its input was loaded or received");
        if (vs == last_vs && training_ && !st.label_loaded[in.micro_batch]) {
          fail(i, at.step, in, "the last stage computes the loss without having loaded the labels");
        }
        compute(i, in, &OpCosts::forward);
        st.fwd_done[k] = 1;
        st.active++;
        result_.peak_activations[i] = std::max(result_.peak_activations[i], st.active);
        if (vs == last_vs) st.grad_ready[k] = 1;
        break;
      case Op::SendActivation: {
        use_buffer(i, at);
        if (!st.fwd_done[k]) fail(i, at.step, in, "sends an activation before computing it");
        if (vs == last_vs) fail(i, at.step, in, "the last stage has no next stage to send to");
        const int64_t dst = rank_of(vs + 1);
        channel(i, dst, Channel::Activation).push_back({in.micro_batch, in.chunk, send(i, in.chunk, dst)});
        break;
      }
      case Op::RecvGrad: {
        if (vs == last_vs) fail(i, at.step, in, "the last stage has no next stage to receive gradients from");
        if (!receive(i, at, Channel::Grad, vs + 1)) return false;
        use_buffer(i, at);
        st.grad_ready[k] = 1;
        break;
      }
      case Op::BackwardPass:
      case Op::BackwardInput:
        use_buffer(i, at);
        if (!st.fwd_done[k]) fail(i, at.step, in, "backward pass before the forward pass");
        if (st.b_done[k]) fail(i, at.step, in, "second backward pass of the same micro-batch");
        if (!st.grad_ready[k]) fail(i, at.step, in, "backward pass before the output gradient was received");
        if (in.op == Op::BackwardPass) {
          compute(i, in, &OpCosts::backward_input, &OpCosts::backward_weight);
          st.w_done[k] = 1;
        } else {
          compute(i, in, &OpCosts::backward_input);
        }
        st.b_done[k] = 1;
        st.active--;
        break;
      case Op::BackwardWeight:
        use_buffer(i, at);
        if (!st.b_done[k]) fail(i, at.step, in, "weight gradient before the input gradient (BackwardInput)");
        if (st.w_done[k]) fail(i, at.step, in, "second weight-gradient pass of the same micro-batch");
        compute(i, in, &OpCosts::backward_weight);
        st.w_done[k] = 1;
        break;
      case Op::SendGrad: {
        use_buffer(i, at);
        if (!st.b_done[k]) fail(i, at.step, in, "sends a gradient before the backward pass computed it");
        if (vs == 0) fail(i, at.step, in, "the first stage has no previous stage to send gradients to");
        const int64_t dst = rank_of(vs - 1);
        channel(i, dst, Channel::Grad).push_back({in.micro_batch, in.chunk, send(i, in.chunk, dst)});
        break;
      }
      case Op::ReduceTiedGrads:
        break;
      case Op::ReduceGrads:
        check_all_backward_done(i, at, "gradients are reduced");
        st.reduced = true;
        break;
      case Op::OptimizerStep:
        check_all_backward_done(i, at, "the optimizer steps");
        if (!st.reduced) fail(i, at.step, in, "optimizer step before the data-parallel gradient reduction");
        st.stepped = true;
        break;
    }
    if (k >= 0) release(i, in);
    return true;
  }

  void check_all_backward_done(int64_t i, const Located& at, const std::string& what) {
    const StageState& st = stages_[i];
    for (int64_t k = 0; k < M_ * V_; ++k) {
      if (!st.w_done[k]) {
        fail(i, at.step, at.instr,
             what + " before micro-batch " + std::to_string(k / V_) +
                 (V_ > 1 ? " chunk " + std::to_string(k % V_) : "") + " finished its backward pass");
      }
    }
  }

  void report_deadlock() const {
    std::string blocked;
    for (int64_t i = 0; i < S_; ++i) {
      const StageState& st = stages_[i];
      if (st.pc < st.program.size()) {
        const Located& at = st.program[st.pc];
        blocked += "\n  stage " + std::to_string(i) + " waits at step " + std::to_string(at.step) + " on " +
                   describe(at.instr);
      }
    }
    if (!blocked.empty()) throw ScheduleError("deadlock: receives that no stage will ever send" + blocked);
  }

  void finish_checks() const {
    for (const auto& [where, q] : channels_) {
      if (!q.empty()) {
        const auto [src, dst, kind] = where;
        throw ScheduleError("stage " + std::to_string(src) + " sent " + std::to_string(q.size()) + " " +
                            (kind == 0 ? "activation" : "gradient") + "(s) to stage " + std::to_string(dst) +
                            " that it never receives (first: micro-batch " + std::to_string(q.front().micro_batch) +
                            ")");
      }
    }
    for (int64_t i = 0; i < S_; ++i) {
      const StageState& st = stages_[i];
      for (int64_t k = 0; k < M_ * V_; ++k) {
        const std::string which =
            "micro-batch " + std::to_string(k / V_) + (V_ > 1 ? " chunk " + std::to_string(k % V_) : "");
        if (!st.fwd_done[k])
          throw ScheduleError("stage " + std::to_string(i) + " never runs the forward pass of " + which);
        if (training_ && !st.w_done[k]) {
          throw ScheduleError("stage " + std::to_string(i) + " never finishes the backward pass of " + which);
        }
      }
      if (training_ && !st.stepped) throw ScheduleError("stage " + std::to_string(i) + " never runs OptimizerStep");
    }
  }

  const int64_t S_, M_, V_;
  const ChunkLayout layout_;
  std::vector<std::vector<OpCosts>> pass_costs_;
  bool training_ = false;
  std::vector<StageState> stages_;
  std::map<std::tuple<int64_t, int64_t, int>, std::deque<Message>> channels_;
  SimulationResult result_;
};

}  // namespace

double SimulationResult::bubble_fraction() const {
  double worst = 0;
  for (double f : idle_fraction) worst = std::max(worst, f);
  return worst;
}

SimulationResult simulate(const std::vector<Steps>& streams, int64_t micro_batches, int64_t chunks,
                          const std::vector<int64_t>& num_buffers, const OpCosts& costs, ChunkLayout layout) {
  if (micro_batches < 1 || chunks < 1) throw std::invalid_argument("micro_batches and chunks must be >= 1");
  if (costs.forward < 0 || costs.backward_input < 0 || costs.backward_weight < 0 || costs.send_latency < 0) {
    throw std::invalid_argument("costs must be >= 0");
  }
  return Simulator(streams, micro_batches, chunks, num_buffers, costs, layout).run();
}

SimulationResult simulate(const ScheduleSpec& spec, const std::vector<std::vector<OpCosts>>& pass_costs,
                          double send_latency) {
  if (!(send_latency >= 0)) throw std::invalid_argument("send_latency must be >= 0");
  std::vector<int64_t> buffers;
  const std::vector<Steps> streams = generate_all_steps(spec, &buffers);
  std::vector<std::vector<OpCosts>> costs = pass_costs;
  for (auto& stage : costs)
    for (auto& c : stage) c.send_latency = send_latency;
  return simulate(streams, spec.micro_batches, spec.chunks, buffers, costs, spec.layout);
}

SimulationResult simulate(const std::vector<Steps>& streams, int64_t micro_batches, int64_t chunks,
                          const std::vector<int64_t>& num_buffers, const std::vector<std::vector<OpCosts>>& pass_costs,
                          ChunkLayout layout) {
  if (micro_batches < 1 || chunks < 1) throw std::invalid_argument("micro_batches and chunks must be >= 1");
  return Simulator(streams, micro_batches, chunks, num_buffers, OpCosts{}, layout, pass_costs).run();
}

SimulationResult simulate(const ScheduleSpec& spec, const OpCosts& costs) {
  std::vector<int64_t> buffers;
  const std::vector<Steps> streams = generate_all_steps(spec, &buffers);
  return simulate(streams, spec.micro_batches, spec.chunks, buffers, costs, spec.layout);
}

}  // namespace dpe::core
