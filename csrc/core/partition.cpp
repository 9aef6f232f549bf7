#include "partition.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

namespace dpe::core {
namespace {

void check_num_parts(int64_t num_parts) {
  if (num_parts < 1) {
    throw std::invalid_argument("num_parts must be at least 1 (got " + std::to_string(num_parts) +
                                "): a pipeline needs one or more stages");
  }
}

// Sequential running sum in double, the same as numpy.cumsum followed by a
// store into a float64 array (what DeepSpeed does).
std::vector<double> prefix_sums(const std::vector<double>& weights) {
  std::vector<double> prefix(weights.size() + 1, 0.0);
  for (size_t i = 0; i < weights.size(); ++i) prefix[i + 1] = prefix[i] + weights[i];
  return prefix;
}

uint64_t bits_of(double x) {
  uint64_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

double double_of(uint64_t b) {
  double x;
  std::memcpy(&x, &b, sizeof x);
  return x;
}

// Greedy cut positions for parts whose sum (prefix difference) is <= limit,
// leaving at least one item for each later part. Returns an empty vector when
// the items do not fit into num_parts parts.
Boundaries greedy_cuts(const std::vector<double>& prefix, int64_t num_parts, double limit) {
  const int64_t n = static_cast<int64_t>(prefix.size()) - 1;
  Boundaries parts(num_parts + 1, 0);
  int64_t start = 0;
  for (int64_t p = 0; p < num_parts; ++p) {
    const int64_t parts_left_after = num_parts - p - 1;
    // Largest end with prefix[end] - prefix[start] <= limit. The difference is
    // non-decreasing in `end` because prefix is non-decreasing and rounding is
    // monotone, so a binary search is exact.
    auto first_over = std::upper_bound(prefix.begin() + start, prefix.end(), limit,
                                       [&](double lim, double value) { return lim < value - prefix[start]; });
    int64_t end = static_cast<int64_t>(first_over - prefix.begin()) - 1;
    end = std::min(end, n - parts_left_after);
    end = std::max(end, start);
    parts[p + 1] = end;
    start = end;
  }
  if (start != n) return {};
  return parts;
}

}  // namespace

void check_weights(const std::vector<double>& weights) {
  for (size_t i = 0; i < weights.size(); ++i) {
    const double w = weights[i];
    if (!std::isfinite(w)) {
      throw std::invalid_argument("weight of layer " + std::to_string(i) + " is " + std::to_string(w) +
                                  ": partition weights must be finite numbers");
    }
    if (w < 0) {
      throw std::invalid_argument("weight of layer " + std::to_string(i) + " is negative (" + std::to_string(w) +
                                  "): partition weights must be >= 0");
    }
  }
}

Boundaries partition_uniform(int64_t num_items, int64_t num_parts) {
  check_num_parts(num_parts);
  if (num_items < 0) {
    throw std::invalid_argument("num_items must be >= 0 (got " + std::to_string(num_items) + ")");
  }
  Boundaries parts(num_parts + 1, 0);
  if (num_items <= num_parts) {
    for (int64_t p = 0; p <= num_parts; ++p) parts[p] = std::min(p, num_items);
    return parts;
  }
  const int64_t chunk = num_items / num_parts;
  const int64_t residual = num_items - chunk * num_parts;
  for (int64_t p = 0; p <= num_parts; ++p) parts[p] = p * chunk + std::min(p, residual);
  return parts;
}

Boundaries partition_balanced(const std::vector<double>& weights, int64_t num_parts) {
  check_num_parts(num_parts);
  check_weights(weights);
  const int64_t n = static_cast<int64_t>(weights.size());
  const int64_t m = num_parts;
  if (n <= m) return partition_uniform(n, m);

  const double inf = std::numeric_limits<double>::infinity();
  const std::vector<double> prefix = prefix_sums(weights);
  const size_t cols = static_cast<size_t>(m + 1);
  // Row-major (n + 1) x (m + 1) tables, as in DeepSpeed. dp_min starts at +inf
  // everywhere, [0][0] included: that is DeepSpeed's behaviour and matters for
  // its tie-breaking.
  std::vector<double> dp_max((n + 1) * cols, inf), dp_min((n + 1) * cols, inf), dp_cost((n + 1) * cols, inf);
  std::vector<int64_t> position((n + 1) * cols, 0);
  dp_max[0] = 0;
  dp_cost[0] = 0;
  for (int64_t i = 1; i <= n; ++i) {
    const int64_t jmax = std::min(i, m);
    for (int64_t j = 1; j <= jmax; ++j) {
      const size_t here = i * cols + j;
      double best_cost = dp_cost[here], best_max = dp_max[here], best_min = dp_min[here];
      int64_t best_pos = position[here];
      for (int64_t k = 0; k < i; ++k) {
        const size_t prev = k * cols + (j - 1);
        const double seg = prefix[i] - prefix[k];
        const double max_sum = std::max(dp_max[prev], seg);
        const double min_sum = std::min(dp_min[prev], seg);
        const double cost = max_sum - min_sum;
        if (best_cost >= cost) {  // ">=": the last k of equal cost wins, like DeepSpeed
          best_cost = cost;
          best_max = max_sum;
          best_min = min_sum;
          best_pos = k;
        }
      }
      dp_cost[here] = best_cost;
      dp_max[here] = best_max;
      dp_min[here] = best_min;
      position[here] = best_pos;
    }
  }
  Boundaries parts(m + 1, 0);
  parts[m] = n;
  for (int64_t j = m; j >= 1; --j) parts[j - 1] = position[parts[j] * cols + j];
  return parts;
}

Boundaries partition_minmax(const std::vector<double>& weights, int64_t num_parts) {
  check_num_parts(num_parts);
  check_weights(weights);
  const int64_t n = static_cast<int64_t>(weights.size());
  if (n <= num_parts) return partition_uniform(n, num_parts);

  const std::vector<double> prefix = prefix_sums(weights);
  // The optimum lies between the heaviest single item and the whole sum.
  double lo = 0.0;
  for (int64_t i = 0; i < n; ++i) lo = std::max(lo, prefix[i + 1] - prefix[i]);
  const double hi = prefix[n] - prefix[0];
  uint64_t lo_bits = bits_of(lo), hi_bits = bits_of(hi);  // feasible(hi) holds
  if (!greedy_cuts(prefix, num_parts, lo).empty()) hi_bits = lo_bits;
  while (lo_bits + 1 < hi_bits) {
    const uint64_t mid = lo_bits + (hi_bits - lo_bits) / 2;
    if (greedy_cuts(prefix, num_parts, double_of(mid)).empty()) {
      lo_bits = mid;
    } else {
      hi_bits = mid;
    }
  }
  return greedy_cuts(prefix, num_parts, double_of(hi_bits));
}

double max_part_weight(const std::vector<double>& weights, const Boundaries& parts) {
  const std::vector<double> prefix = prefix_sums(weights);
  const int64_t n = static_cast<int64_t>(weights.size());
  double worst = 0.0;
  for (size_t p = 0; p + 1 < parts.size(); ++p) {
    if (parts[p] < 0 || parts[p] > parts[p + 1] || parts[p + 1] > n) {
      throw std::invalid_argument("boundaries must be non-decreasing within [0, " + std::to_string(n) + "]");
    }
    worst = std::max(worst, prefix[parts[p + 1]] - prefix[parts[p]]);
  }
  return worst;
}

}  // namespace dpe::core
