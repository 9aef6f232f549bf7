// Unit and randomized tests of the torch-free core, run under ASan/UBSan by
// `make test-core`. Python tests check parity with DeepSpeed; these check the
// core's own invariants (optimality against brute force, rank math round trips).
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>

#include "core/partition.h"
#include "core/simulator.h"
#include "core/topology.h"

using namespace dpe::core;

static int failures = 0;
static int checks = 0;
#define CHECK(cond)                                                          \
  do {                                                                       \
    ++checks;                                                                \
    if (!(cond)) {                                                           \
      ++failures;                                                            \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
    }                                                                        \
  } while (0)

template <class F>
static bool throws_invalid(F f) {
  try {
    f();
  } catch (const std::invalid_argument&) {
    return true;
  }
  return false;
}

// Smallest achievable max part over all partitions into exactly m non-empty parts.
static double brute_force_minmax(const std::vector<double>& w, int64_t m) {
  const int64_t n = static_cast<int64_t>(w.size());
  double best = std::numeric_limits<double>::infinity();
  Boundaries parts(m + 1, 0);
  parts[m] = n;
  std::function<void(int64_t, int64_t)> rec = [&](int64_t p, int64_t start) {
    if (p == m - 1) {
      parts[p] = start;
      if (start < n) best = std::min(best, max_part_weight(w, parts));
      return;
    }
    parts[p] = start;
    for (int64_t end = start + 1; end <= n - (m - p - 1); ++end) {
      parts[p + 1] = end;
      rec(p + 1, end);
    }
  };
  rec(0, 0);
  return best;
}

static bool valid_partition(const Boundaries& parts, int64_t n, int64_t m) {
  if (static_cast<int64_t>(parts.size()) != m + 1 || parts.front() != 0 || parts.back() != n) return false;
  for (int64_t p = 0; p < m; ++p) {
    if (parts[p] > parts[p + 1]) return false;
    if (n >= m && parts[p] == parts[p + 1]) return false;  // non-empty parts when possible
  }
  return true;
}

static void test_partition() {
  std::mt19937_64 rng(7);
  for (int trial = 0; trial < 3000; ++trial) {
    const int64_t n = rng() % 11, m = 1 + rng() % 6;
    std::vector<double> w(n);
    const int kind = trial % 3;
    for (auto& x : w) x = kind == 0 ? double(rng() % 3) : kind == 1 ? double(rng() % 1000) : double(rng() % 100000) / 977.0;
    const Boundaries mm = partition_minmax(w, m);
    CHECK(valid_partition(mm, n, m));
    if (n >= m) CHECK(max_part_weight(w, mm) == brute_force_minmax(w, m));
    const Boundaries bal = partition_balanced(w, m);
    CHECK(valid_partition(bal, n, m));
    if (n >= m) CHECK(max_part_weight(w, mm) <= max_part_weight(w, bal));
  }
  CHECK(partition_uniform(10, 3) == (Boundaries{0, 4, 7, 10}));
  CHECK(partition_uniform(2, 4) == (Boundaries{0, 1, 2, 2, 2}));
  CHECK(partition_minmax({}, 3) == (Boundaries{0, 0, 0, 0}));
  // Large input: a million layers into a thousand parts.
  std::vector<double> big(1000000);
  for (auto& x : big) x = double(rng() % 1000);
  const Boundaries bp = partition_minmax(big, 1000);
  CHECK(valid_partition(bp, 1000000, 1000));
  CHECK(throws_invalid([] { partition_uniform(3, 0); }));
  CHECK(throws_invalid([] { partition_balanced({1.0, -1.0}, 2); }));
  CHECK(throws_invalid([] { partition_minmax({1.0, std::nan("")}, 2); }));
  CHECK(throws_invalid([] { partition_minmax({1.0, INFINITY}, 2); }));
}

static void test_topology() {
  Topology t({"pipe", "data", "model"}, {2, 3, 2});
  CHECK(t.world_size() == 12);
  for (int64_t r = 0; r < 12; ++r) CHECK(t.rank(t.coord(r)) == r);
  CHECK(t.rank({1, 0, 1}) == 7);
  CHECK(t.axis_comm_lists("pipe").size() == 6);
  CHECK(t.axis_comm_lists("pipe")[1] == (std::vector<int64_t>{1, 7}));
  CHECK(t.axis_comm_lists("nope").empty());
  CHECK(t.axis_list("data", 1) == (std::vector<int64_t>{2, 3, 8, 9}));
  CHECK(t.rank_repr(7, {"data", "pipe"}, "_", "-") == "model_01");
  CHECK(t.ring_pairs("pipe")[7] == (std::vector<int64_t>{7, 1}));
  CHECK(prime_factors(360) == (std::vector<int64_t>{2, 2, 2, 3, 3, 5}));
  CHECK(throws_invalid([&] { t.coord(12); }));
  CHECK(throws_invalid([&] { t.rank({2, 0, 0}); }));
  CHECK(throws_invalid([] { Topology({"a", "a"}, {1, 1}); }));
  CHECK(throws_invalid([] { Topology({"a"}, {0}); }));
}

// Every schedule kind passes the simulator's checks for all S <= 16, M <= 64
// (chunks <= 4 for interleaved), and each keeps its activation bound.
static void test_schedules_property() {
  const ScheduleKind kinds[] = {ScheduleKind::Train1F1B, ScheduleKind::Inference, ScheduleKind::GPipe,
                                ScheduleKind::ZeroBubbleH1, ScheduleKind::Interleaved1F1B};
  int64_t simulated = 0;
  for (ScheduleKind kind : kinds) {
    const int64_t max_chunks = kind == ScheduleKind::Interleaved1F1B ? 4 : 1;
    for (int64_t S = 1; S <= 16; ++S) {
      for (int64_t M = 1; M <= 64; ++M) {
        for (int64_t V = 1; V <= max_chunks; ++V) {
          const ScheduleSpec spec{kind, M, S, V};
          try {
            const SimulationResult r = simulate(spec, OpCosts{});
            ++simulated;
            if (kind == ScheduleKind::Train1F1B || kind == ScheduleKind::ZeroBubbleH1) {
              for (int64_t i = 0; i < S; ++i) CHECK(r.peak_activations[i] == std::min(S - i, M));
            }
          } catch (const std::exception& e) {
            ++failures;
            std::fprintf(stderr, "%s S=%lld M=%lld V=%lld: %s\n", schedule_kind_name(kind), (long long)S,
                         (long long)M, (long long)V, e.what());
          }
        }
      }
    }
  }
  CHECK(simulated == (4 + 4) * 16 * 64);
  {
    const SimulationResult r = simulate(ScheduleSpec{ScheduleKind::DataParallel, 8, 1, 1}, OpCosts{});
    CHECK(r.makespan == 8 * 3);
  }
}

static void test_schedule_errors() {
  CHECK(throws_invalid([] { generate_steps(ScheduleSpec{ScheduleKind::Train1F1B, 0, 2, 1}, 0); }));
  CHECK(throws_invalid([] { generate_steps(ScheduleSpec{ScheduleKind::Train1F1B, 4, 2, 1}, 2); }));
  CHECK(throws_invalid([] { generate_steps(ScheduleSpec{ScheduleKind::GPipe, 4, 2, 2}, 0); }));
  CHECK(throws_invalid([] { parse_schedule_kind("nope"); }));
}

int main() {
  test_partition();
  test_topology();
  test_schedules_property();
  test_schedule_errors();
  std::printf("%d passed, %d failed\n", checks - failures, failures);
  return failures == 0 ? 0 : 1;
}
