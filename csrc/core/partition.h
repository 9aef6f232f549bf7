// Contiguous partitioning of a layer sequence into pipeline stages.
// Plain C++17: no torch headers, so it can be unit-tested and fuzzed alone.
#pragma once

#include <cstdint>
#include <vector>

namespace dpe::core {

// A partition is a vector `parts` of num_parts + 1 boundaries: part p holds
// items [parts[p], parts[p + 1]).
using Boundaries = std::vector<int64_t>;

// DeepSpeed's partition_uniform: equal counts, the first (num_items %
// num_parts) parts get one extra item; with num_items <= num_parts the first
// num_items parts get one item each.
Boundaries partition_uniform(int64_t num_items, int64_t num_parts);

// DeepSpeed's partition_balanced: the linear-partition DP that minimises
// (largest part - smallest part), with DeepSpeed's exact floating-point
// arithmetic and tie-breaking (the last split point of equal cost wins).
// O(n^2 * m), like DeepSpeed's, but compiled.
Boundaries partition_balanced(const std::vector<double>& weights, int64_t num_parts);

// The exact contiguous partition minimising the largest part sum. Every part
// is non-empty when there are at least as many items as parts.
// O(n + 64 * m * log n): a binary search over the bit patterns of the answer
// (non-negative doubles order like their bits) with a greedy feasibility test.
Boundaries partition_minmax(const std::vector<double>& weights, int64_t num_parts);

// Largest part sum of a partition, with part sums taken as differences of the
// prefix sums the solvers use (so results compare exactly).
double max_part_weight(const std::vector<double>& weights, const Boundaries& parts);

// Throws std::invalid_argument naming the first negative or non-finite weight.
void check_weights(const std::vector<double>& weights);

}  // namespace dpe::core
