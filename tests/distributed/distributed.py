"""Runs a function on N real processes joined by a gloo process group.

Every test that needs torch.distributed goes through `run_ranks`: free port
per call, OMP_NUM_THREADS=1, and a hard timeout so a hang fails the test
instead of blocking CI. Put many checks in one call: starting processes that
import torch and deepspeed is the expensive part on a 2-core machine.
"""
import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, port, results, args):
    os.environ.update({
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "OMP_NUM_THREADS": "1",
    })
    try:
        import torch
        torch.set_num_threads(1)
        import deepspeed
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
        out = fn(rank, world_size, *args)
    except BaseException:  # report everything, including assertion errors
        results.put((rank, "error", traceback.format_exc()))
        return
    # Plain pickle: torch's queue reducers would share tensors through file
    # descriptors that die with this process.
    results.put((rank, "ok", pickle.dumps(out)))
    try:  # best effort: a test may have broken the group on purpose (timeouts)
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        pass


def run_ranks(fn, world_size, *args, timeout=240, allow_exit=frozenset()):
    """fn(rank, world_size, *args) on every rank; returns the results by rank
    (None for ranks in `allow_exit`, which may exit without one)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, results, args), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    outcome = {}
    expected = set(range(world_size)) - set(allow_exit)
    deadline = time.monotonic() + timeout
    try:
        while not expected <= set(outcome):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(expected - set(outcome))
                raise TimeoutError(f"ranks {missing} did not finish within {timeout}s")
            try:
                rank, status, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in outcome and r in expected]
                if dead and results.empty():
                    time.sleep(0.5)
                    if results.empty():
                        raise RuntimeError(f"ranks {dead} exited without a result "
                                           f"(exit codes {[procs[r].exitcode for r in dead]})")
                continue
            outcome[rank] = (status, value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    errors = {r: v for r, (s, v) in outcome.items() if s == "error"}
    if errors:
        raise AssertionError("\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())))
    return [pickle.loads(outcome[r][1]) if r in outcome else None for r in range(world_size)]
