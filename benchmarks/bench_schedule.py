"""Schedule generation speed: DeepSpeed's Python TrainSchedule against ours.

Generates every stage's 1F1B schedule for S stages and M micro-batches (the
streams are checked identical first), alternating repetitions in one process
pinned to one core; medians and ratios. Three views of ours:
  objects - iterating our TrainSchedule, instruction objects like DeepSpeed's
  tuples  - all stages as (op, buffer, micro_batch, chunk) tuples in one call
  C++     - generation alone, nothing crossing into Python (what the C++
            executor pays)

    .venv/bin/python benchmarks/bench_schedule.py [--stages 64 --micro-batches 1024 --repeats 3]
"""
import argparse
import os
import statistics
import time

from deepspeed.runtime.pipe import schedule as ds

from deepspeed_pipe_ext import _C
from deepspeed_pipe_ext import schedule as ours


def deepspeed_all(M, S):
    return [list(ds.TrainSchedule(M, S, stage)) for stage in range(S)]


def ours_objects(M, S):
    return [list(ours.TrainSchedule(M, S, stage)) for stage in range(S)]


def ours_tuples(M, S):
    return _C.schedule_all_steps("1f1b", M, S)


def ours_cpp(M, S):
    return _C.count_all_instructions("1f1b", M, S)


def timed(fn, *args):
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--stages", type=int, default=64)
    parser.add_argument("--micro-batches", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    S, M = args.stages, args.micro_batches

    theirs = deepspeed_all(M, S)
    mine = ours_objects(M, S)
    assert [[(type(c).__name__, getattr(c, "buffer_id", None)) for c in step] for s in theirs for step in s] == \
        [[(type(c).__name__, getattr(c, "buffer_id", None)) for c in step] for s in mine for step in s]
    del theirs, mine

    variants = [("DeepSpeed (Python objects)", deepspeed_all), ("ours: objects", ours_objects),
                ("ours: tuples", ours_tuples), ("ours: C++ only", ours_cpp)]
    times = {name: [] for name, _ in variants}
    for _ in range(args.repeats):
        for name, fn in variants:
            times[name].append(timed(fn, M, S))
    base = statistics.median(times[variants[0][0]])
    print(f"all {S} stages' 1F1B schedules, {M} micro-batches, median of {args.repeats}:")
    for name, _ in variants:
        t = statistics.median(times[name])
        print(f"  {name:28s} {t:9.4f} s   {base / t:8.1f}x")


if __name__ == "__main__":
    main()
