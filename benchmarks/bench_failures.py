"""How fast every survivor learns that a rank died: a pipeline of 2 stages
(S=2, or PP=2 x DP=2) trains continuously over gloo; at a random moment a
random rank is killed with SIGKILL; every other rank must raise. Prints, per
trial and in summary, the seconds from the kill to each survivor's exception,
and where it came from.

    .venv/bin/python benchmarks/bench_failures.py [--trials 20] [--p2p-timeout 10] [--world-sizes 2 4]
"""
import argparse
import os
import random
import signal
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "distributed"))


def worker(rank, world_size, port, p2p_timeout, ready, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
    import torch
    import torch.nn as nn
    torch.set_num_threads(1)
    import deepspeed

    import deepspeed_pipe_ext as dpe
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    torch.manual_seed(0)
    layers = [dpe.LayerSpec(nn.Linear, 64, 64) for _ in range(8)]
    net = dpe.PipelineModule(layers=layers, num_stages=2, loss_fn=nn.MSELoss())
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 8, "steps_per_print": 10**9,
              "train_batch_size": 4 * 8 * (world_size // 2), "pipeline": {"p2p_timeout": p2p_timeout}}
    engine, _, _, _ = dpe.initialize(model=net, config=config, model_parameters=net.parameters(),
                                     optimizer=torch.optim.SGD(net.parameters(), lr=1e-3))
    batch = (torch.randn(4, 64), torch.randn(4, 64))
    engine.train_batch(data_iter=iter([batch] * 8))
    ready.put(rank)
    try:
        while True:
            engine.train_batch(data_iter=iter([batch] * 8))
    except Exception as err:
        results.put((rank, time.monotonic(), f"{type(err).__name__}: {err}"))


def trial(world_size, p2p_timeout, rng):
    """Kills a random rank at a random moment; returns the victim and, per
    survivor, (seconds from the kill to its exception, its message)."""
    import multiprocessing as mp

    from distributed import free_port
    ctx = mp.get_context("spawn")
    ready, results = ctx.Queue(), ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world_size, port, p2p_timeout, ready, results), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    for _ in range(world_size):
        ready.get(timeout=180)
    time.sleep(rng.uniform(0.05, 1.0))  # some point inside a batch
    victim = rng.randrange(world_size)
    killed_at = time.monotonic()
    os.kill(procs[victim].pid, signal.SIGKILL)
    survivors = {}
    deadline = killed_at + p2p_timeout + 30
    while len(survivors) < world_size - 1 and time.monotonic() < deadline:
        try:
            rank, raised_at, message = results.get(timeout=max(0.1, deadline - time.monotonic()))
        except Exception:
            break
        survivors[rank] = (raised_at - killed_at, message)
    for rank in range(world_size):
        if rank != victim and rank not in survivors:
            survivors[rank] = (float("inf"), "no error (hang)")
    for p in procs:
        p.kill()
        p.join()
    return victim, survivors


def origin(message):
    """Where a survivor's exception came from, in a few words."""
    if "stopped because the batch failed on" in message:
        return "told by another rank"
    if "rendezvous store" in message:
        return "lost the store (rank 0 died)"
    if "closed the connection" in message:
        return "own closed connection"
    return "other: " + message[:60]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--p2p-timeout", type=float, default=10.0)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    for world_size in args.world_sizes:
        rng = random.Random(world_size)
        times, origins, hangs, by_rank = [], {}, 0, {}
        layout = "2 stages" if world_size == 2 else f"2 stages x {world_size // 2} data-parallel"
        for t in range(args.trials):
            victim, survivors = trial(world_size, args.p2p_timeout, rng)
            for rank, (seconds, message) in sorted(survivors.items()):
                times.append(seconds)
                by_rank.setdefault(rank, []).append(seconds)
                hangs += seconds == float("inf")
                key = origin(message)
                origins[key] = origins.get(key, 0) + 1
            print(f"[{layout}] trial {t:2d}: killed rank {victim}; " +
                  ", ".join(f"rank {r} raised after {s:.3f} s ({origin(m)})"
                            for r, (s, m) in sorted(survivors.items())),
                  flush=True)
        finite = [s for s in times if s != float("inf")]
        print(f"\n{layout} ({world_size} ranks) over gloo, p2p_timeout {args.p2p_timeout:g} s, {args.trials} trials: "
              f"{len(times)} survivor exceptions, seconds from SIGKILL: median {statistics.median(finite):.3f}, "
              f"worst {max(times):.3f}; hangs {hangs}; " + ", ".join(f"{k}: {v}" for k, v in sorted(origins.items())),
              flush=True)
        for rank, seconds in sorted(by_rank.items()):
            print(f"  rank {rank}: survived {len(seconds)} kills, median {statistics.median(seconds):.3f} s, "
                  f"worst {max(seconds):.3f} s", flush=True)
        print(flush=True)


if __name__ == "__main__":
    main()
