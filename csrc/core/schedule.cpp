#include "schedule.h"

#include <algorithm>
#include <deque>
#include <map>
#include <set>
#include <stdexcept>

namespace dpe::core {

namespace {

// In Op's order.
constexpr OpInfo kOps[kNumOps] = {
    {"LoadMicroBatch", "", "load", false, false},
    {"ForwardPass", "F", "forward", true, false},
    {"BackwardPass", "B", "backward", true, false},
    {"BackwardInput", "I", "backward input", true, false},
    {"BackwardWeight", "W", "backward weight", true, false},
    {"SendActivation", "", "send activation", false, true},
    {"RecvActivation", "", "recv activation", false, true},
    {"SendGrad", "", "send grad", false, true},
    {"RecvGrad", "", "recv grad", false, true},
    {"ReduceTiedGrads", "", "reduce tied grads", false, false},
    {"ReduceGrads", "", "reduce grads", false, false},
    {"OptimizerStep", "", "optimizer step", false, false},
};

// In ScheduleKind's order.
constexpr ScheduleKindInfo kKinds[kNumScheduleKinds] = {
    {ScheduleKind::Train1F1B, "1f1b", ChunkLayout::Interleaved, 1, 1, false, true},
    {ScheduleKind::Inference, "inference", ChunkLayout::Interleaved, 1, 0, false, false},
    {ScheduleKind::DataParallel, "data-parallel", ChunkLayout::Interleaved, 1, 1, false, false},
    {ScheduleKind::GPipe, "gpipe", ChunkLayout::Interleaved, 1, 1, false, true},
    {ScheduleKind::Interleaved1F1B, "interleaved-1f1b", ChunkLayout::Interleaved, 2, 0, false, true},
    {ScheduleKind::ZeroBubbleH1, "zb-h1", ChunkLayout::Interleaved, 1, 1, true, true},
    {ScheduleKind::ZeroBubbleV, "zb-v", ChunkLayout::V, 2, 2, true, true},
    {ScheduleKind::VHalf, "v-half", ChunkLayout::V, 2, 2, true, true},
    {ScheduleKind::VMin, "v-min", ChunkLayout::V, 2, 2, true, true},
};

bool is_v_training_kind(ScheduleKind kind) {
  return layout_of(kind) == ChunkLayout::V && schedule_kind_info(kind).trains;
}

Instruction buffered(Op op, int64_t buffer, int64_t micro_batch, int64_t chunk = 0) {
  return Instruction{op, static_cast<int32_t>(buffer), static_cast<int32_t>(micro_batch), static_cast<int32_t>(chunk)};
}
Instruction plain(Op op) { return Instruction{op, -1, -1, 0}; }

// ---------------------------------------------------------------- DeepSpeed's schedules

int64_t ds_train_buffers(const ScheduleSpec& s, int64_t stage_id) {
  return std::max<int64_t>(2, std::min(s.stages - stage_id, s.micro_batches));
}

// DeepSpeed's TrainSchedule._step_to_micro_batch, for non-negative step ids.
std::pair<int64_t, bool> ds_step_to_micro_batch(int64_t step, int64_t stage_id, int64_t stages) {
  const bool even_step = step % 2 == 0, even_stage = stage_id % 2 == 0;
  if (even_step && even_stage) return {step / 2 - stage_id / 2, true};
  if (!even_step && !even_stage) return {(step - 1) / 2 - stage_id / 2, true};
  if (even_step && !even_stage) return {step / 2 - stages + (stage_id + 1) / 2, false};
  return {((step - 1) / 2) - stages + 1 + stage_id / 2, false};
}

Steps ds_train_steps(const ScheduleSpec& s, int64_t stage_id) {
  const int64_t M = s.micro_batches, S = s.stages, nbuf = ds_train_buffers(s, stage_id);
  const bool has_prev = stage_id - 1 >= 0, has_next = stage_id + 1 < S;
  auto valid = [M](int64_t mb) { return 0 <= mb && mb < M; };
  const int64_t total = 2 * (M + S - 1);
  Steps steps;
  steps.reserve(total);
  int64_t prev_mb = -1;
  for (int64_t step = 0; step < total; ++step) {
    auto [mb, is_forward] = ds_step_to_micro_batch(step, stage_id, S);
    const int64_t prev_buf = valid(prev_mb) ? prev_mb % nbuf : -1, cur_buf = valid(mb) ? mb % nbuf : -1;
    Step cmds;
    if (is_forward) {
      if (valid(prev_mb) && has_prev) cmds.push_back(buffered(Op::SendGrad, prev_buf, prev_mb));
      if (valid(mb) && has_prev) cmds.push_back(buffered(Op::RecvActivation, cur_buf, mb));
    } else {
      if (valid(mb) && has_next) cmds.push_back(buffered(Op::RecvGrad, cur_buf, mb));
      if (valid(prev_mb) && has_next) cmds.push_back(buffered(Op::SendActivation, prev_buf, prev_mb));
    }
    if ((stage_id == 0 || stage_id == S - 1) && is_forward && valid(mb)) {
      cmds.push_back(buffered(Op::LoadMicroBatch, cur_buf, mb));
    }
    if (valid(mb)) cmds.push_back(buffered(is_forward ? Op::ForwardPass : Op::BackwardPass, cur_buf, mb));
    if (step == total - 1) {
      cmds.push_back(plain(Op::ReduceTiedGrads));
      cmds.push_back(plain(Op::ReduceGrads));
      cmds.push_back(plain(Op::OptimizerStep));
    }
    prev_mb = mb;
    steps.push_back(std::move(cmds));
  }
  return steps;
}

Steps ds_inference_steps(const ScheduleSpec& s, int64_t stage_id) {
  const int64_t M = s.micro_batches, S = s.stages;
  const bool has_prev = stage_id - 1 >= 0, has_next = stage_id + 1 < S, even_stage = stage_id % 2 == 0;
  auto valid = [M](int64_t mb) { return 0 <= mb && mb < M; };
  Steps steps;
  for (int64_t step = 0; step < M + S - 1; ++step) {
    const int64_t mb = step - stage_id;
    const int64_t recv_buf = even_stage ? step % 2 : (step + 1) % 2;
    const int64_t send_buf = even_stage ? (step + 1) % 2 : step % 2;
    Step cmds;
    if ((stage_id == 0 || stage_id == S - 1) && valid(mb)) cmds.push_back(buffered(Op::LoadMicroBatch, recv_buf, mb));
    auto send = [&] {
      if (has_next && valid(mb - 1)) cmds.push_back(buffered(Op::SendActivation, send_buf, mb - 1));
    };
    auto recv = [&] {
      if (has_prev && valid(mb)) cmds.push_back(buffered(Op::RecvActivation, recv_buf, mb));
    };
    if (even_stage) {
      send();
      recv();
    } else {
      recv();
      send();
    }
    if (valid(mb)) cmds.push_back(buffered(Op::ForwardPass, recv_buf, mb));
    steps.push_back(std::move(cmds));
  }
  return steps;
}

Steps ds_data_parallel_steps(const ScheduleSpec& s) {
  Steps steps;
  for (int64_t mb = 0; mb < s.micro_batches; ++mb) {
    Step cmds = {buffered(Op::LoadMicroBatch, 0, mb), buffered(Op::ForwardPass, 0, mb),
                 buffered(Op::BackwardPass, 0, mb)};
    if (mb == s.micro_batches - 1) {
      cmds.push_back(plain(Op::ReduceGrads));
      cmds.push_back(plain(Op::OptimizerStep));
    }
    steps.push_back(std::move(cmds));
  }
  return steps;
}

// ---------------------------------------------------------------- compute orders

ComputeOrder gpipe_order(const ScheduleSpec& s) {
  ComputeOrder order;
  for (int64_t mb = 0; mb < s.micro_batches; ++mb) order.push_back({Compute::F, mb, 0});
  for (int64_t mb = 0; mb < s.micro_batches; ++mb) order.push_back({Compute::B, mb, 0});
  return order;
}

// List scheduling of the whole pipeline under unit costs (F = 1, B = 1 and
// W = 1 when the backward is split, else B = 2). Each rank takes its forwards
// and backwards in the given sequences; whenever it is free it runs, in this
// order of preference: the next backward if its gradient has arrived (it is
// on the critical path); a deferred W if more than `max_deferred_w` are
// pending; the next forward if its input has arrived and fewer than
// `max_in_flight` micro-batches sit between forward and backward; any
// deferred W (filling what would be a bubble). The per-rank orders it
// produces are the schedule. They are executable under any costs: a stream
// that never deadlocks under one timing never does under another, since
// receives are matched in order (the simulator checks this).
struct RankPlan {
  std::vector<std::pair<int64_t, int64_t>> forwards, backwards;  // (micro_batch, chunk) in order
  // Instead of the sequences above: each chunk's passes in micro-batch order,
  // picked at run time among the chunks with work (the V layout): forwards of
  // the deepest chunk first (towards the loss), backwards of the shallowest
  // (the gradient the ranks before this one wait for).
  bool ready_chunk_first = false;
  // Micro-batches between F and B count against max_in_flight; with this,
  // until their W (all of their state, not just the activations B needs).
  bool in_flight_until_w = false;
  int64_t max_in_flight = 1;
  int64_t max_deferred_w = 0;
  // V layout: a forward of the rank's first chunk runs only while one more
  // micro-batch would still fit, so the second chunk's forward of a
  // micro-batch coming back always finds room (backwards take none). The
  // micro-batches coming back arrive in order and each finishes its second
  // chunk on this rank before the next needs the room, so no bound of 2 or
  // more deadlocks (the core tests run every S <= 16, M <= 64).
  bool reserve_turn = false;
};

std::vector<ComputeOrder> list_schedule(const ScheduleSpec& s, const std::vector<RankPlan>& plans, bool split) {
  const int64_t M = s.micro_batches, S = s.stages, V = s.chunks, VS = S * V;
  constexpr int64_t kNever = INT64_MAX / 4;
  auto idx = [M](int64_t vs, int64_t mb) { return vs * M + mb; };
  auto vs_of = [&](int64_t rank, int64_t chunk) { return virtual_stage_of(rank, chunk, S, s.layout); };
  std::vector<int64_t> act_ready(VS * M, kNever), grad_ready(VS * M, kNever);
  for (int64_t mb = 0; mb < M; ++mb) act_ready[idx(0, mb)] = 0;
  std::vector<ComputeOrder> orders(S);
  std::vector<size_t> next_f(S, 0), next_b(S, 0), w_done(S, 0);
  std::vector<std::vector<int64_t>> chunk_f(S, std::vector<int64_t>(V, 0)), chunk_b(S, std::vector<int64_t>(V, 0));
  std::vector<int64_t> busy_until(S, 0);
  std::vector<std::deque<std::pair<int64_t, int64_t>>> pending_w(S);
  const int64_t b_cost = split ? 1 : 2;
  int64_t remaining = S * M * V * (split ? 3 : 2);
  const int64_t time_limit = 8 * (M * V + S) * 3 + 16;
  // The next forward (or backward) of rank i whose input (gradient) has
  // arrived by t, as (micro_batch, chunk); (-1, -1) when none.
  auto next_ready = [&](int64_t i, int64_t t, bool forward) -> std::pair<int64_t, int64_t> {
    const RankPlan& plan = plans[i];
    const auto& ready = forward ? act_ready : grad_ready;
    if (!plan.ready_chunk_first) {
      const auto& seq = forward ? plan.forwards : plan.backwards;
      const size_t n = forward ? next_f[i] : next_b[i];
      if (n < seq.size() && ready[idx(vs_of(i, seq[n].second), seq[n].first)] <= t) return seq[n];
      return {-1, -1};
    }
    const auto& next = forward ? chunk_f[i] : chunk_b[i];
    std::pair<int64_t, int64_t> best{-1, -1};
    for (int64_t c = 0; c < V; ++c) {
      if (next[c] >= M || ready[idx(vs_of(i, c), next[c])] > t) continue;
      if (best.second < 0 || (forward ? vs_of(i, c) > vs_of(i, best.second) : vs_of(i, c) < vs_of(i, best.second))) {
        best = {next[c], c};
      }
    }
    return best;
  };
  for (int64_t t = 0; remaining > 0; ++t) {
    if (t > time_limit) {
      throw std::invalid_argument(std::string("no ") + schedule_kind_name(s.kind) +
                                  " schedule exists for micro_batches=" + std::to_string(M) +
                                  ", stages=" + std::to_string(S) + ", chunks=" + std::to_string(V) +
                                  ": use more micro-batches or fewer chunks");
    }
    for (int64_t i = 0; i < S; ++i) {
      if (busy_until[i] > t) continue;
      const RankPlan& plan = plans[i];
      const size_t released = plan.in_flight_until_w ? w_done[i] : next_b[i];
      const int64_t in_flight = static_cast<int64_t>(next_f[i]) - static_cast<int64_t>(released);
      auto run_w = [&] {
        const auto [mb, c] = pending_w[i].front();
        pending_w[i].pop_front();
        ++w_done[i];
        orders[i].push_back({Compute::W, mb, c});
        busy_until[i] = t + 1;
      };
      bool ran = false;
      if (const auto [mb, c] = next_ready(i, t, /*forward=*/false); c >= 0) {
        const int64_t vs = vs_of(i, c);
        ++next_b[i];
        ++chunk_b[i][c];
        orders[i].push_back({split ? Compute::BInput : Compute::B, mb, c});
        busy_until[i] = t + b_cost;
        if (vs > 0) grad_ready[idx(vs - 1, mb)] = t + b_cost;
        if (split) pending_w[i].push_back({mb, c});
        ran = true;
      }
      if (!ran && static_cast<int64_t>(pending_w[i].size()) > plan.max_deferred_w) {
        run_w();
        ran = true;
      }
      if (!ran && in_flight < plan.max_in_flight) {
        auto [mb, c] = next_ready(i, t, /*forward=*/true);
        if (plan.reserve_turn && c == 0 && in_flight + 2 > plan.max_in_flight) c = -1;
        if (c >= 0) {
          const int64_t vs = vs_of(i, c);
          ++next_f[i];
          ++chunk_f[i][c];
          orders[i].push_back({Compute::F, mb, c});
          busy_until[i] = t + 1;
          if (vs + 1 < VS) {
            act_ready[idx(vs + 1, mb)] = t + 1;
          } else {
            grad_ready[idx(vs, mb)] = t + 1;  // the loss is computed with the last forward
          }
          ran = true;
        }
      }
      if (!ran && !pending_w[i].empty()) {
        run_w();
        ran = true;
      }
      if (ran) --remaining;
    }
  }
  return orders;
}

// ZB-H1 (Qi et al., ICLR 2024): 1F1B's forward/backward order and activation
// bound (stage i keeps at most stages - i micro-batches between F and B), with
// the backward split into B and W and up to stages - 1 W's deferred to fill
// the bubbles. Under unit costs each stage idles (stages - 1) * (F + B - W),
// against 1F1B's (stages - 1) * (F + B + W).
// Makespan of per-rank compute orders under the list scheduler's unit costs,
// or -1 when they deadlock (a rank waits for an input that never comes).
int64_t unit_cost_makespan(const ScheduleSpec& s, const std::vector<ComputeOrder>& orders) {
  const int64_t M = s.micro_batches, S = s.stages, VS = S * s.chunks;
  constexpr int64_t kNever = INT64_MAX / 4;
  auto idx = [M](int64_t vs, int64_t mb) { return vs * M + mb; };
  std::vector<int64_t> act_done(VS * M, kNever), grad_done(VS * M, kNever), clock(S, 0);
  std::vector<size_t> pc(S, 0);
  for (bool progress = true; progress;) {
    progress = false;
    for (int64_t i = 0; i < S; ++i) {
      while (pc[i] < orders[i].size()) {
        const ComputeOp& op = orders[i][pc[i]];
        const int64_t vs = virtual_stage_of(i, op.chunk, S, s.layout);
        int64_t ready = 0, cost = 1;
        if (op.what == Compute::F) {
          ready = vs == 0 ? 0 : act_done[idx(vs - 1, op.micro_batch)];
        } else if (op.what != Compute::W) {
          ready = vs == VS - 1 ? act_done[idx(vs, op.micro_batch)] : grad_done[idx(vs + 1, op.micro_batch)];
          cost = op.what == Compute::B ? 2 : 1;
        }
        if (ready >= kNever) break;
        clock[i] = std::max(clock[i], ready) + cost;
        if (op.what == Compute::F) act_done[idx(vs, op.micro_batch)] = clock[i];
        if (op.what == Compute::B || op.what == Compute::BInput) grad_done[idx(vs, op.micro_batch)] = clock[i];
        ++pc[i];
        progress = true;
      }
    }
  }
  for (int64_t i = 0; i < S; ++i)
    if (pc[i] < orders[i].size()) return -1;
  return *std::max_element(clock.begin(), clock.end());
}

// Interleaved 1F1B (Megatron's virtual pipeline stages): rank i holds chunks
// c = 0..chunks-1, virtual stage c * stages + i. Micro-batches go in rounds
// of `stages`; within a round every chunk runs over the round's micro-batches
// (backward: chunks in reverse). Megatron's order: rank i runs
// 2 * (stages - i - 1) + (chunks - 1) * stages warm-up forwards, then
// alternates one forward and one backward. With micro_batches a multiple of
// stages that is exact, bubble (stages - 1) / (chunks * micro_batches +
// stages - 1) under unit costs. A short last round can make the fixed order
// deadlock or idle; then the same sequences are list-scheduled, and the
// faster of the two valid orders is taken.
std::vector<ComputeOrder> interleaved_orders(const ScheduleSpec& s) {
  const int64_t M = s.micro_batches, S = s.stages, V = s.chunks, total = M * V;
  RankPlan base;
  for (int64_t round_start = 0; round_start < M; round_start += S) {
    const int64_t round_end = std::min(M, round_start + S);
    for (int64_t c = 0; c < V; ++c)
      for (int64_t mb = round_start; mb < round_end; ++mb) base.forwards.push_back({mb, c});
    for (int64_t c = V - 1; c >= 0; --c)
      for (int64_t mb = round_start; mb < round_end; ++mb) base.backwards.push_back({mb, c});
  }
  std::vector<RankPlan> plans(S, base);
  std::vector<ComputeOrder> fixed(S);
  for (int64_t i = 0; i < S; ++i) {
    const int64_t warmup = std::min(total, (S - i - 1) * 2 + (V - 1) * S);
    plans[i].max_in_flight = warmup + 1;
    ComputeOrder& order = fixed[i];
    int64_t f = 0, b = 0;
    auto push = [&](Compute what, const std::pair<int64_t, int64_t>& mc) {
      order.push_back({what, mc.first, mc.second});
    };
    for (; f < warmup; ++f) push(Compute::F, base.forwards[f]);
    for (; f < total; ++f, ++b) {
      push(Compute::F, base.forwards[f]);
      push(Compute::B, base.backwards[b]);
    }
    for (; b < total; ++b) push(Compute::B, base.backwards[b]);
  }
  if (M % S == 0) return fixed;
  const int64_t fixed_time = unit_cost_makespan(s, fixed);
  std::vector<ComputeOrder> listed = list_schedule(s, plans, /*split=*/false);
  if (fixed_time >= 0 && fixed_time <= unit_cost_makespan(s, listed)) return fixed;
  return listed;
}

// Inference over virtual stages: every rank runs the interleaved schedule's
// forwards in its order (rounds of `stages` micro-batches, chunk by chunk).
std::vector<ComputeOrder> interleaved_inference_orders(const ScheduleSpec& s) {
  const int64_t M = s.micro_batches, S = s.stages, V = s.chunks;
  ComputeOrder order;
  for (int64_t round_start = 0; round_start < M; round_start += S)
    for (int64_t c = 0; c < V; ++c)
      for (int64_t mb = round_start; mb < std::min(M, round_start + S); ++mb) order.push_back({Compute::F, mb, c});
  return std::vector<ComputeOrder>(S, order);
}

std::vector<ComputeOrder> zero_bubble_h1_orders(const ScheduleSpec& s) {
  std::vector<RankPlan> plans(s.stages);
  for (int64_t i = 0; i < s.stages; ++i) {
    for (int64_t mb = 0; mb < s.micro_batches; ++mb) {
      plans[i].forwards.push_back({mb, 0});
      plans[i].backwards.push_back({mb, 0});
    }
    plans[i].max_in_flight = s.stages - i;
    plans[i].max_deferred_w = s.stages - 1;
  }
  return list_schedule(s, plans, /*split=*/true);
}

// ZB-V (Qi et al., ICLR 2024): two chunks per rank in the V layout (rank i
// holds virtual stages i and 2 * stages - 1 - i) with the backward split into
// B and W. Each rank runs whichever chunk has work (forwards of the deeper
// chunk first, backwards of the shallower), and defers W's into
// the gaps, keeping at most 2 * stages chunk micro-batches between F and W
// (1F1B's first stage: stages whole-stage activations; a W is run early when
// a forward needs the room). Under unit costs each rank idles stages - 1 chunk
// passes in all (a pass or two more for some shapes), against ZB-H1's
// (stages - 1) * (F + B - W) of whole stages.
std::vector<ComputeOrder> zero_bubble_v_orders(const ScheduleSpec& s) {
  RankPlan plan;
  plan.ready_chunk_first = true;
  plan.in_flight_until_w = true;
  plan.max_in_flight = 2 * s.stages;
  plan.max_deferred_w = 2 * s.stages;  // never reached: the in-flight bound forces W's first
  return list_schedule(s, std::vector<RankPlan>(s.stages, plan), /*split=*/true);
}

// V-Half and V-Min (after Qi et al., NeurIPS 2024, "Pipeline Parallelism
// with Controllable Memory"): zb-v's V and split backward, list-scheduled
// under a lower bound on the chunk micro-batches a rank keeps between F and W
// (v_activation_limit), so every rank holds about a half (a third) of 1F1B's
// first-stage activations, plus one chunk micro-batch, for a larger bubble
// than zb-v's. Not the paper's hand-built repeating blocks: under unit costs
// these bubbles are larger than the paper's (the core tests print them).
std::vector<ComputeOrder> controlled_memory_v_orders(const ScheduleSpec& s) {
  RankPlan plan;
  plan.ready_chunk_first = true;
  plan.in_flight_until_w = true;
  plan.reserve_turn = true;
  plan.max_in_flight = v_activation_limit(s.kind, s.stages);
  plan.max_deferred_w = 2 * s.stages;  // never reached: the in-flight bound forces W's first
  return list_schedule(s, std::vector<RankPlan>(s.stages, plan), /*split=*/true);
}

// Inference over the V layout: the forwards of ZB-V's orders, in their order
// (dropping passes only drops dependencies, so what ran in training runs here).
std::vector<ComputeOrder> v_inference_orders(const ScheduleSpec& s) {
  std::vector<ComputeOrder> orders = zero_bubble_v_orders(s);
  for (auto& order : orders) {
    order.erase(std::remove_if(order.begin(), order.end(), [](const ComputeOp& op) { return op.what != Compute::F; }),
                order.end());
  }
  return orders;
}

// Turns a compute order into steps: each compute op becomes one step with its
// loads/receives before and its sends after. Buffers are allocated when a
// micro-batch's input arrives and freed after its last backward op, lowest
// free id first; `peak` returns the most buffers live at once.
Steps lower(const ScheduleSpec& s, int64_t stage_id, const ComputeOrder& order, int64_t* peak, bool train = true) {
  const int64_t S = s.stages, V = s.chunks, last_virtual = S * V - 1;
  std::map<std::pair<int64_t, int64_t>, int64_t> buffer_of;  // (mb, chunk) -> buffer
  std::vector<bool> in_use;
  int64_t most = 0;
  Steps steps;
  steps.reserve(order.size());
  std::set<std::pair<int64_t, int64_t>> forwarded;
  // The buffer of a backward pass's micro-batch: that of its forward, which must come first.
  auto buffer_for = [&](const ComputeOp& op) {
    auto found = buffer_of.find({op.micro_batch, op.chunk});
    if (found == buffer_of.end()) {
      throw std::invalid_argument("rank " + std::to_string(stage_id) + ", action " + std::to_string(steps.size()) +
                                  " (" + format_action(op, S, stage_id, s.layout) +
                                  "): a backward pass of micro-batch " + std::to_string(op.micro_batch) +
                                  " without its forward before it (or after its "
                                  "backward already finished); every micro-batch runs F, then B (or I, then W)");
    }
    return found->second;
  };
  for (const ComputeOp& op : order) {
    const int64_t vs = virtual_stage_of(stage_id, op.chunk, S, s.layout);
    const auto key = std::make_pair(op.micro_batch, op.chunk);
    Step cmds;
    if (op.what == Compute::F) {
      if (!forwarded.insert(key).second) {
        throw std::invalid_argument("rank " + std::to_string(stage_id) + ", action " + std::to_string(steps.size()) +
                                    " (" + format_action(op, S, stage_id, s.layout) + "): micro-batch " +
                                    std::to_string(op.micro_batch) + " runs its forward twice");
      }
      int64_t buf = std::find(in_use.begin(), in_use.end(), false) - in_use.begin();
      if (buf == static_cast<int64_t>(in_use.size())) in_use.push_back(false);
      in_use[buf] = true;
      buffer_of[key] = buf;
      most = std::max<int64_t>(most, std::count(in_use.begin(), in_use.end(), true));
      // One load per micro-batch: a rank holding both ends (the V layout's first) loads at the first.
      const bool loaded_at_first = vs == last_virtual && rank_of_virtual(0, S, s.layout) == stage_id;
      if (vs == 0 || (vs == last_virtual && !loaded_at_first)) {
        cmds.push_back(buffered(Op::LoadMicroBatch, buf, op.micro_batch, op.chunk));
      }
      if (vs > 0) cmds.push_back(buffered(Op::RecvActivation, buf, op.micro_batch, op.chunk));
      cmds.push_back(buffered(Op::ForwardPass, buf, op.micro_batch, op.chunk));
      if (vs < last_virtual) cmds.push_back(buffered(Op::SendActivation, buf, op.micro_batch, op.chunk));
      if (!train) {  // no backward: the buffer is free once its output is sent
        in_use[buf] = false;
        buffer_of.erase(key);
      }
    } else if (op.what == Compute::W) {
      const int64_t buf = buffer_for(op);
      cmds.push_back(buffered(Op::BackwardWeight, buf, op.micro_batch, op.chunk));
      in_use[buf] = false;
      buffer_of.erase(key);
    } else {
      const int64_t buf = buffer_for(op);
      if (vs < last_virtual) cmds.push_back(buffered(Op::RecvGrad, buf, op.micro_batch, op.chunk));
      const Op backward = op.what == Compute::B ? Op::BackwardPass : Op::BackwardInput;
      cmds.push_back(buffered(backward, buf, op.micro_batch, op.chunk));
      if (vs > 0) cmds.push_back(buffered(Op::SendGrad, buf, op.micro_batch, op.chunk));
      if (op.what == Compute::B) {
        in_use[buf] = false;
        buffer_of.erase(key);
      }
    }
    steps.push_back(std::move(cmds));
  }
  if (steps.empty()) steps.emplace_back();
  if (train) {
    steps.back().push_back(plain(Op::ReduceTiedGrads));
    steps.back().push_back(plain(Op::ReduceGrads));
    steps.back().push_back(plain(Op::OptimizerStep));
  }
  if (peak) *peak = most;
  return steps;
}

std::vector<ComputeOrder> compute_orders(const ScheduleSpec& s) {
  switch (s.kind) {
    case ScheduleKind::Inference:
      return s.layout == ChunkLayout::V ? v_inference_orders(s) : interleaved_inference_orders(s);
    case ScheduleKind::GPipe:
      return std::vector<ComputeOrder>(s.stages, gpipe_order(s));
    case ScheduleKind::Interleaved1F1B:
      return interleaved_orders(s);
    case ScheduleKind::ZeroBubbleH1:
      return zero_bubble_h1_orders(s);
    case ScheduleKind::ZeroBubbleV:
      return zero_bubble_v_orders(s);
    case ScheduleKind::VHalf:
    case ScheduleKind::VMin:
      return controlled_memory_v_orders(s);
    default:
      throw std::logic_error("compute_orders: not a compute-order schedule");
  }
}

bool is_compute_order_kind(const ScheduleSpec& s) {
  return s.kind == ScheduleKind::GPipe || s.kind == ScheduleKind::Interleaved1F1B ||
         s.kind == ScheduleKind::ZeroBubbleH1 || is_v_training_kind(s.kind) ||
         (s.kind == ScheduleKind::Inference && s.chunks > 1);
}

Steps lower_for(const ScheduleSpec& s, int64_t stage_id, const ComputeOrder& order, int64_t* peak) {
  return lower(s, stage_id, order, peak, /*train=*/s.kind != ScheduleKind::Inference);
}

}  // namespace

const char* op_name(Op op) { return kOps[static_cast<int>(op)].name; }

const OpInfo& op_info(Op op) { return kOps[static_cast<int>(op)]; }

const ScheduleKindInfo& schedule_kind_info(ScheduleKind kind) { return kKinds[static_cast<int>(kind)]; }

ChunkLayout parse_chunk_layout(const std::string& name) {
  if (name == "interleaved") return ChunkLayout::Interleaved;
  if (name == "v") return ChunkLayout::V;
  throw std::invalid_argument("unknown virtual stage layout '" + name +
                              "': choose 'interleaved' (rank r holds "
                              "virtual stages r, r + stages, ...) or 'v' (rank r holds r and 2 * stages - 1 - r)");
}

const char* chunk_layout_name(ChunkLayout layout) { return layout == ChunkLayout::V ? "v" : "interleaved"; }

int64_t virtual_stage_of(int64_t rank, int64_t chunk, int64_t stages, ChunkLayout layout) {
  const bool upward = layout == ChunkLayout::V && chunk % 2 == 1;
  return chunk * stages + (upward ? stages - 1 - rank : rank);
}

int64_t chunk_of_virtual(int64_t virtual_stage, int64_t stages) { return virtual_stage / stages; }

int64_t rank_of_virtual(int64_t virtual_stage, int64_t stages, ChunkLayout layout) {
  const int64_t offset = virtual_stage % stages;
  const bool upward = layout == ChunkLayout::V && chunk_of_virtual(virtual_stage, stages) % 2 == 1;
  return upward ? stages - 1 - offset : offset;
}

ChunkLayout layout_of(ScheduleKind kind) { return schedule_kind_info(kind).layout; }

int64_t v_activation_limit(ScheduleKind kind, int64_t stages) {
  switch (kind) {
    case ScheduleKind::ZeroBubbleV:
      return 2 * stages;
    case ScheduleKind::VHalf:
      return stages + 1;
    case ScheduleKind::VMin:
      return (2 * stages + 2) / 3 + 1;
    default:
      return 0;
  }
}

std::vector<Located> flatten(const Steps& steps) {
  std::vector<Located> flat;
  for (size_t s = 0; s < steps.size(); ++s) {
    for (const auto& in : steps[s]) flat.push_back({static_cast<int64_t>(s), in});
  }
  return flat;
}

std::string describe_step(int64_t step, const Instruction& in) {
  std::string s = "step " + std::to_string(step) + ", " + op_name(in.op);
  if (in.micro_batch >= 0) s += " (micro-batch " + std::to_string(in.micro_batch) + ")";
  return s;
}

bool op_has_buffer(Op op) { return op != Op::ReduceTiedGrads && op != Op::ReduceGrads && op != Op::OptimizerStep; }

ScheduleKind parse_schedule_kind(const std::string& name) {
  for (const auto& k : kKinds)
    if (name == k.name) return k.kind;
  std::string names;
  for (const auto& k : kKinds) names += (names.empty() ? "" : ", ") + std::string(k.name);
  throw std::invalid_argument("unknown schedule kind '" + name + "': choose one of " + names);
}

const char* schedule_kind_name(ScheduleKind kind) {
  for (const auto& k : kKinds)
    if (k.kind == kind) return k.name;
  return "?";
}

std::vector<std::string> schedule_kind_names() {
  std::vector<std::string> out;
  for (const auto& k : kKinds) out.push_back(k.name);
  return out;
}

void validate(const ScheduleSpec& s) {
  if (s.micro_batches < 1) {
    throw std::invalid_argument("micro_batches must be >= 1, got " + std::to_string(s.micro_batches));
  }
  if (s.stages < 1) throw std::invalid_argument("stages must be >= 1, got " + std::to_string(s.stages));
  if (s.chunks < 1) throw std::invalid_argument("chunks must be >= 1, got " + std::to_string(s.chunks));
  if (is_v_training_kind(s.kind)) {
    const std::string name = schedule_kind_name(s.kind);
    if (s.chunks != 2 || s.layout != ChunkLayout::V) {
      throw std::invalid_argument(name +
                                  " runs two model chunks per rank in the 'v' layout (virtual_stages=2, "
                                  "virtual_layout='v'), got chunks=" +
                                  std::to_string(s.chunks) + " in the '" + chunk_layout_name(s.layout) + "' layout");
    }
    if (s.stages < 2) throw std::invalid_argument(name + " needs at least 2 stages, got " + std::to_string(s.stages));
    return;
  }
  if (s.layout == ChunkLayout::V && s.kind != ScheduleKind::Inference) {
    throw std::invalid_argument(std::string("the 'v' layout of virtual stages runs the zb-v, v-half and v-min "
                                            "schedules; '") +
                                schedule_kind_name(s.kind) + "' needs the 'interleaved' layout");
  }
  if (s.chunks > 1 && s.kind != ScheduleKind::Interleaved1F1B && s.kind != ScheduleKind::Inference) {
    throw std::invalid_argument(std::string("chunks=") + std::to_string(s.chunks) +
                                " needs the interleaved-1f1b "
                                "or zb-v schedule (or inference); '" +
                                schedule_kind_name(s.kind) + "' runs one model chunk per stage");
  }
}

void validate_stage(const ScheduleSpec& s, int64_t stage_id) {
  validate(s);
  if (stage_id < 0 || stage_id >= s.stages) {
    throw std::invalid_argument("stage_id " + std::to_string(stage_id) + " is out of range for " +
                                std::to_string(s.stages) + " stages (valid: 0.." + std::to_string(s.stages - 1) + ")");
  }
}

Steps generate_steps(const ScheduleSpec& s, int64_t stage_id, int64_t* num_buffers) {
  validate_stage(s, stage_id);
  if (is_compute_order_kind(s)) return lower_for(s, stage_id, compute_orders(s)[stage_id], num_buffers);
  if (num_buffers) *num_buffers = num_pipe_buffers(s, stage_id);
  switch (s.kind) {
    case ScheduleKind::Train1F1B:
      return ds_train_steps(s, stage_id);
    case ScheduleKind::Inference:
      return ds_inference_steps(s, stage_id);
    default:
      return ds_data_parallel_steps(s);
  }
}

std::vector<Steps> generate_all_steps(const ScheduleSpec& s, std::vector<int64_t>* num_buffers) {
  validate(s);
  std::vector<Steps> all;
  all.reserve(s.stages);
  if (num_buffers) num_buffers->assign(s.stages, 0);
  // Compute-order schedules are built for the whole pipeline at once: build them once.
  const auto orders = is_compute_order_kind(s) ? compute_orders(s) : std::vector<ComputeOrder>{};
  for (int64_t i = 0; i < s.stages; ++i) {
    int64_t* buffers = num_buffers ? &(*num_buffers)[i] : nullptr;
    all.push_back(orders.empty() ? generate_steps(s, i, buffers) : lower_for(s, i, orders[i], buffers));
  }
  return all;
}

int64_t num_pipe_buffers(const ScheduleSpec& s, int64_t stage_id) {
  validate_stage(s, stage_id);
  switch (s.kind) {
    case ScheduleKind::Train1F1B:
      return ds_train_buffers(s, stage_id);
    case ScheduleKind::DataParallel:
      return 1;
    case ScheduleKind::Inference:
      if (s.chunks == 1) return 2;
      [[fallthrough]];
    default: {  // the peak of live buffers of the lowered stream
      int64_t peak = 0;
      generate_steps(s, stage_id, &peak);
      return peak;
    }
  }
}

std::vector<ComputeOrder> compute_orders_of(const std::vector<Steps>& streams) {
  std::vector<ComputeOrder> orders(streams.size());
  for (size_t i = 0; i < streams.size(); ++i) {
    for (const auto& step : streams[i]) {
      for (const auto& in : step) {
        switch (in.op) {
          case Op::ForwardPass:
            orders[i].push_back({Compute::F, in.micro_batch, in.chunk});
            break;
          case Op::BackwardPass:
            orders[i].push_back({Compute::B, in.micro_batch, in.chunk});
            break;
          case Op::BackwardInput:
            orders[i].push_back({Compute::BInput, in.micro_batch, in.chunk});
            break;
          case Op::BackwardWeight:
            orders[i].push_back({Compute::W, in.micro_batch, in.chunk});
            break;
          default:
            break;
        }
      }
    }
  }
  return orders;
}

std::vector<Steps> lower_compute_orders(const std::vector<ComputeOrder>& orders, int64_t micro_batches,
                                        std::vector<int64_t>* num_buffers, int64_t chunks, ChunkLayout layout) {
  ScheduleSpec spec;
  spec.kind = ScheduleKind::Inference;  // validated as a plain spec of `chunks`; lowered for training below
  spec.micro_batches = micro_batches;
  spec.stages = static_cast<int64_t>(orders.size());
  spec.chunks = chunks;
  spec.layout = layout;
  validate(spec);
  for (size_t i = 0; i < orders.size(); ++i) {
    for (size_t k = 0; k < orders[i].size(); ++k) {
      const ComputeOp& op = orders[i][k];
      if (op.chunk < 0 || op.chunk >= chunks) {
        throw std::invalid_argument(
            "rank " + std::to_string(i) + ", action " + std::to_string(k) + " (" +
            format_action(op, spec.stages, static_cast<int64_t>(i), layout) + "): names model chunk " +
            std::to_string(op.chunk) + " of rank " + std::to_string(i) + ", but the module has " +
            std::to_string(chunks) + " per rank; use stage indices 0.." + std::to_string(spec.stages * chunks - 1) +
            (chunks == 1 ? " (one per rank; build the PipelineModule with virtual_stages for more)" : ""));
      }
      if (op.micro_batch < 0 || op.micro_batch >= micro_batches) {
        throw std::invalid_argument("rank " + std::to_string(i) + ", action " + std::to_string(k) + " (" +
                                    format_action(op, spec.stages, static_cast<int64_t>(i), layout) +
                                    "): micro-batch " + std::to_string(op.micro_batch) + " outside 0.." +
                                    std::to_string(micro_batches - 1));
      }
    }
  }
  std::vector<Steps> all;
  if (num_buffers) num_buffers->assign(orders.size(), 0);
  for (size_t i = 0; i < orders.size(); ++i) {
    all.push_back(lower(spec, static_cast<int64_t>(i), orders[i], num_buffers ? &(*num_buffers)[i] : nullptr));
  }
  return all;
}

std::string format_action(const ComputeOp& op, int64_t stages, int64_t rank, ChunkLayout layout) {
  return std::to_string(virtual_stage_of(rank, op.chunk, stages, layout)) + compute_letter(op.what) +
         std::to_string(op.micro_batch);
}

ActionToken parse_action_token(const std::string& token, int64_t rank) {
  auto bad = [&](const std::string& why) {
    return std::invalid_argument("rank " + std::to_string(rank) + ": action '" + token + "' " + why);
  };
  size_t i = 0;
  while (i < token.size() && token[i] >= '0' && token[i] <= '9') ++i;
  if (i == 0 || i + 2 > token.size()) {
    throw bad(
        "is not STAGE LETTER MICRO_BATCH (like 0F3: stage 0, forward, micro-batch 3; letters F forward, B "
        "full backward, I input backward, W weight backward)");
  }
  static const std::string kLetters = "FBIW";
  const size_t what = kLetters.find(token[i]);
  if (what == std::string::npos) {
    throw bad("has the pass '" + std::string(1, token[i]) +
              "': use F (forward), B (full backward), I (input "
              "backward) or W (weight backward); transfers are added by the runtime");
  }
  const std::string digits = token.substr(i + 1);
  if (digits.empty() || digits.size() > 9 || digits.find_first_not_of("0123456789") != std::string::npos) {
    throw bad("does not end in a micro-batch number");
  }
  if (i > 9) throw bad("has a stage index that is too large");
  return ActionToken{std::stoll(token.substr(0, i)), static_cast<Compute>(what), std::stoll(digits)};
}

const char* compute_letter(Compute what) {
  static const char* const kLetters[] = {"F", "B", "I", "W"};
  return kLetters[static_cast<int>(what)];
}

ComputeOp parse_action(const std::string& token, int64_t stages, int64_t rank, ChunkLayout layout) {
  const ActionToken parsed = parse_action_token(token, rank);
  const int64_t stage = parsed.virtual_stage;
  if (rank_of_virtual(stage, stages, layout) != rank) {
    throw std::invalid_argument("rank " + std::to_string(rank) + ": action '" + token + "' names stage " +
                                std::to_string(stage) + ", which does not run on rank " + std::to_string(rank) +
                                " of " + std::to_string(stages) + " (it runs on rank " +
                                std::to_string(rank_of_virtual(stage, stages, layout)) + " in the '" +
                                chunk_layout_name(layout) + "' layout)");
  }
  return ComputeOp{parsed.what, parsed.micro_batch, chunk_of_virtual(stage, stages)};
}

}  // namespace dpe::core
