"""How fast a survivor learns that its peer died: 2 stages over gloo train
continuously; at a random moment one rank (chosen at random) is killed with
SIGKILL; the other must raise. Prints, per trial and in summary, the seconds
from the kill to the survivor's exception, and what it said.

    .venv/bin/python benchmarks/bench_failures.py [--trials 20] [--p2p-timeout 10]
"""
import argparse
import os
import random
import signal
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def worker(rank, port, p2p_timeout, ready, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1")
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
              "pipeline": {"p2p_timeout": p2p_timeout}}
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


def trial(p2p_timeout, rng):
    import multiprocessing as mp
    from distributed import free_port
    ctx = mp.get_context("spawn")
    ready, results = ctx.Queue(), ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, port, p2p_timeout, ready, results), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    for _ in range(2):
        ready.get(timeout=120)
    time.sleep(rng.uniform(0.05, 1.0))  # some point inside a batch
    victim = rng.randrange(2)
    killed_at = time.monotonic()
    os.kill(procs[victim].pid, signal.SIGKILL)
    try:
        rank, raised_at, message = results.get(timeout=p2p_timeout + 30)
        outcome = (victim, 1 - victim, raised_at - killed_at, message)
    except Exception:
        outcome = (victim, 1 - victim, float("inf"), "no error (hang)")
    for p in procs:
        p.kill()
        p.join()
    return outcome


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--p2p-timeout", type=float, default=10.0)
    args = parser.parse_args()
    rng = random.Random(0)
    outcomes = []
    for t in range(args.trials):
        victim, survivor, seconds, message = trial(args.p2p_timeout, rng)
        outcomes.append((victim, survivor, seconds, message))
        print(f"trial {t:2d}: killed stage {victim}; stage {survivor} raised after {seconds:.3f} s: "
              f"{message[:160]}", flush=True)
    print(f"\n{args.trials} trials, 2 stages over gloo, p2p_timeout {args.p2p_timeout:g} s; seconds from SIGKILL to the "
          "survivor's exception:")
    for survivor in (0, 1):
        times = [s for _, sv, s, _ in outcomes if sv == survivor]
        if times:
            closed = sum("closed the connection" in m for _, sv, _, m in outcomes if sv == survivor)
            print(f"  survivor stage {survivor}: {len(times)} trials, median {statistics.median(times):.3f} s, "
                  f"worst {max(times):.3f} s, {closed} named the closed connection")


if __name__ == "__main__":
    main()
