"""Partition solver: parity with DeepSpeed, optimality, bad input."""
import itertools
import math
import random

import pytest
from deepspeed.runtime import utils as ds_utils

from deepspeed_pipe_ext import partition


def random_weights(rng, n):
    kind = rng.randrange(5)
    if kind == 0:
        return [rng.randint(0, 2) for _ in range(n)]  # many ties and zeros
    if kind == 1:
        return [rng.randint(0, 10**6) for _ in range(n)]
    if kind == 2:
        return [rng.random() * 10**rng.randint(-3, 6) for _ in range(n)]
    if kind == 3:
        return [0] * n
    return [rng.choice([1, 1, 1, 50, 0.5]) for _ in range(n)]


def test_uniform_matches_deepspeed():
    for items in range(0, 70):
        for parts in range(1, 20):
            assert partition.partition_uniform(items, parts) == ds_utils.partition_uniform(items, parts)


def test_balanced_matches_deepspeed_on_random_inputs():
    rng = random.Random(1234)
    for _ in range(3000):
        n, m = rng.randint(0, 24), rng.randint(1, 9)
        weights = random_weights(rng, n)
        expected = [int(p) for p in ds_utils.partition_balanced(weights, m)]
        assert partition.partition_balanced(weights, m) == expected, (weights, m)


@pytest.mark.parametrize("n,m", [(64, 8), (100, 16)])
def test_balanced_matches_deepspeed_on_larger_inputs(n, m):
    rng = random.Random(n * m)
    for _ in range(3):
        weights = random_weights(rng, n)
        assert partition.partition_balanced(weights, m) == [int(p) for p in ds_utils.partition_balanced(weights, m)]


def brute_force_min_max(weights, m):
    n = len(weights)
    best = math.inf
    for cuts in itertools.combinations(range(1, n), m - 1):
        bounds = (0, ) + cuts + (n, )
        best = min(best, partition.max_part_weight(weights, list(bounds)))
    return best


def test_minmax_is_optimal_against_brute_force():
    rng = random.Random(99)
    for _ in range(1500):
        n, m = rng.randint(1, 11), rng.randint(1, 5)
        weights = random_weights(rng, n)
        parts = partition.partition_minmax(weights, m)
        assert len(parts) == m + 1 and parts[0] == 0 and parts[-1] == n
        assert all(a <= b for a, b in zip(parts, parts[1:]))
        if n >= m:
            assert all(a < b for a, b in zip(parts, parts[1:])), "every part non-empty"
            assert partition.max_part_weight(weights, parts) == brute_force_min_max(weights, m)


def test_minmax_never_worse_than_deepspeed_balanced():
    rng = random.Random(5)
    for _ in range(500):
        n, m = rng.randint(1, 30), rng.randint(1, 8)
        weights = random_weights(rng, n)
        ours = partition.max_part_weight(weights, partition.partition_minmax(weights, m))
        theirs = partition.max_part_weight(weights, partition.partition_balanced(weights, m))
        assert ours <= theirs


def test_minmax_scales_to_a_million_layers():
    rng = random.Random(3)
    weights = [rng.random() for _ in range(1_000_000)]
    parts = partition.partition_minmax(weights, 1000)
    assert len(parts) == 1001 and parts[-1] == 1_000_000
    worst = partition.max_part_weight(weights, parts)
    assert worst >= sum(weights) / 1000 * (1 - 1e-9)


def test_accepts_numpy_and_torch_numbers():
    import numpy as np
    import torch
    assert partition.partition_balanced(np.array([1, 2, 3, 4]), np.int64(2)) == [0, 3, 4]
    assert partition.partition_minmax(torch.tensor([1.0, 2.0, 3.0, 4.0]), 2) == [0, 3, 4]


@pytest.mark.parametrize("fn", [partition.partition_balanced, partition.partition_minmax])
def test_bad_weights(fn):
    with pytest.raises(ValueError, match="layer 1 is negative"):
        fn([1, -2, 3], 2)
    with pytest.raises(ValueError, match="layer 2 is nan"):
        fn([1, 2, float("nan")], 2)
    with pytest.raises(ValueError, match="layer 0 is inf"):
        fn([float("inf"), 2], 2)
    with pytest.raises(ValueError, match="num_parts must be at least 1"):
        fn([1, 2], 0)
    with pytest.raises(TypeError, match="sequence of numbers"):
        fn(["a", 1], 2)


def test_bad_counts():
    with pytest.raises(ValueError, match="num_parts must be at least 1"):
        partition.partition_uniform(4, 0)
    with pytest.raises(ValueError, match="num_items must be >= 0"):
        partition.partition_uniform(-1, 2)
    with pytest.raises(TypeError, match="num_parts must be an int"):
        partition.partition_uniform(4, 2.5)
