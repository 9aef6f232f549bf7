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
from typing import Callable, NamedTuple


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


def run_ranks(fn, world_size, *args, timeout=240, allow_exit=frozenset(), watchdog=None):
    """fn(rank, world_size, *args) on every rank; returns the results by rank
    (None for ranks in `allow_exit`, which may exit without one). `watchdog()`,
    if given, is called about every second while waiting and may raise
    (tighter deadlines than `timeout`)."""
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
            if watchdog is not None:
                watchdog()
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


# --- Many tests' cases in one process group ----------------------------------------------------------------------
#
# A test marked with `shared_ranks` names its cases: a per-rank function with its arguments and world size
# (`on_ranks`). The `shared_results` fixture (conftest.py) runs the cases of every selected test of the module that
# need the same world size together, in one run_ranks call (`run_cases` on each rank), the first time one of those
# tests asks, and gives each test its own cases' per-rank results: the same function, arguments and world size as a
# run_ranks call of its own, one process start instead of many. Tests about failures (kills, stalls, aborted batches)
# keep run_ranks calls of their own: a case must leave the process group as it found it.


class Case(NamedTuple):
    world_size: int
    fn: Callable
    args: tuple
    timeout: float


def on_ranks(fn, world_size, *args, timeout=240):
    """fn(rank, world_size, *args) on every rank, as run_ranks(fn, world_size, *args, timeout=timeout) would run it,
    but in a process group shared with other tests' cases; `timeout` bounds this case alone."""
    return Case(world_size, fn, args, timeout)


def shared_ranks(cases):
    """Marks a test that takes the `shared_results` fixture: cases(**params) (params: the test's parameters the function
    names, and `tmp_path`, a fresh folder, if it names one) gives its `on_ranks(...)` or a dict of them by label; the
    fixture gives the case's per-rank results, or a dict of them by the same labels."""
    def mark(test):
        test.shared_cases = cases
        return test
    return mark


def _write_progress(folder, rank, text):
    with open(os.path.join(folder, f"rank{rank}.tmp"), "w") as f:
        f.write(text)
    os.replace(os.path.join(folder, f"rank{rank}.tmp"), os.path.join(folder, f"rank{rank}"))


def _read_progress(folder, rank):
    """(what the rank is doing, since when by time.time()), or (None, None) before its first case."""
    path = os.path.join(folder, f"rank{rank}")
    try:
        with open(path) as f:
            return f.read(), os.path.getmtime(path)
    except OSError:
        return None, None


def run_cases(rank, world_size, progress, cases):
    """On each rank: every (name, fn, args, timeout) of `cases` in turn in this one process group; the results by
    name. A case that raises or runs past its timeout ends the rank (so the other ranks stop instead of running on
    out of step): its name is in the error, and in `progress`/rank<rank> for run_shared_cases to report."""
    import faulthandler
    import gc
    gc.freeze()  # what the imports made stays: the collections below look at what the cases made
    out = {}
    for name, fn, args, timeout in cases:
        _write_progress(progress, rank, f"running {name}")
        faulthandler.dump_traceback_later(timeout, exit=True)  # C-level: fires even if a wait holds the GIL
        try:
            out[name] = fn(rank, world_size, *args)
        except BaseException as err:
            raise RuntimeError(f"rank {rank}: case {name} failed: {type(err).__name__}: {err}") from err
        finally:
            faulthandler.cancel_dump_traceback_later()
        # The case's engines go now, as they would with its processes: their failure watchers stop and their
        # connections to the rendezvous store close before the next case starts.
        gc.collect()
    _write_progress(progress, rank, "done")
    return out


class SharedRunFailed(AssertionError):
    """A run of shared cases that ended without results; `running`: the cases its ranks were in."""

    def __init__(self, message, running):
        super().__init__(message)
        self.running = running


def run_shared_cases(cases):
    """cases: {name: Case}, one world size: all of them in one run_ranks call. Returns {name: per-rank results};
    raises SharedRunFailed naming the case each rank was in."""
    import shutil
    import tempfile
    (world_size, ) = {c.world_size for c in cases.values()}
    progress = tempfile.mkdtemp(prefix="shared_ranks_")
    started = time.time()

    def watchdog():
        """The parent's own deadlines (each rank's faulthandler should end a case first): run_ranks' default 240 s
        to start the first case, and each case's timeout (plus a margin for the rank to report it)."""
        for rank in range(world_size):
            state, since = _read_progress(progress, rank)
            if state is None and time.time() - started > 240:
                raise TimeoutError(f"rank {rank} did not start its first case within 240 s")
            if state is not None and state.startswith("running "):
                name = state[len("running "):]
                if time.time() - since > cases[name].timeout + 30:
                    raise TimeoutError(f"rank {rank} ran case {name} past its timeout ({cases[name].timeout} s)")

    try:
        per_rank = run_ranks(run_cases, world_size, progress,
                             [(name, c.fn, c.args, c.timeout) for name, c in cases.items()],
                             timeout=240 + sum(c.timeout for c in cases.values()), watchdog=watchdog)
    except Exception as err:
        where, running = [], set()
        for rank in range(world_size):
            state, since = _read_progress(progress, rank)
            if state is None:
                state = "no case started"
            if state.startswith("running "):
                running.add(state[len("running "):])
                state += (f" for {time.time() - since:.0f} s (its timeout: {cases[state[len('running '):]].timeout} s;"
                          " past it, the rank's stderr holds its stack)")
            where.append(f"rank {rank}: {state}")
        raise SharedRunFailed(f"{len(cases)} cases sharing {world_size} ranks; where each rank stood:\n  "
                              + "\n  ".join(where) + f"\n{type(err).__name__}: {err}", running) from None
    finally:
        shutil.rmtree(progress, ignore_errors=True)
    return {name: [results[name] for results in per_rank] for name in cases}


class SharedRuns:
    """The cases of the `items` (one module's selected tests) marked with shared_ranks, run a world size at a time
    on first use; `make_dir()` gives a fresh folder to cases that name `tmp_path`."""

    def __init__(self, items, make_dir):
        import inspect
        self._declared, self._cases = {}, {}  # nodeid -> Case or {label: Case}; case name -> Case
        for item in items:
            declare = getattr(getattr(item, "function", None), "shared_cases", None)
            if declare is None:
                continue
            wanted = inspect.signature(declare).parameters
            params = getattr(getattr(item, "callspec", None), "params", {})
            kwargs = {k: v for k, v in params.items() if k in wanted}
            if "tmp_path" in wanted:
                kwargs["tmp_path"] = make_dir()
            declared = declare(**kwargs)
            self._declared[item.nodeid] = declared
            for name, c in self._named(item.nodeid, declared):
                self._cases[name] = c
        self._done = {}  # world size -> {case name: per-rank results} or the exception

    @staticmethod
    def _named(nodeid, declared):
        if isinstance(declared, Case):
            return [(nodeid, declared)]
        return [(f"{nodeid} {label}", c) for label, c in declared.items()]

    def results_for(self, nodeid):
        declared = self._declared[nodeid]
        results = {}
        for name, c in self._named(nodeid, declared):
            if c.world_size not in self._done:
                try:
                    self._done[c.world_size] = run_shared_cases(
                        {n: other for n, other in self._cases.items() if other.world_size == c.world_size})
                except SharedRunFailed as err:
                    self._done[c.world_size] = err
            done = self._done[c.world_size]
            if isinstance(done, SharedRunFailed):
                if done.running and name not in done.running:  # the error itself is shown by the failed case
                    raise AssertionError(f"case {name}: no results: it shared its ranks with {sorted(done.running)}, "
                                         "which failed and ended them")
                raise AssertionError(f"case {name} failed (a failing or timed-out case ends its ranks, and the "
                                     f"cases sharing them fail with it): {done}")
            results[name] = done[name]
        if isinstance(declared, Case):
            return results[nodeid]
        return {label: results[f"{nodeid} {label}"] for label in declared}
