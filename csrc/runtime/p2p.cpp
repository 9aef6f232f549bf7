#include "p2p.h"

#include <c10/util/Exception.h>

#include <c10/core/DeviceGuard.h>
#include <c10/core/Event.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <algorithm>
#include <mutex>
#include <optional>
#include <sstream>
#include <stdexcept>

namespace dpe::runtime {

namespace {

// Meta on the wire: core::kMetaWords int64 [count, is_tuple, then per tensor:
// dtype, requires_grad, ndim, dims...], zero-padded; nullopt when it does not fit.
std::optional<at::Tensor> encode(const std::vector<TensorMeta>& meta, bool is_tuple) {
  std::vector<int64_t> flat{static_cast<int64_t>(meta.size()), is_tuple ? 1 : 0};
  for (const auto& m : meta) {
    flat.push_back(static_cast<int64_t>(m.dtype));
    flat.push_back(m.requires_grad ? 1 : 0);
    flat.push_back(static_cast<int64_t>(m.shape.size()));
    flat.insert(flat.end(), m.shape.begin(), m.shape.end());
  }
  if (static_cast<int64_t>(flat.size()) > core::kMetaWords) return std::nullopt;
  flat.resize(core::kMetaWords, 0);
  return at::tensor(flat, at::TensorOptions().dtype(at::kLong));
}

std::vector<TensorMeta> decode(const at::Tensor& wire, bool* is_tuple) {
  const int64_t* p = wire.data_ptr<int64_t>();
  const int64_t n = wire.numel();
  TORCH_CHECK(n >= 2, "corrupt tensor meta received (too short)");
  *is_tuple = p[1] != 0;
  std::vector<TensorMeta> meta;
  int64_t i = 2;
  for (int64_t t = 0; t < p[0]; ++t) {
    TORCH_CHECK(i + 3 <= n, "corrupt tensor meta received (truncated)");
    TensorMeta m{static_cast<at::ScalarType>(p[i]), {}, p[i + 1] != 0};
    const int64_t ndim = p[i + 2];
    i += 3;
    TORCH_CHECK(ndim >= 0 && i + ndim <= n, "corrupt tensor meta received (bad rank)");
    m.shape.assign(p + i, p + i + ndim);
    i += ndim;
    meta.push_back(std::move(m));
  }
  return meta;
}

// Transfers that never completed (a failed batch): a backend may still
// write into a receive's buffer or read a send's when the peer's side
// arrives, so their Work (which owns the tensors) lives as long as the
// process. Only failed batches put anything here.
void keep_forever(c10::intrusive_ptr<c10d::Work> work) {
  static std::mutex mutex;
  static auto* graveyard = new std::vector<c10::intrusive_ptr<c10d::Work>>();
  std::lock_guard<std::mutex> lock(mutex);
  graveyard->push_back(std::move(work));
}

}  // namespace

std::vector<TensorMeta> meta_of(const std::vector<at::Tensor>& tensors) {
  std::vector<TensorMeta> meta;
  meta.reserve(tensors.size());
  for (const auto& t : tensors) meta.push_back({t.scalar_type(), t.sizes().vec(), t.requires_grad()});
  return meta;
}

std::string describe(const std::vector<TensorMeta>& meta) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < meta.size(); ++i) {
    out << (i ? ", " : "") << c10::toString(meta[i].dtype) << c10::IntArrayRef(meta[i].shape);
  }
  out << ")";
  return out.str();
}

P2P::P2P(c10::intrusive_ptr<c10d::ProcessGroup> group, std::chrono::milliseconds timeout, std::string self_name,
         bool dynamic_shapes, at::Device device, std::string peer_label, bool stage_through_host)
    : group_(std::move(group)),
      timeout_(timeout),
      self_name_(std::move(self_name)),
      dynamic_(dynamic_shapes),
      device_(device),
      peer_label_(std::move(peer_label)),
      wire_device_(device) {
  TORCH_CHECK(group_, "P2P needs a process group");
  nccl_ = group_->getBackendName() == "nccl";
  through_host_ = (device_.is_cuda() && !nccl_) || stage_through_host;
  TORCH_CHECK(!(stage_through_host && nccl_), self_name_,
              ": transfers over NCCL cannot be staged through host memory (stage_through_host is for gloo)");
  if (through_host_) wire_device_ = at::Device(at::kCPU);
}

void P2P::keep_unwaited(const std::vector<Started>& works, size_t from) {
  for (size_t i = from; i < works.size(); ++i) {
    if (works[i].work && !works[i].work->isCompleted()) keep_forever(works[i].work);
  }
}

P2P::~P2P() {
  for (auto& [channel, queue] : posted_)
    for (auto& posted : queue) keep_unwaited(posted.works, 0);
  for (auto& p : pending_)
    if (p.work.work && !p.work.work->isCompleted()) keep_forever(p.work.work);
}

void P2P::abort(const std::string& reason) {
  {
    std::lock_guard<std::mutex> lock(abort_mutex_);
    if (!abort_reason_.empty()) return;
    abort_reason_ = reason.empty() ? std::string("aborted") : reason;
    if (!nccl_) {
      if (waiting_) waiting_->abort();  // gloo: the blocked wait returns false at once
      return;
    }
  }
  // NCCL: a receive already on the device that its peer will never match
  // hangs its stream, a wait for it (where torch's wait with a timeout polls
  // on the host), and whatever the host later synchronizes on behind it; sends are
  // never waited for. Aborting the group's communicators ends those kernels
  // (outside the lock: it may take a while).
  try {
    group_->abort();
  } catch (const std::exception&) {  // a communicator already torn down: nothing left to stop
  }
}

at::Tensor P2P::empty_wire(const TensorMeta& m) const {
  const bool pinned = through_host_ && device_.is_cuda();
  return at::empty(m.shape, at::TensorOptions().dtype(m.dtype).device(wire_device_).pinned_memory(pinned));
}

at::Tensor P2P::to_wire(const at::Tensor& t) const {
  at::Tensor flat = t.detach().contiguous();
  if (!through_host_) return flat;
  at::Tensor host = at::empty(flat.sizes(), flat.options().device(at::kCPU).pinned_memory(flat.is_cuda()));
  host.copy_(flat);  // synchronous: the send may start as soon as it returns
  return host;
}

at::Tensor P2P::from_wire(const at::Tensor& t) const {
  if (!through_host_) return t;
  if (!device_.is_cuda()) return t.clone();  // staged on a CPU stage (tests): the copy in, without streams
  // The copy in runs on a stream of its own; the compute stream waits for it
  // on the device (not the host), so kernels queued before it keep running.
  // Device-generic c10 streams and events: no CUDA headers needed.
  const c10::DeviceGuard device_guard(device_);
  const auto* streams = c10::impl::getDeviceGuardImpl(device_.type());
  const c10::Stream compute = streams->getStream(device_);
  const c10::Stream copy_stream = streams->getStreamFromGlobalPool(device_, /*isHighPriority=*/false);
  at::Tensor out;
  {
    // Allocated on the copy stream, so no block still used by queued compute
    // is handed out; the compute stream's later use is recorded for its free.
    const c10::StreamGuard on_copy_stream(copy_stream);
    out = at::empty(t.sizes(), t.options().device(device_).pinned_memory(false));
    out.copy_(t, /*non_blocking=*/true);  // the pinned-memory allocator keeps `t` until the copy is done
  }
  streams->recordDataPtrOnStream(out.storage().data_ptr(), compute);
  c10::Event copied(device_.type());
  copied.record(copy_stream);
  copied.block(compute);
  return out;
}

[[noreturn]] void P2P::fail(const std::exception& err, int peer, const Describe& what, const char* part,
                            bool sending) const {
  // A dead peer shows as a closed connection, not a timeout: say which it was.
  const std::string text = err.what();
  const bool closed = text.find("Connection closed by peer") != std::string::npos ||
                      text.find("Connection reset by peer") != std::string::npos ||
                      text.find("Broken pipe") != std::string::npos;
  std::ostringstream msg;
  msg << self_name_ << ": " << (sending ? "sending " : "receiving ") << what() << part << (sending ? " to " : " from ")
      << peer_label_ << " " << peer << " failed: ";
  if (closed) {
    msg << "the peer closed the connection (its process probably died; check its log): " << text;
    throw PeerClosed(msg.str(), self_name_, peer);
  }
  msg << text << " (timeout " << timeout_.count() / 1000.0
      << " s). The peer may have died, failed, or run a schedule that does not match this one.";
  // gloo says a wait ran out of time in these words; anything else is a transfer error of another kind.
  const bool timed_out = text.find("Timed out") != std::string::npos || text.find("timed out") != std::string::npos;
  if (timed_out) throw P2PTimeout(msg.str(), self_name_, peer);
  throw P2PError(msg.str(), self_name_, peer);
}

P2P::Started P2P::start(std::vector<at::Tensor>& tensors, int peer, int tag, const Describe& what, const char* part,
                        bool sending) {
  Started started;
  if (recording_) {
    trace_.push_back(core::issued(sending ? core::CommKind::Send : core::CommKind::Recv, peer,
                                  static_cast<int64_t>(tensors[0].nbytes()), what() + part));
    started.op = issued_++;
  }
  std::string aborted;
  {
    std::lock_guard<std::mutex> lock(abort_mutex_);
    aborted = abort_reason_;
  }
  // After an abort nothing new goes out: a peer still running would take it as a later transfer.
  if (!aborted.empty()) {
    if (sending) stopped(aborted, peer, what, part, sending);
    started.start_error = "stopped: " + aborted;  // the wait for it reports the abort
    return started;
  }
  try {
    started.work = sending ? group_->send(tensors, peer, tag) : group_->recv(tensors, peer, tag);
  } catch (const std::exception& err) {  // e.g. the connection to a dead peer is already closed
    if (!sending) {                      // a posted receive reports it when it is waited for, naming what it receives
      started.start_error = err.what();
      return started;
    }
    fail(err, peer, what, part, sending);
  }
  return started;
}

void P2P::wait(const Started& started, int peer, const Describe& what, const char* part, bool sending) {
  if (recording_ && started.op >= 0) trace_.push_back(core::waited(started.op));
  std::string aborted;
  {
    std::lock_guard<std::mutex> lock(abort_mutex_);
    aborted = abort_reason_;
    if (aborted.empty()) waiting_ = started.work;
  }
  if (!aborted.empty()) {
    if (started.work && !started.work->isCompleted()) keep_forever(started.work);
    stopped(aborted, peer, what, part, sending);
  }
  bool completed = false;
  try {
    TORCH_CHECK(started.work, started.start_error);
    completed = started.work->wait(timeout_);  // false: abort() stopped it
  } catch (const std::exception& err) {
    {
      std::lock_guard<std::mutex> lock(abort_mutex_);
      waiting_.reset();
    }
    if (started.work) keep_forever(started.work);
    fail(err, peer, what, part, sending);
  }
  {
    std::lock_guard<std::mutex> lock(abort_mutex_);
    waiting_.reset();
    aborted = abort_reason_;
  }
  // An aborted NCCL communicator ends its kernels and reports the work complete: what it left is no transfer.
  if (!completed || !aborted.empty()) {
    if (!completed) keep_forever(started.work);
    stopped(aborted.empty() ? std::string("the backend reported the transfer aborted") : aborted, peer, what, part,
            sending);
  }
}

void P2P::stopped(const std::string& reason, int peer, const Describe& what, const char* part, bool sending) const {
  std::ostringstream msg;
  msg << self_name_ << ": stopped " << (sending ? "sending " : "receiving ") << what() << part
      << (sending ? " to " : " from ") << peer_label_ << " " << peer << ": " << reason;
  throw P2PAborted(msg.str(), self_name_, peer);
}

void P2P::send(const Activation& value, int peer, int tag, const Describe& what) {
  const Channel channel{peer, tag};
  const std::vector<at::Tensor>& tensors = value.tensors;
  ChannelMeta meta{meta_of(tensors), value.is_tuple};
  auto known = sent_meta_.find(channel);
  const bool send_meta = dynamic_ || known == sent_meta_.end();
  if (!send_meta && !(known->second == meta)) {
    TORCH_CHECK(false, self_name_, ": ", what(), " changed from ", describe(known->second.tensors), " to ",
                describe(meta.tensors),
                " since the first transfer; pass dynamic_shape=True to PipelineModule (or call "
                "engine.reset_activation_shape()) when activation shapes vary");
  }
  // At most one transfer in flight per channel. Gloo marks a send complete
  // only once it is waited for, so without this every sent tensor would stay
  // alive until the end of the batch; the previous send has normally long
  // arrived (receivers post early), so this wait is short, and it comes later
  // than a blocking send's would, so it cannot deadlock a schedule that runs
  // with blocking sends.
  // On NCCL a send completes by itself (reap_sends frees it), and waiting for
  // it would make the compute stream wait for a transfer it does not need.
  if (!nccl_) finish_channel_sends(peer, tag);
  if (send_meta) {
    std::optional<at::Tensor> wire = encode(meta.tensors, meta.is_tuple);
    TORCH_CHECK(wire, self_name_, ": ", what(), " ", describe(meta.tensors),
                " has too many tensors or dimensions to "
                "describe in ",
                core::kMetaWords,
                " words of meta; pass fewer tensors between stages (concatenate "
                "them, or keep constants inside the stage)");
    start_send({wire->to(wire_device_)}, peer, tag, meta_tag(tag), what, " (meta)");
    sent_meta_[channel] = std::move(meta);
  }
  for (const auto& t : tensors) start_send({to_wire(t)}, peer, tag, data_tag(tag), what, "");
}

void P2P::start_send(std::vector<at::Tensor> tensors, int peer, int tag, int wire_tag, const Describe& what,
                     const char* part) {
  // The entry first, the send second: once started, a send is never without the entry that keeps it alive.
  pending_.push_back({Started{}, std::move(tensors), peer, tag, what, part});
  try {
    pending_.back().work = start(pending_.back().keep_alive, peer, wire_tag, what, part, true);
  } catch (...) {  // not started (the backend refused, or this P2P was aborted)
    pending_.pop_back();
    throw;
  }
}

bool P2P::post_recv(int peer, int tag) {
  const Channel channel{peer, tag};
  auto known = recv_meta_.find(channel);
  if (dynamic_ || known == recv_meta_.end()) return false;
  post_data(channel, known->second);
  return true;
}

void P2P::post_data(const Channel& channel, const ChannelMeta& meta) {
  PostedRecv posted;
  posted.is_tuple = meta.is_tuple;
  posted.works.reserve(meta.tensors.size());
  // A failure to start is reported by the recv() that waits for it, which knows what it receives.
  const Describe posted_ahead = [] { return std::string("a receive posted ahead"); };
  try {
    for (const auto& m : meta.tensors) {
      posted.tensors.push_back(empty_wire(m));
      std::vector<at::Tensor> one{posted.tensors.back()};
      posted.works.push_back(start(one, channel.first, data_tag(channel.second), posted_ahead, "", false));
    }
    posted_[channel].push_back(std::move(posted));
  } catch (...) {  // e.g. out of memory for the next buffer: the receives already posted keep theirs
    keep_unwaited(posted.works, 0);
    throw;
  }
}

void P2P::post_recv_after_meta(int peer, int tag, const Describe& what) {
  const Channel channel{peer, tag};
  const ChannelMeta meta = receive_meta(channel, what);
  post_data(channel, meta);
}

const P2P::ChannelMeta& P2P::receive_meta(const Channel& channel, const Describe& what) {
  const int peer = channel.first;
  std::vector<at::Tensor> body{
      at::empty({core::kMetaWords}, at::TensorOptions().dtype(at::kLong).device(wire_device_))};
  wait(start(body, peer, meta_tag(channel.second), what, " (meta)", false), peer, what, " (meta)", false);
  ChannelMeta meta;
  meta.tensors = decode(body[0].cpu(), &meta.is_tuple);
  auto known = recv_meta_.find(channel);
  if (known == recv_meta_.end() || !(known->second == meta)) {
    auto& buffers = recv_buffers_[channel];
    buffers.clear();
    for (const auto& m : meta.tensors) buffers.push_back(empty_wire(m));
  }
  return recv_meta_[channel] = std::move(meta);
}

Activation P2P::recv(int peer, int tag, const Describe& what) {
  const Channel channel{peer, tag};
  if (auto posted = posted_.find(channel); posted != posted_.end() && !posted->second.empty()) {
    PostedRecv mine = std::move(posted->second.front());
    posted->second.pop_front();
    for (size_t i = 0; i < mine.tensors.size(); ++i) {
      try {
        wait(mine.works[i], peer, what, "", false);
        mine.tensors[i] = from_wire(mine.tensors[i]);
      } catch (...) {  // the tuple's later tensors are still posted: the backend may yet write into them
        keep_unwaited(mine.works, i + 1);
        throw;
      }
    }
    return Activation{std::move(mine.tensors), mine.is_tuple, /*owned=*/true};
  }
  if (dynamic_ || recv_meta_.find(channel) == recv_meta_.end()) receive_meta(channel, what);
  auto& buffers = recv_buffers_[channel];
  if (through_host_) {  // the copy in of the last receive may still read them
    for (size_t i = 0; i < buffers.size(); ++i) buffers[i] = empty_wire(recv_meta_[channel].tensors[i]);
  }
  Activation out{{}, recv_meta_[channel].is_tuple, /*owned=*/through_host_};
  for (auto& b : buffers) {
    std::vector<at::Tensor> one{b};
    wait(start(one, peer, data_tag(tag), what, "", false), peer, what, "", false);
    out.tensors.push_back(from_wire(b));
  }
  return out;
}

// A send leaves pending_ only once waited for. When a wait throws, the failed
// send is already kept alive (wait() keeps it) and the ones not yet waited for
// stay pending, so ~P2P keeps them: the backend may still read their buffers.
void P2P::finish_channel_sends(int peer, int tag) {
  for (size_t i = 0; i < pending_.size();) {
    if (pending_[i].peer != peer || pending_[i].tag != tag) {
      ++i;
      continue;
    }
    try {
      wait(pending_[i].work, peer, pending_[i].what, pending_[i].part, true);
    } catch (...) {
      pending_.erase(pending_.begin() + static_cast<std::ptrdiff_t>(i));
      throw;
    }
    pending_.erase(pending_.begin() + static_cast<std::ptrdiff_t>(i));
  }
}

void P2P::wait_sends() {
  size_t waited = 0;
  try {
    for (; waited < pending_.size(); ++waited) {
      const PendingSend& p = pending_[waited];
      wait(p.work, p.peer, p.what, p.part, true);
    }
  } catch (...) {
    pending_.erase(pending_.begin(), pending_.begin() + static_cast<std::ptrdiff_t>(waited) + 1);
    throw;
  }
  pending_.clear();
}

void P2P::reap_sends() {
  pending_.erase(std::remove_if(pending_.begin(), pending_.end(),
                                [](const PendingSend& p) {
                                  return p.work.work && p.work.work->isCompleted() && !p.work.work->exception();
                                }),
                 pending_.end());
}

void P2P::reset() {
  wait_sends();
  for (const auto& [channel, posted] : posted_) {
    TORCH_CHECK(posted.empty(), self_name_, ": reset() while receives are posted");
  }
  sent_meta_.clear();
  recv_meta_.clear();
  recv_buffers_.clear();
}

}  // namespace dpe::runtime
