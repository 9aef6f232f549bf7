"""Partition solver speed: DeepSpeed's Python partition_balanced against ours.

Same inputs, alternating repetitions in one process pinned to one core;
reports medians and the ratio. Also times partition_minmax on a million
layers (DeepSpeed has no equivalent).

    .venv/bin/python benchmarks/bench_partition.py [--repeats 3]
"""
import argparse
import os
import random
import statistics
import time

from deepspeed.runtime import utils as ds_utils

from deepspeed_pipe_ext import partition


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", default="256x8,256x16,1024x8,1024x16")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

    rng = random.Random(0)
    print(f"{'layers x parts':>15} {'deepspeed (s)':>14} {'ours (s)':>11} {'speed-up':>10}")
    for case in args.cases.split(","):
        n, m = (int(v) for v in case.split("x"))
        weights = [rng.randint(1000, 5_000_000) for _ in range(n)]
        ds_times, our_times = [], []
        for _ in range(args.repeats):
            t, theirs = timed(ds_utils.partition_balanced, weights, m)
            ds_times.append(t)
            t, ours = timed(partition.partition_balanced, weights, m)
            our_times.append(t)
            assert ours == [int(p) for p in theirs], "results differ"
        ds, us = statistics.median(ds_times), statistics.median(our_times)
        print(f"{case:>15} {ds:14.3f} {us:11.5f} {ds / us:9.0f}x", flush=True)

    weights = [rng.random() for _ in range(1_000_000)]
    times = [timed(partition.partition_minmax, weights, 1000)[0] for _ in range(args.repeats)]
    print(f"partition_minmax, 1,000,000 layers into 1,000 parts: {statistics.median(times):.3f} s "
          "(including the Python list conversion)")


if __name__ == "__main__":
    main()
