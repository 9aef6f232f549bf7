// Point-to-point transfers of activations and gradients between pipeline
// stages over a torch c10d ProcessGroup (gloo on CPU, NCCL on GPU).
//
// A transfer carries a tuple of tensors. The first transfer on a (peer, tag)
// channel sends the tuple's meta first (count, dtypes, shapes, requires_grad),
// as one message of a fixed size (core::kMetaWords) so that a receiver can
// post it ahead; later transfers reuse it on both sides, unless the channel is
// dynamic, in which case every transfer carries its meta. Every wait has a
// timeout, and a timeout or a failure names this stage, the peer and what was
// being moved.
//
// NCCL matches transfers between two ranks in issue order, whatever their tag,
// and runs them on one stream per pair: the executor issues them in an order
// proven for that (core/comm_order.h). P2P can record what it issues (the
// trace the checker replays) and can put every transfer on one tag, so that
// gloo matches them in issue order as NCCL does.
//
// CUDA tensors on a backend that cannot carry them (gloo) travel through
// pinned host memory: copied out before a send, copied in after a receive.
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include "core/comm_order.h"
#include "core/tags.h"
#include "runtime/errors.h"

#include <chrono>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace dpe::runtime {

struct TensorMeta {
  at::ScalarType dtype;
  std::vector<int64_t> shape;
  bool requires_grad;
  bool operator==(const TensorMeta& o) const {
    return dtype == o.dtype && shape == o.shape && requires_grad == o.requires_grad;
  }
};

std::vector<TensorMeta> meta_of(const std::vector<at::Tensor>& tensors);
std::string describe(const std::vector<TensorMeta>& meta);

// What a stage passes on: one tensor, or a tuple of tensors.
struct Activation {
  std::vector<at::Tensor> tensors;
  bool is_tuple = false;
  // Set by P2P::recv when the tensors are the caller's to keep (a posted
  // receive's own buffers), not buffers P2P reuses for the next receive.
  bool owned = false;
};

// Describes a transfer for error messages; called only when one fails, so the
// hot path builds no strings.
using Describe = std::function<std::string()>;

class P2P {
 public:
  // `group` holds this rank and its peers; peers are ranks within `group`.
  // `self_name` (e.g. "stage 1") prefixes error messages.
  // Receive buffers (and meta, which NCCL needs on the GPU) live on `device`.
  // Errors call peers "<peer_label> <group rank>" (e.g. "stage 1").
  // `stage_through_host` (tests): CPU tensors take the path CUDA tensors take
  // over gloo (fresh host buffers per receive, copies out and in).
  P2P(c10::intrusive_ptr<c10d::ProcessGroup> group, std::chrono::milliseconds timeout, std::string self_name,
      bool dynamic_shapes, at::Device device = at::kCPU, std::string peer_label = "rank",
      bool stage_through_host = false);
  // Transfers never completed (a failed batch) stay alive for the life of
  // the process: the backend may still write into their buffers.
  ~P2P();
  P2P(const P2P&) = delete;
  P2P& operator=(const P2P&) = delete;

  // Starts sending `tensors` to `peer`; returns at once. The tensors must stay
  // unmodified until the send is done. On gloo the next send on the same
  // (peer, tag) first waits for this one; on NCCL sends complete by themselves
  // (reap_sends frees them); wait_sends() waits for all.
  void send(const Activation& value, int peer, int tag, const Describe& what);
  // Receives from `peer` into buffers allocated on first use (or when the
  // meta changes) and reused afterwards; returns those buffers, so copy what
  // must outlive the next receive on the same channel.
  Activation recv(int peer, int tag, const Describe& what);
  // Starts a later receive on (peer, tag) now, into buffers of its own, so
  // the transfer overlaps whatever the caller computes before it calls recv()
  // for it. Needs the channel's meta (not the first transfer, not dynamic);
  // returns whether it posted. Posted receives are consumed by recv() in the
  // order they were posted.
  bool post_recv(int peer, int tag);
  // The same for a receive whose shapes are not known yet (the channel's
  // first transfer, or dynamic shapes): receives its meta now, waiting for
  // it, then posts the data receive. For an order in which a message from
  // `peer` must be taken before another one received earlier (NCCL's rules).
  void post_recv_after_meta(int peer, int tag, const Describe& what);
  // Waits for every send started so far.
  void wait_sends();
  // Drops the sends that have completed (never blocks).
  void reap_sends();
  // Forgets cached meta and buffers: the next transfers send meta again.
  void reset();
  // Stops the wait in progress, and every later one, with an error that
  // gives `reason` (another rank's failure); nothing new is sent or posted
  // after it. Callable from any thread: the
  // engine's failure watcher calls it while this rank waits for a transfer
  // that will never come. There is no way back: the group's transfers are
  // no longer aligned.
  void abort(const std::string& reason);

  // Transfers started and not yet waited for (each tensor and meta piece counts).
  int64_t pending_sends() const { return static_cast<int64_t>(pending_.size()); }
  // Puts every transfer on tag 0: gloo then matches them in issue order, as
  // NCCL does (for tests of the executor's order; both sides must agree).
  void set_single_tag(bool on) { single_tag_ = on; }
  // Records every operation issued and waited for from now on (cleared).
  void set_recording(bool on) {
    recording_ = on;
    trace_.clear();
    issued_ = 0;
  }
  const core::CommTrace& trace() const { return trace_; }
  // Whether CUDA tensors go through pinned host memory (a CUDA device on a
  // backend other than NCCL).
  bool stages_through_host() const { return through_host_; }
  int rank() const { return group_->getRank(); }
  const at::Device& device() const { return device_; }
  int size() const { return group_->getSize(); }

 private:
  using Channel = std::pair<int, int>;  // (peer, tag)
  // Every c10d call goes through these, so any failure names stage, peer and transfer.
  // `part` names the piece of a transfer ("" for data, " (meta)").
  // Operations carry their index among the issued ones, for the trace.
  struct Started {
    c10::intrusive_ptr<c10d::Work> work;
    int32_t op = -1;
    std::string start_error;  // why the backend refused to start it (reported when waited for)
  };
  Started start(std::vector<at::Tensor>& tensors, int peer, int tag, const Describe& what, const char* part,
                bool sending);
  void wait(const Started& started, int peer, const Describe& what, const char* part, bool sending);
  // Keeps works[from...] alive for the life of the process if the backend may still use them.
  static void keep_unwaited(const std::vector<Started>& works, size_t from);
  [[noreturn]] void fail(const std::exception& err, int peer, const Describe& what, const char* part,
                         bool sending) const;
  [[noreturn]] void stopped(const std::string& reason, int peer, const Describe& what, const char* part,
                            bool sending) const;
  int data_tag(int tag) const { return single_tag_ ? 0 : core::data_wire_tag(tag); }
  int meta_tag(int tag) const { return single_tag_ ? 0 : core::meta_wire_tag(tag); }
  at::Tensor empty_wire(const TensorMeta& m) const;  // a receive buffer, on the device or pinned host memory
  at::Tensor to_wire(const at::Tensor& t) const;     // what a send hands to the backend
  at::Tensor from_wire(const at::Tensor& t) const;   // a received tensor, on the stage's device

  c10::intrusive_ptr<c10d::ProcessGroup> group_;
  std::chrono::milliseconds timeout_;
  std::string self_name_;
  bool dynamic_;
  at::Device device_;
  std::string peer_label_;
  bool nccl_ = false;          // sends complete on their own; waiting for them would stall compute
  bool through_host_ = false;  // CUDA tensors staged through pinned host memory
  at::Device wire_device_;     // where tensors are when the backend moves them
  bool single_tag_ = false;
  bool recording_ = false;
  int32_t issued_ = 0;
  core::CommTrace trace_;
  struct ChannelMeta {
    std::vector<TensorMeta> tensors;
    bool is_tuple;
    bool operator==(const ChannelMeta& o) const { return tensors == o.tensors && is_tuple == o.is_tuple; }
  };
  std::map<Channel, ChannelMeta> sent_meta_;
  std::map<Channel, ChannelMeta> recv_meta_;
  std::map<Channel, std::vector<at::Tensor>> recv_buffers_;
  struct PostedRecv {
    std::vector<at::Tensor> tensors;
    std::vector<Started> works;
    bool is_tuple = false;
  };
  // Receives the next meta on `channel` (waiting for it) and makes it the channel's.
  const ChannelMeta& receive_meta(const Channel& channel, const Describe& what);
  void post_data(const Channel& channel, const ChannelMeta& meta);
  std::map<Channel, std::deque<PostedRecv>> posted_;
  // Waits for the sends still pending on (peer, tag).
  void finish_channel_sends(int peer, int tag);
  // Starts sending `tensors` (one piece of a transfer on `wire_tag`) and keeps it pending.
  void start_send(std::vector<at::Tensor> tensors, int peer, int tag, int wire_tag, const Describe& what,
                  const char* part);
  struct PendingSend {
    Started work;
    std::vector<at::Tensor> keep_alive;
    int peer, tag;
    Describe what;  // a copy: the caller's description outlives no send
    const char* part;
  };
  std::vector<PendingSend> pending_;
  // abort(): why (empty until then), and the Work a wait is blocked on.
  std::mutex abort_mutex_;
  std::string abort_reason_;
  c10::intrusive_ptr<c10d::Work> waiting_;
};

}  // namespace dpe::runtime
