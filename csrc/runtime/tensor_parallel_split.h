// DeepSpeed's "pipe_partitioned" and "grad_partitioned" for 3D parallelism:
// the tensor-parallel ranks of a stage all hold the same activation, so each
// sends only its 1/TP share of the first tensor to its counterpart in the
// next stage, and the receiving ranks gather the shares back over their
// tensor-parallel group. Every link then carries 1/TP of that tensor.
//
// On the wire a split value is (meta, share, the other tensors...): meta is
// int64 [split, is_tuple, ndim, dims...]. Only a floating-point first tensor
// is split; the shares are equal (the last zero-padded), so any size works.
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <chrono>
#include <string>

#include "runtime/p2p.h"

namespace dpe::runtime {

class TensorParallelSplit {
 public:
  // `group`: this rank's tensor-parallel group (the ranks of one stage that
  // hold the same activations). `self_name` prefixes error messages.
  TensorParallelSplit(c10::intrusive_ptr<c10d::ProcessGroup> group, std::chrono::milliseconds timeout,
                      std::string self_name);

  // What this rank sends instead of `value`: (meta, its share of the first
  // tensor, the other tensors).
  Activation split(const Activation& value) const;
  // The value every rank of the group split, from this rank's `received`
  // (gathers the shares over the group; a collective of the group).
  Activation gather(const Activation& received, const std::string& what) const;

  int size() const { return group_->getSize(); }

 private:
  c10::intrusive_ptr<c10d::ProcessGroup> group_;
  std::chrono::milliseconds timeout_;
  std::string self_name_;
};

}  // namespace dpe::runtime
