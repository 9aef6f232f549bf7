#include "topology.h"

#include <algorithm>
#include <cstdio>
#include <stdexcept>

namespace dpe::core {

namespace {
std::string join_axes(const std::vector<std::string>& axes) {
  std::string out;
  for (const auto& a : axes) out += (out.empty() ? "'" : ", '") + a + "'";
  return "[" + out + "]";
}
}  // namespace

Topology::Topology(std::vector<std::string> axes, std::vector<int64_t> dims)
    : axes_(std::move(axes)), dims_(std::move(dims)) {
  if (axes_.size() != dims_.size()) {
    throw std::invalid_argument("topology has " + std::to_string(axes_.size()) + " axes but " +
                                std::to_string(dims_.size()) + " dims: give one dim per axis");
  }
  for (size_t i = 0; i < axes_.size(); ++i) {
    if (axes_[i].empty()) throw std::invalid_argument("topology axis names must be non-empty");
    if (std::count(axes_.begin(), axes_.end(), axes_[i]) > 1) {
      throw std::invalid_argument("topology axis '" + axes_[i] + "' appears twice in " + join_axes(axes_));
    }
    if (dims_[i] < 1) {
      throw std::invalid_argument("topology axis '" + axes_[i] + "' has dim " + std::to_string(dims_[i]) +
                                  ": every dim must be >= 1");
    }
  }
  strides_.assign(dims_.size(), 1);
  for (int64_t i = static_cast<int64_t>(dims_.size()) - 2; i >= 0; --i) strides_[i] = strides_[i + 1] * dims_[i + 1];
  for (int64_t d : dims_) world_size_ *= d;
}

int64_t Topology::axis_index(const std::string& axis) const {
  auto it = std::find(axes_.begin(), axes_.end(), axis);
  return it == axes_.end() ? -1 : static_cast<int64_t>(it - axes_.begin());
}

int64_t Topology::require_axis(const std::string& axis) const {
  const int64_t i = axis_index(axis);
  if (i < 0) throw std::invalid_argument("topology has no axis '" + axis + "'; its axes are " + join_axes(axes_));
  return i;
}

void Topology::check_rank(int64_t rank) const {
  if (rank < 0 || rank >= world_size_) {
    throw std::invalid_argument("rank " + std::to_string(rank) + " not found in topology (world size " +
                                std::to_string(world_size_) + ")");
  }
}

int64_t Topology::dim(const std::string& axis) const {
  const int64_t i = axis_index(axis);
  return i < 0 ? 0 : dims_[i];
}

int64_t Topology::rank(const Coord& coord) const {
  if (coord.size() != axes_.size()) {
    throw std::invalid_argument("a rank needs a coordinate on every axis " + join_axes(axes_) +
                                "; use filter_match() for slices");
  }
  int64_t r = 0;
  for (size_t i = 0; i < coord.size(); ++i) {
    if (coord[i] < 0 || coord[i] >= dims_[i]) {
      throw std::invalid_argument("coordinate " + std::to_string(coord[i]) + " on axis '" + axes_[i] +
                                  "' is outside [0, " + std::to_string(dims_[i]) + ")");
    }
    r += coord[i] * strides_[i];
  }
  return r;
}

Topology::Coord Topology::coord(int64_t rank) const {
  check_rank(rank);
  Coord c(axes_.size());
  for (size_t i = 0; i < axes_.size(); ++i) c[i] = (rank / strides_[i]) % dims_[i];
  return c;
}

std::vector<std::vector<int64_t>> Topology::axis_comm_lists(const std::string& axis) const {
  const int64_t a = axis_index(axis);
  if (a < 0) return {};
  // Ranks with coordinate 0 on `axis`, ascending, enumerate the other axes in
  // row-major order.
  std::vector<std::vector<int64_t>> lists;
  lists.reserve(world_size_ / dims_[a]);
  for (int64_t r = 0; r < world_size_; ++r) {
    if ((r / strides_[a]) % dims_[a] != 0) continue;
    std::vector<int64_t> ranks(dims_[a]);
    for (int64_t k = 0; k < dims_[a]; ++k) ranks[k] = r + k * strides_[a];
    lists.push_back(std::move(ranks));
  }
  return lists;
}

std::vector<int64_t> Topology::filter_match(const std::vector<std::optional<int64_t>>& partial) const {
  if (partial.size() != axes_.size()) {
    throw std::invalid_argument("filter needs one optional value per axis of " + join_axes(axes_));
  }
  std::vector<int64_t> out;
  for (int64_t r = 0; r < world_size_; ++r) {
    bool match = true;
    for (size_t i = 0; i < axes_.size() && match; ++i) {
      if (partial[i] && (r / strides_[i]) % dims_[i] != *partial[i]) match = false;
    }
    if (match) out.push_back(r);
  }
  return out;
}

std::vector<int64_t> Topology::axis_list(const std::string& axis, int64_t idx) const {
  std::vector<std::optional<int64_t>> partial(axes_.size());
  partial[require_axis(axis)] = idx;
  return filter_match(partial);
}

std::string Topology::rank_repr(int64_t rank, const std::vector<std::string>& omit_axes, const std::string& inner_sep,
                                const std::string& outer_sep) const {
  const Coord c = coord(rank);
  std::string out;
  bool first = true;
  for (size_t i = 0; i < axes_.size(); ++i) {
    if (std::find(omit_axes.begin(), omit_axes.end(), axes_[i]) != omit_axes.end()) continue;
    char num[32];
    std::snprintf(num, sizeof num, "%02lld", static_cast<long long>(c[i]));
    if (!first) out += outer_sep;
    out += axes_[i] + inner_sep + num;
    first = false;
  }
  return out;
}

std::vector<std::vector<int64_t>> Topology::ring_pairs(const std::string& axis) const {
  const int64_t a = require_axis(axis);
  std::vector<std::vector<int64_t>> pairs(world_size_);
  for (int64_t r = 0; r < world_size_; ++r) {
    const int64_t pos = (r / strides_[a]) % dims_[a];
    const int64_t next = r + (((pos + 1) % dims_[a]) - pos) * strides_[a];
    pairs[r] = {r, next};
  }
  return pairs;
}

std::vector<int64_t> prime_factors(int64_t n) {
  if (n <= 0) throw std::invalid_argument("Values must be strictly positive.");
  std::vector<int64_t> primes;
  for (int64_t p = 2; n > 1;) {
    if (p * p > n) {
      primes.push_back(n);
      break;
    }
    if (n % p == 0) {
      primes.push_back(p);
      n /= p;
    } else {
      ++p;
    }
  }
  return primes;
}

}  // namespace dpe::core
