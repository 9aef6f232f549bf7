// The tag space of the pipe-parallel group's point-to-point messages, in one
// place. Both sides of a transfer compute its tag from facts they share, so
// messages of different kinds never match each other on gloo (which matches
// by tag) and NCCL (which ignores tags) sees the same issue order on both.
//
//   channel tag = 4 * receiving chunk + 2 * traffic + (1 for a gradient)
//   wire tags   = 2 * channel tag (its meta), 2 * channel tag + 1 (its data)
//
// Traffic separates training from evaluation (eval tensors have no graph and
// other shapes, so their channels keep meta of their own). The receiving
// chunk is that of the next virtual stage for an activation and of the
// previous one for a gradient: with several chunks per rank, each pair of
// chunks talks on its own channel.
#pragma once

#include <cstdint>

namespace dpe::core {

enum class Traffic : uint8_t { Train = 0, Eval = 1 };

constexpr int channel_tag(Traffic traffic, bool gradient, int64_t receiving_chunk) {
  return static_cast<int>(4 * receiving_chunk + 2 * static_cast<int>(traffic) + (gradient ? 1 : 0));
}
constexpr int meta_wire_tag(int channel) { return 2 * channel; }
constexpr int data_wire_tag(int channel) { return 2 * channel + 1; }

}  // namespace dpe::core
