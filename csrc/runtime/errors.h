// Errors of the point-to-point path, by what happened, so that callers tell
// them apart by type, never by their text. Python sees them as
// deepspeed_pipe_ext._C.P2PError and its subclasses (all RuntimeErrors),
// with the stage, the peer and the schedule's position as attributes.
#pragma once

#include <stdexcept>
#include <string>

namespace dpe::runtime {

class P2PError : public std::runtime_error {
 public:
  P2PError(const std::string& message, std::string stage, int peer)
      : std::runtime_error(message), stage_(std::move(stage)), peer_(peer) {}
  const std::string& stage() const { return stage_; }  // "stage 1 (global rank 3)"
  int peer() const { return peer_; }                   // the peer's rank in the pipe group
  // Where the schedule stood ("step 3, RecvActivation (micro-batch 1)"); set
  // by the executor, empty for a transfer outside a run.
  const std::string& position() const { return position_; }
  void set_position(std::string position) { position_ = std::move(position); }

 private:
  std::string stage_;
  int peer_;
  std::string position_;
};

// The transfer did not complete within the timeout.
class P2PTimeout : public P2PError {
 public:
  using P2PError::P2PError;
};

// The transfer was stopped: P2P::abort (another rank's failure arrived) or the backend aborted it.
class P2PAborted : public P2PError {
 public:
  using P2PError::P2PError;
};

// The peer closed the connection: its process probably died.
class PeerClosed : public P2PError {
 public:
  using P2PError::P2PError;
};

}  // namespace dpe::runtime
