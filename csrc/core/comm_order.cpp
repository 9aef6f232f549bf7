#include "comm_order.h"

#include <algorithm>
#include <deque>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>
#include <tuple>

namespace dpe::core {

namespace {

const char* kind_name(CommKind k) { return k == CommKind::Send ? "send to" : "receive from"; }

// One rank's trace, compiled: its operations, and the items (an operation, or
// a batch of them) each operation belongs to.
struct RankOps {
  struct Operation {
    CommKind kind;
    int32_t peer;
    int64_t bytes;
    int64_t message;
    int32_t item;
    int64_t issue_event;  // position in the trace
    std::string label;
    int32_t partner_rank = -1, partner_op = -1;
    bool done = false;
  };
  std::vector<Operation> ops;
  std::vector<std::vector<int32_t>> items;        // item -> its operations
  std::vector<int32_t> item_remaining;            // operations of the item not yet done
  std::map<int32_t, std::deque<int32_t>> queues;  // peer -> items in issue order, not yet done
  int64_t pc = 0;                                 // next trace event
  int32_t issued = 0;                             // operations issued so far
};

std::string describe_op(int32_t rank, const RankOps::Operation& o) {
  std::ostringstream s;
  s << "rank " << rank << " " << kind_name(o.kind) << " rank " << o.peer;
  if (!o.label.empty()) s << " [" << o.label << "]";
  if (o.bytes >= 0) s << " (" << o.bytes << " bytes)";
  s << " at trace event " << o.issue_event;
  return s.str();
}

}  // namespace

CommEvent issued(CommKind kind, int32_t peer, int64_t bytes, std::string label, int64_t message, int32_t group) {
  CommEvent ev;
  ev.kind = kind;
  ev.peer = peer;
  ev.bytes = bytes;
  ev.message = message;
  ev.group = group;
  ev.label = std::move(label);
  return ev;
}

CommEvent waited(int32_t op) {
  CommEvent ev;
  ev.is_wait = true;
  ev.op = op;
  return ev;
}

CommCheck check_nccl_order(const std::vector<CommTrace>& traces, bool one_stream_per_rank) {
  // The queue an operation with `peer` runs in.
  auto queue_of = [one_stream_per_rank](int32_t peer) { return one_stream_per_rank ? -1 : peer; };
  const int32_t n = static_cast<int32_t>(traces.size());
  std::vector<RankOps> ranks(n);
  CommCheck result;
  auto fail = [&](const std::string& why) {
    result.ok = false;
    result.report = why;
    return result;
  };

  // Compile each trace into operations and items; check waits name issued operations.
  for (int32_t r = 0; r < n; ++r) {
    RankOps& R = ranks[r];
    int32_t open_group = -1;
    for (size_t e = 0; e < traces[r].size(); ++e) {
      const CommEvent& ev = traces[r][e];
      if (ev.is_wait) {
        open_group = -1;
        if (ev.op < 0 || ev.op >= static_cast<int32_t>(R.ops.size())) {
          return fail("rank " + std::to_string(r) + ", trace event " + std::to_string(e) + ": waits for operation " +
                      std::to_string(ev.op) + ", which was not issued before it");
        }
        continue;
      }
      if (ev.peer < 0 || ev.peer >= n || ev.peer == r) {
        return fail("rank " + std::to_string(r) + ", trace event " + std::to_string(e) + ": " + kind_name(ev.kind) +
                    " rank " + std::to_string(ev.peer) + ", which is not another rank of the " + std::to_string(n));
      }
      if (ev.group < 0 || ev.group != open_group) {
        R.items.emplace_back();
        R.item_remaining.push_back(0);
      }
      open_group = ev.group;
      const int32_t item = static_cast<int32_t>(R.items.size()) - 1;
      R.items[item].push_back(static_cast<int32_t>(R.ops.size()));
      ++R.item_remaining[item];
      R.ops.push_back({ev.kind, ev.peer, ev.bytes, ev.message, item, static_cast<int64_t>(e), ev.label});
    }
  }

  // NCCL matches the k-th send from a to b with the k-th receive on b from a.
  std::map<std::pair<int32_t, int32_t>, std::vector<int32_t>> sends, recvs;  // (from, to) -> ops
  for (int32_t r = 0; r < n; ++r) {
    for (int32_t i = 0; i < static_cast<int32_t>(ranks[r].ops.size()); ++i) {
      const auto& o = ranks[r].ops[i];
      if (o.kind == CommKind::Send) {
        sends[{r, o.peer}].push_back(i);
      } else {
        recvs[{o.peer, r}].push_back(i);
      }
    }
  }
  std::set<std::pair<int32_t, int32_t>> pairs;
  for (const auto& [k, v] : sends) pairs.insert(k);
  for (const auto& [k, v] : recvs) pairs.insert(k);
  for (const auto& [from, to] : pairs) {
    const auto& s = sends[{from, to}];
    const auto& rv = recvs[{from, to}];
    const size_t common = std::min(s.size(), rv.size());
    for (size_t k = 0; k < common; ++k) {
      auto& so = ranks[from].ops[s[k]];
      auto& ro = ranks[to].ops[rv[k]];
      if (so.message >= 0 && ro.message >= 0 && so.message != ro.message) {
        return fail("transfer " + std::to_string(k) + " from rank " + std::to_string(from) + " to rank " +
                    std::to_string(to) + " pairs different messages (NCCL matches by order, not tag): " +
                    describe_op(from, so) + " with " + describe_op(to, ro));
      }
      if (so.bytes >= 0 && ro.bytes >= 0 && so.bytes != ro.bytes) {
        return fail("transfer " + std::to_string(k) + " from rank " + std::to_string(from) + " to rank " +
                    std::to_string(to) + " pairs operations of different sizes (NCCL matches by order, not tag): " +
                    describe_op(from, so) + " with " + describe_op(to, ro));
      }
      so.partner_rank = to;
      so.partner_op = rv[k];
      ro.partner_rank = from;
      ro.partner_op = s[k];
    }
    if (s.size() != rv.size()) {
      const bool more_sends = s.size() > rv.size();
      const int32_t who = more_sends ? from : to;
      const auto& o = ranks[who].ops[(more_sends ? s : rv)[common]];
      return fail(std::to_string(s.size()) + " sends from rank " + std::to_string(from) + " to rank " +
                  std::to_string(to) + " but " + std::to_string(rv.size()) + " receives: " + describe_op(who, o) +
                  " is never matched");
    }
  }

  auto active = [&](int32_t r, int32_t item) {
    for (int32_t op : ranks[r].items[item]) {
      const auto& q = ranks[r].queues[queue_of(ranks[r].ops[op].peer)];
      if (q.empty() || q.front() != item) return false;
    }
    return true;
  };
  // Issues (never block) until a wait for an operation not yet done.
  auto advance = [&](int32_t r) {
    RankOps& R = ranks[r];
    const auto& trace = traces[r];
    bool moved = false;
    while (R.pc < static_cast<int64_t>(trace.size())) {
      const CommEvent& ev = trace[R.pc];
      if (ev.is_wait) {
        if (!R.ops[ev.op].done) break;
      } else {
        const int32_t item = R.ops[R.issued].item;
        // An item enters its queues once, with its first operation (a batch is issued whole).
        if (R.items[item].front() == R.issued) {
          std::vector<int32_t> peers;
          for (int32_t op : R.items[item]) peers.push_back(queue_of(R.ops[op].peer));
          std::sort(peers.begin(), peers.end());
          peers.erase(std::unique(peers.begin(), peers.end()), peers.end());
          for (int32_t p : peers) R.queues[p].push_back(item);
        }
        ++R.issued;
      }
      ++R.pc;
      moved = true;
    }
    return moved;
  };
  auto issued_all_of = [&](int32_t r, int32_t item) {
    return ranks[r].ops[ranks[r].items[item].back()].issue_event < ranks[r].pc;
  };
  auto complete = [&](int32_t r, int32_t op) {
    RankOps& R = ranks[r];
    R.ops[op].done = true;
    ++result.operations;
    const int32_t item = R.ops[op].item;
    if (--R.item_remaining[item] == 0) {
      for (auto& [peer, q] : R.queues) {
        if (!q.empty() && q.front() == item) q.pop_front();
      }
    }
  };

  for (bool progress = true; progress;) {
    progress = false;
    for (int32_t r = 0; r < n; ++r) progress |= advance(r);
    // Complete every matched pair whose two items head their queues.
    std::vector<std::pair<int32_t, int32_t>> ready;  // (rank, send op)
    for (int32_t r = 0; r < n; ++r) {
      for (const auto& [key, q] : ranks[r].queues) {
        if (q.empty() || !issued_all_of(r, q.front()) || !active(r, q.front())) continue;
        for (int32_t op : ranks[r].items[q.front()]) {
          const auto& o = ranks[r].ops[op];
          if (o.done || o.kind != CommKind::Send || queue_of(o.peer) != key) continue;
          const int32_t pr = o.partner_rank, pitem = ranks[pr].ops[o.partner_op].item;
          const auto& pq = ranks[pr].queues[queue_of(r)];
          if (pq.empty() || pq.front() != pitem || !issued_all_of(pr, pitem) || !active(pr, pitem)) continue;
          ready.emplace_back(r, op);
        }
      }
    }
    for (const auto& [r, op] : ready) {
      const auto& o = ranks[r].ops[op];
      if (o.done) continue;
      const int32_t pr = o.partner_rank, pop = o.partner_op;
      complete(r, op);
      complete(pr, pop);
      progress = true;
    }
  }

  // Everyone at the end of its trace with every operation done, or a deadlock.
  std::ostringstream stuck;
  bool all_done = true;
  for (int32_t r = 0; r < n; ++r) {
    const RankOps& R = ranks[r];
    const bool at_end = R.pc == static_cast<int64_t>(traces[r].size());
    const auto undone = std::count_if(R.ops.begin(), R.ops.end(), [](const auto& o) { return !o.done; });
    if (at_end && undone == 0) continue;
    all_done = false;
    stuck << "\n  rank " << r << ": ";
    if (!at_end) {
      const auto& o = R.ops[traces[r][R.pc].op];
      stuck << "blocked at trace event " << R.pc << ", waiting for its " << kind_name(o.kind) << " rank " << o.peer
            << (o.label.empty() ? "" : " [" + o.label + "]") << ".";
    } else {
      stuck << "at the end of its trace with " << undone << " operations never completed.";
    }
    for (const auto& [key, q] : R.queues) {
      if (q.empty()) continue;
      const auto& head = R.ops[R.items[q.front()].front()];
      const int32_t peer = head.peer;
      const auto other = ranks[peer].queues.find(queue_of(r));
      stuck << " Its queue" << (one_stream_per_rank ? "" : " with rank " + std::to_string(peer)) << " is headed by its "
            << kind_name(head.kind) << " rank " << head.peer << (head.label.empty() ? "" : " [" + head.label + "]");
      if (R.items[q.front()].size() > 1) stuck << " (a batch of " << R.items[q.front()].size() << ")";
      if (other == ranks[peer].queues.end() || other->second.empty()) {
        stuck << "; rank " << peer << " has issued nothing pending towards it.";
      } else {
        const auto& theirs = ranks[peer].ops[ranks[peer].items[other->second.front()].front()];
        stuck << "; rank " << peer << "'s queue with it is headed by its " << kind_name(theirs.kind) << " rank "
              << theirs.peer << (theirs.label.empty() ? "" : " [" + theirs.label + "]") << ".";
      }
    }
  }
  if (!all_done) {
    return fail(
        "deadlock under NCCL's ordering (per pair of ranks, operations run in issue order and a send "
        "completes only with its receive):" +
        stuck.str());
  }
  return result;
}

int32_t transfer_peer(const Instruction& in, int64_t stage_id, int64_t stages, ChunkLayout layout) {
  int64_t delta;
  switch (in.op) {
    case Op::RecvActivation:
    case Op::SendGrad:
      delta = -1;
      break;
    case Op::SendActivation:
    case Op::RecvGrad:
      delta = +1;
      break;
    default:
      return -1;
  }
  if (layout == ChunkLayout::Interleaved) {  // wraps from the last rank to the first
    return static_cast<int32_t>(((stage_id + delta) % stages + stages) % stages);
  }
  const int64_t peer_vs = virtual_stage_of(stage_id, in.chunk, stages, layout) + delta;
  return peer_vs < 0 ? -1 : static_cast<int32_t>(rank_of_virtual(peer_vs, stages, layout));
}

bool is_p2p_transfer(const Instruction& in, int64_t stage_id, int64_t stages, ChunkLayout layout) {
  const int32_t peer = transfer_peer(in, stage_id, stages, layout);
  return peer >= 0 && peer != stage_id;
}

namespace {

bool is_recv(Op op) { return op == Op::RecvActivation || op == Op::RecvGrad; }

// A channel: one kind of transfer with one peer and chunk.
using ChannelKey = std::tuple<Op, int32_t, int32_t>;

ChannelKey channel_of(const Instruction& in, int64_t stage_id, int64_t stages, ChunkLayout layout) {
  return {in.op, transfer_peer(in, stage_id, stages, layout), in.chunk};
}

// Program order with receives posted ahead of compute (and, for
// AsSoonAsChannelFree, of sends to the same peer).
TransferPlan plan_in_program_order(const Steps& steps, int64_t stage_id, int64_t stages, TransferOrder order,
                                   bool dynamic_shapes, ChunkLayout layout) {
  const auto flat = flatten(steps);
  const int32_t n = static_cast<int32_t>(flat.size());
  TransferPlan plan;
  plan.before.resize(n + 1);
  if (dynamic_shapes) return plan;
  std::map<ChannelKey, int32_t> previous_recv;
  std::map<int32_t, int32_t> last_transfer_with;  // peer -> flat index of the last transfer seen
  for (int32_t i = 0; i < n; ++i) {
    const Instruction& in = flat[i].instr;
    if (!is_p2p_transfer(in, stage_id, stages, layout)) continue;
    const int32_t peer = transfer_peer(in, stage_id, stages, layout);
    if (is_recv(in.op)) {
      const ChannelKey key = channel_of(in, stage_id, stages, layout);
      if (auto prev = previous_recv.find(key); prev != previous_recv.end()) {
        int32_t after = prev->second;
        if (order == TransferOrder::ProgramOrder) {
          if (auto last = last_transfer_with.find(peer); last != last_transfer_with.end()) {
            after = std::max(after, last->second);
          }
        }
        // Posting right before its own instruction is just receiving there.
        if (after + 1 < i) plan.before[after + 1].push_back({TransferAction::Kind::PostRecv, i});
      }
      previous_recv[key] = i;
    }
    last_transfer_with[peer] = i;
  }
  return plan;
}

// PairOrder for one stage, given the global place of every message it sends
// or receives (`message_seq`, per flat instruction).
TransferPlan plan_in_pair_order(const Steps& steps, int64_t stage_id, int64_t stages,
                                const std::vector<int64_t>& message_seq, bool dynamic_shapes, ChunkLayout layout) {
  const auto flat = flatten(steps);
  const int32_t n = static_cast<int32_t>(flat.size());
  TransferPlan plan;
  plan.before.resize(n + 1);
  // Per peer: this stage's transfers with it, in the pair's agreed order.
  std::map<int32_t, std::vector<int32_t>> pair_order;
  for (int32_t i = 0; i < n; ++i) {
    if (is_p2p_transfer(flat[i].instr, stage_id, stages, layout)) {
      pair_order[transfer_peer(flat[i].instr, stage_id, stages, layout)].push_back(i);
    }
  }
  for (auto& [peer, items] : pair_order) {
    std::stable_sort(items.begin(), items.end(), [&](int32_t a, int32_t b) { return message_seq[a] < message_seq[b]; });
  }
  std::map<int32_t, size_t> next;           // peer -> next item of pair_order to issue
  std::map<ChannelKey, int32_t> posted;     // channel -> receives posted, not yet consumed
  std::map<ChannelKey, bool> shapes_known;  // a receive on the channel has completed
  auto head = [&](int32_t peer) -> int32_t {
    const auto& items = pair_order[peer];
    return next[peer] < items.size() ? items[next[peer]] : -1;
  };
  auto postable = [&](int32_t r) {
    return !dynamic_shapes && shapes_known[channel_of(flat[r].instr, stage_id, stages, layout)];
  };
  auto post = [&](int32_t at, int32_t r, int32_t peer) {
    const ChannelKey key = channel_of(flat[r].instr, stage_id, stages, layout);
    // Unknown shapes: the meta now (it comes first on the wire), then the data posted.
    const bool after_meta = !postable(r);
    plan.before[at].push_back(
        {after_meta ? TransferAction::Kind::PostRecvAfterMeta : TransferAction::Kind::PostRecv, r});
    if (after_meta) shapes_known[key] = true;
    ++posted[key];
    ++next[peer];
  };
  // Before instruction `at`: post receives whose turn it is and whose shapes
  // are known (one per channel ahead of time).
  auto settle = [&](int32_t at) {
    for (bool moved = true; moved;) {
      moved = false;
      for (auto& [peer, items] : pair_order) {
        const int32_t h = head(peer);
        if (h >= 0 && is_recv(flat[h].instr.op) && h > at && postable(h) &&
            posted[channel_of(flat[h].instr, stage_id, stages, layout)] == 0) {
          post(at, h, peer);
          moved = true;
        }
      }
    }
  };
  for (int32_t i = 0; i < n; ++i) {
    settle(i);
    const Instruction& in = flat[i].instr;
    if (!is_p2p_transfer(in, stage_id, stages, layout)) continue;
    const int32_t peer = transfer_peer(in, stage_id, stages, layout);
    const ChannelKey key = channel_of(in, stage_id, stages, layout);
    if (is_recv(in.op)) {
      if (posted[key] > 0) {  // posted earlier (the plan posts each channel in order)
        --posted[key];
      } else {
        // Messages of this pair that come first but are received later in the program: posted now, after
        // their meta where their shapes are not known.
        for (int32_t h = head(peer); h != i; h = head(peer)) {
          if (h < 0 || !is_recv(flat[h].instr.op)) {
            throw std::logic_error("plan_transfers: stage " + std::to_string(stage_id) + " receives instruction " +
                                   std::to_string(i) + " out of its pair's order");
          }
          post(i, h, peer);
        }
        if (posted[key] > 0) {  // one of those was on this channel, ahead of this receive
          throw std::logic_error("plan_transfers: stage " + std::to_string(stage_id) + " receives instruction " +
                                 std::to_string(i) + " behind a later message of its own channel");
        }
        ++next[peer];
      }
      shapes_known[key] = true;
      continue;
    }
    // A send: every receive before it in the pair's order is posted first (after its meta if need be).
    for (int32_t h = head(peer); h != i; h = head(peer)) {
      if (h < 0 || !is_recv(flat[h].instr.op)) {
        throw std::logic_error("plan_transfers: stage " + std::to_string(stage_id) + " sends instruction " +
                               std::to_string(i) + " out of its pair's order");
      }
      post(i, h, peer);
    }
    ++next[peer];
  }
  settle(n);
  for (auto& [peer, items] : pair_order) {
    if (head(peer) >= 0) {
      throw std::logic_error("plan_transfers: stage " + std::to_string(stage_id) + " leaves transfers with stage " +
                             std::to_string(peer) + " unissued");
    }
  }
  return plan;
}

}  // namespace

std::vector<TransferPlan> plan_transfers(const std::vector<Steps>& streams, int64_t micro_batches, int64_t chunks,
                                         const std::vector<int64_t>& num_buffers, TransferOrder order,
                                         bool dynamic_shapes, ChunkLayout layout) {
  const int64_t stages = static_cast<int64_t>(streams.size());
  std::vector<TransferPlan> plans;
  plans.reserve(streams.size());
  if (order != TransferOrder::PairOrder) {
    for (int64_t s = 0; s < stages; ++s)
      plans.push_back(plan_in_program_order(streams[s], s, stages, order, dynamic_shapes, layout));
    return plans;
  }
  // One global order of messages: the order a simulation sends them in. It
  // keeps every stage's own order, and a message is received after it is sent.
  const SimulationResult sim = simulate(streams, micro_batches, chunks, num_buffers, OpCosts{}, layout);
  // A receive's message is the k-th send of its kind from its peer to it.
  std::map<std::tuple<int64_t, int64_t, Op>, std::vector<int64_t>> sent;  // (from, to, recv op) -> seq in order
  for (int64_t s = 0; s < stages; ++s) {
    const auto flat = flatten(streams[s]);
    for (size_t i = 0; i < flat.size(); ++i) {
      const Op op = flat[i].instr.op;
      if ((op == Op::SendActivation || op == Op::SendGrad) && is_p2p_transfer(flat[i].instr, s, stages, layout)) {
        sent[{s, transfer_peer(flat[i].instr, s, stages, layout),
              op == Op::SendActivation ? Op::RecvActivation : Op::RecvGrad}]
            .push_back(sim.sequence[s][i]);
      }
    }
  }
  for (int64_t s = 0; s < stages; ++s) {
    const auto flat = flatten(streams[s]);
    std::vector<int64_t> seq(flat.size(), -1);
    std::map<std::pair<int64_t, Op>, size_t> received;
    for (size_t i = 0; i < flat.size(); ++i) {
      const Op op = flat[i].instr.op;
      if (!is_p2p_transfer(flat[i].instr, s, stages, layout)) continue;
      if (!is_recv(op)) {
        seq[i] = sim.sequence[s][i];
        continue;
      }
      const int64_t peer = transfer_peer(flat[i].instr, s, stages, layout);
      seq[i] = sent[{peer, s, op}].at(received[{peer, op}]++);
    }
    plans.push_back(plan_in_pair_order(streams[s], s, stages, seq, dynamic_shapes, layout));
  }
  return plans;
}

std::vector<TransferPlan> plan_transfers(const ScheduleSpec& spec, TransferOrder order, bool dynamic_shapes) {
  std::vector<int64_t> buffers;
  const auto streams = generate_all_steps(spec, &buffers);
  return plan_transfers(streams, spec.micro_batches, spec.chunks, buffers, order, dynamic_shapes, spec.layout);
}

CommTrace trace_of(const Steps& steps, const TransferPlan& plan, int64_t stage_id, int64_t stages, bool dynamic_shapes,
                   ChunkLayout layout) {
  const auto flat = flatten(steps);
  const int32_t n = static_cast<int32_t>(flat.size());
  CommTrace trace;
  int32_t issued_ops = 0;
  // A message is its sender's virtual stage, kind, micro-batch and part (meta or data).
  auto message_of = [&](int32_t i, bool meta) {
    const Instruction& in = flat[i].instr;
    const int64_t v = virtual_stage_of(stage_id, in.chunk, stages, layout);
    const bool grad = in.op == Op::SendGrad || in.op == Op::RecvGrad;
    const int64_t sender = in.op == Op::RecvActivation ? v - 1 : in.op == Op::RecvGrad ? v + 1 : v;
    return ((static_cast<int64_t>(in.micro_batch) * 4096 + sender) * 2 + (grad ? 1 : 0)) * 2 + (meta ? 1 : 0);
  };
  auto issue = [&](CommKind kind, int32_t peer, int64_t bytes, std::string label, int64_t message) {
    trace.push_back(issued(kind, peer, bytes, std::move(label), message));
    return issued_ops++;
  };
  auto wait = [&](int32_t op) { trace.push_back(waited(op)); };
  auto label_of = [&](int32_t i) { return describe_step(flat[i].step, flat[i].instr); };
  constexpr int64_t meta_bytes = kMetaWords * 8;
  std::map<ChannelKey, bool> meta_sent, meta_known;
  std::map<ChannelKey, std::deque<int32_t>> posted;      // channel -> posted data receives
  std::map<ChannelKey, std::vector<int32_t>> in_flight;  // send channel -> operations not yet waited for
  auto send = [&](int32_t i) {
    const ChannelKey key = channel_of(flat[i].instr, stage_id, stages, layout);
    const int32_t peer = std::get<1>(key);
    for (int32_t op : in_flight[key]) wait(op);
    in_flight[key].clear();
    if (dynamic_shapes || !meta_sent[key]) {
      in_flight[key].push_back(issue(CommKind::Send, peer, meta_bytes, label_of(i) + " (meta)", message_of(i, true)));
      meta_sent[key] = true;
    }
    in_flight[key].push_back(issue(CommKind::Send, peer, -1, label_of(i), message_of(i, false)));
  };
  for (int32_t p = 0; p <= n; ++p) {
    for (const TransferAction& a : plan.before[p]) {
      const ChannelKey key = channel_of(flat[a.instruction].instr, stage_id, stages, layout);
      if (a.kind == TransferAction::Kind::PostRecvAfterMeta) {
        wait(issue(CommKind::Recv, std::get<1>(key), meta_bytes, label_of(a.instruction) + " (meta)",
                   message_of(a.instruction, true)));
        meta_known[key] = true;
      }
      posted[key].push_back(
          issue(CommKind::Recv, std::get<1>(key), -1, label_of(a.instruction), message_of(a.instruction, false)));
    }
    if (p == n) break;
    const Instruction& in = flat[p].instr;
    if (!is_p2p_transfer(in, stage_id, stages, layout)) continue;
    const ChannelKey key = channel_of(in, stage_id, stages, layout);
    if (!is_recv(in.op)) {
      send(p);
      continue;
    }
    if (!posted[key].empty()) {
      wait(posted[key].front());
      posted[key].pop_front();
      continue;
    }
    if (dynamic_shapes || !meta_known[key]) {
      wait(issue(CommKind::Recv, std::get<1>(key), meta_bytes, label_of(p) + " (meta)", message_of(p, true)));
      meta_known[key] = true;
    }
    wait(issue(CommKind::Recv, std::get<1>(key), -1, label_of(p), message_of(p, false)));
  }
  // The end of the batch waits for every send still in flight, in issue order.
  std::vector<int32_t> last;
  for (const auto& [key, ops] : in_flight) last.insert(last.end(), ops.begin(), ops.end());
  std::sort(last.begin(), last.end());
  for (int32_t op : last) wait(op);
  return trace;
}

CommCheck check_schedule_transfers(const ScheduleSpec& spec, TransferOrder order, bool dynamic_shapes,
                                   bool one_stream_per_rank) {
  std::vector<int64_t> buffers;
  const auto streams = generate_all_steps(spec, &buffers);
  const auto plans =
      plan_transfers(streams, spec.micro_batches, spec.chunks, buffers, order, dynamic_shapes, spec.layout);
  std::vector<CommTrace> traces;
  traces.reserve(streams.size());
  for (size_t s = 0; s < streams.size(); ++s) {
    traces.push_back(trace_of(streams[s], plans[s], static_cast<int64_t>(s), spec.stages, dynamic_shapes, spec.layout));
  }
  return check_nccl_order(traces, one_stream_per_rank);
}

}  // namespace dpe::core
