#include "p2p.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <sstream>
#include <stdexcept>

namespace dpe::runtime {

namespace {

// Meta on the wire: int64 [count, is_tuple, then per tensor: dtype, requires_grad, ndim, dims...].
at::Tensor encode(const std::vector<TensorMeta>& meta, bool is_tuple) {
  std::vector<int64_t> flat{static_cast<int64_t>(meta.size()), is_tuple ? 1 : 0};
  for (const auto& m : meta) {
    flat.push_back(static_cast<int64_t>(m.dtype));
    flat.push_back(m.requires_grad ? 1 : 0);
    flat.push_back(static_cast<int64_t>(m.shape.size()));
    flat.insert(flat.end(), m.shape.begin(), m.shape.end());
  }
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
         bool dynamic_shapes, at::Device device, std::string peer_label)
    : group_(std::move(group)),
      timeout_(timeout),
      self_name_(std::move(self_name)),
      dynamic_(dynamic_shapes),
      device_(device),
      peer_label_(std::move(peer_label)) {
  TORCH_CHECK(group_, "P2P needs a process group");
}

[[noreturn]] void P2P::fail(const std::exception& err, int peer, const Describe& what, const char* part,
                            bool sending) const {
  std::ostringstream msg;
  msg << self_name_ << ": " << (sending ? "sending " : "receiving ") << what() << part << (sending ? " to " : " from ")
      << peer_label_ << " " << peer << " failed (timeout " << timeout_.count() / 1000.0 << " s): " << err.what()
      << ". The peer may have died, or its schedule does not match this one.";
  throw std::runtime_error(msg.str());
}

c10::intrusive_ptr<c10d::Work> P2P::start(std::vector<at::Tensor>& tensors, int peer, int tag, const Describe& what,
                                          const char* part, bool sending) {
  try {
    return sending ? group_->send(tensors, peer, tag) : group_->recv(tensors, peer, tag);
  } catch (const std::exception& err) {  // e.g. the connection to a dead peer is already closed
    fail(err, peer, what, part, sending);
  }
}

void P2P::wait(const c10::intrusive_ptr<c10d::Work>& work, int peer, const Describe& what, const char* part,
               bool sending) {
  try {
    if (!work->wait(timeout_)) {
      TORCH_CHECK(false, "timed out");
    }
  } catch (const std::exception& err) {
    fail(err, peer, what, part, sending);
  }
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
  finish_channel_sends(peer, tag);
  if (send_meta) {
    at::Tensor wire = encode(meta.tensors, meta.is_tuple);
    std::vector<at::Tensor> length{at::tensor({wire.numel()}, at::TensorOptions().dtype(at::kLong)).to(device_)};
    std::vector<at::Tensor> body{wire.to(device_)};
    pending_.push_back({start(length, peer, meta_tag(tag), what, " (meta length)", true), length, peer, tag, what,
                        " (meta length)"});
    pending_.push_back({start(body, peer, meta_tag(tag), what, " (meta)", true), body, peer, tag, what, " (meta)"});
    sent_meta_[channel] = std::move(meta);
  }
  for (const auto& t : tensors) {
    std::vector<at::Tensor> one{t.detach().contiguous()};
    pending_.push_back({start(one, peer, data_tag(tag), what, "", true), one, peer, tag, what, ""});
  }
}

bool P2P::post_recv(int peer, int tag) {
  const Channel channel{peer, tag};
  auto known = recv_meta_.find(channel);
  if (dynamic_ || known == recv_meta_.end() || posted_.count(channel)) return false;
  PostedRecv posted;
  for (const auto& m : known->second.tensors) {
    posted.tensors.push_back(at::empty(m.shape, at::TensorOptions().dtype(m.dtype).device(device_)));
    std::vector<at::Tensor> one{posted.tensors.back()};
    // A failure to start is reported by the recv() that waits for it, which knows what it receives.
    try {
      posted.works.push_back(group_->recv(one, peer, data_tag(tag)));
    } catch (const std::exception&) {
      posted.works.push_back(nullptr);
    }
  }
  posted_.emplace(channel, std::move(posted));
  return true;
}

Activation P2P::recv(int peer, int tag, const Describe& what) {
  const Channel channel{peer, tag};
  if (auto posted = posted_.find(channel); posted != posted_.end()) {
    PostedRecv mine = std::move(posted->second);
    posted_.erase(posted);
    for (size_t i = 0; i < mine.tensors.size(); ++i) {
      if (!mine.works[i]) {  // starting it failed: start again here to get the error, named
        std::vector<at::Tensor> one{mine.tensors[i]};
        mine.works[i] = start(one, peer, data_tag(tag), what, "", false);
      }
      wait(mine.works[i], peer, what, "", false);
    }
    return Activation{std::move(mine.tensors), recv_meta_[channel].is_tuple, /*owned=*/true};
  }
  auto known = recv_meta_.find(channel);
  if (dynamic_ || known == recv_meta_.end()) {
    const auto long_options = at::TensorOptions().dtype(at::kLong).device(device_);
    std::vector<at::Tensor> length{at::empty({1}, long_options)};
    wait(start(length, peer, meta_tag(tag), what, " (meta length)", false), peer, what, " (meta length)", false);
    std::vector<at::Tensor> body{at::empty({length[0].item<int64_t>()}, long_options)};
    wait(start(body, peer, meta_tag(tag), what, " (meta)", false), peer, what, " (meta)", false);
    body[0] = body[0].cpu();
    ChannelMeta meta;
    meta.tensors = decode(body[0], &meta.is_tuple);
    auto& buffers = recv_buffers_[channel];
    if (known == recv_meta_.end() || !(known->second == meta)) {
      buffers.clear();
      for (const auto& m : meta.tensors) {
        buffers.push_back(at::empty(m.shape, at::TensorOptions().dtype(m.dtype).device(device_)));
      }
    }
    recv_meta_[channel] = std::move(meta);
  }
  auto& buffers = recv_buffers_[channel];
  for (auto& b : buffers) {
    std::vector<at::Tensor> one{b};
    wait(start(one, peer, data_tag(tag), what, "", false), peer, what, "", false);
  }
  return Activation{buffers, recv_meta_[channel].is_tuple};
}

void P2P::finish_channel_sends(int peer, int tag) {
  std::vector<PendingSend> still;
  still.reserve(pending_.size());
  for (auto& p : pending_) {
    if (p.peer == peer && p.tag == tag) {
      wait(p.work, p.peer, p.what, p.part, true);
    } else {
      still.push_back(std::move(p));
    }
  }
  pending_.swap(still);
}

void P2P::wait_sends() {
  std::vector<PendingSend> pending;
  pending.swap(pending_);
  for (auto& p : pending) wait(p.work, p.peer, p.what, p.part, true);
}

void P2P::reap_sends() {
  pending_.erase(std::remove_if(pending_.begin(), pending_.end(),
                                [](const PendingSend& p) { return p.work->isCompleted() && !p.work->exception(); }),
                 pending_.end());
}

void P2P::reset() {
  wait_sends();
  TORCH_CHECK(posted_.empty(), self_name_, ": reset() while receives are posted");
  sent_meta_.clear();
  recv_meta_.clear();
  recv_buffers_.clear();
}

}  // namespace dpe::runtime
