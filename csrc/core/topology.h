// Rank math of an n-dimensional process grid (DeepSpeed's ProcessTopology):
// row-major mapping between global ranks and named-axis coordinates.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace dpe::core {

class Topology {
 public:
  using Coord = std::vector<int64_t>;

  // Throws std::invalid_argument for empty/duplicate axis names, a size
  // mismatch or a dimension < 1.
  Topology(std::vector<std::string> axes, std::vector<int64_t> dims);

  const std::vector<std::string>& axes() const { return axes_; }
  const std::vector<int64_t>& dims() const { return dims_; }
  int64_t world_size() const { return world_size_; }

  // Index of `axis`, or -1 when the topology has no such axis.
  int64_t axis_index(const std::string& axis) const;
  // Size of `axis`, 0 when absent (as DeepSpeed).
  int64_t dim(const std::string& axis) const;

  int64_t rank(const Coord& coord) const;
  Coord coord(int64_t rank) const;

  // For every combination of the other axes (row-major), the ranks along `axis`.
  // Empty when the axis is absent.
  std::vector<std::vector<int64_t>> axis_comm_lists(const std::string& axis) const;
  // Ranks (ascending) whose coordinate matches every given axis value.
  std::vector<int64_t> filter_match(const std::vector<std::optional<int64_t>>& partial) const;
  // Ranks whose coordinate along `axis` equals idx.
  std::vector<int64_t> axis_list(const std::string& axis, int64_t idx) const;
  // "axis_XX" for each axis not omitted, joined by outer_sep.
  std::string rank_repr(int64_t rank, const std::vector<std::string>& omit_axes, const std::string& inner_sep,
                        const std::string& outer_sep) const;
  // For every rank, [rank, next rank along `axis`] (wrapping around).
  std::vector<std::vector<int64_t>> ring_pairs(const std::string& axis) const;

 private:
  int64_t require_axis(const std::string& axis) const;
  void check_rank(int64_t rank) const;

  std::vector<std::string> axes_;
  std::vector<int64_t> dims_;
  std::vector<int64_t> strides_;
  int64_t world_size_ = 1;
};

// Prime factorisation in ascending order (DeepSpeed's _prime_factors).
std::vector<int64_t> prime_factors(int64_t n);

}  // namespace dpe::core
