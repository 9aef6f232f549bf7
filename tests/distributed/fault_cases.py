"""Fault injection, run on every rank by test_faults.py: S=2 and
PP=2 x DP=2 pipelines over gloo where one rank (the victim, chosen by stage
and data-parallel rank) fails in a callback, runs out of data, stops calling
train_batch, stalls in its optimizer step, or is killed. Each rank reports
what it raised, how long after the fault, whether its weights moved, and
what the next train_batch said."""
import os
import random
import signal
import threading
import time

import torch
import torch.nn as nn

import deepspeed_pipe_ext as dpe
from deepspeed_pipe_ext import engine as dpe_engine

MICRO_BATCHES = 4


class Boom(nn.Module):
    """Passes its input on; raises on the `fail_on`-th forward once armed."""

    def __init__(self):
        super().__init__()
        self.fail_on = None
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.fail_on is not None and self.calls == self.fail_on:
            raise ValueError(f"boom in forward call {self.calls}")
        return x


class BoomLoss:
    """MSE; raises on the `fail_on`-th call once armed."""

    def __init__(self):
        self.fail_on = None
        self.calls = 0

    def __call__(self, outputs, labels):
        self.calls += 1
        if self.fail_on is not None and self.calls == self.fail_on:
            raise ValueError(f"boom in loss call {self.calls}")
        return nn.functional.mse_loss(outputs, labels)


class FailingData:
    """Yields `good` micro-batches, then raises `error` (a StopIteration
    when it runs out, or any other error as a broken data source would)."""

    def __init__(self, batches, good, error):
        self.batches, self.good, self.error = iter(batches), good, error

    def __iter__(self):
        return self

    def __next__(self):
        if self.good == 0:
            raise self.error
        self.good -= 1
        return next(self.batches)


def data(seed, count=MICRO_BATCHES):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 8, generator=g), torch.randn(2, 4, generator=g)) for _ in range(count)]


def build(world_size, p2p_timeout, zb_v=False):
    """Two stages; with zb_v, two chunks per rank in a V (Boom on stage 1's
    first chunk, the loss on stage 0) and dynamic shapes, so receives take
    their meta first."""
    torch.manual_seed(5)
    boom, loss = Boom(), BoomLoss()
    virtual = {"virtual_stages": 2, "virtual_layout": "v", "dynamic_shape": True} if zb_v else {}
    net = dpe.PipelineModule(layers=[nn.Linear(8, 8), boom, nn.Linear(8, 8), nn.Linear(8, 4)], num_stages=2,
                             loss_fn=loss, partition_method="uniform", **virtual)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": MICRO_BATCHES,
              "train_batch_size": 2 * MICRO_BATCHES * (world_size // 2), "steps_per_print": 10**9,
              "pipeline": {"p2p_timeout": p2p_timeout, **({"schedule": "zb-v"} if zb_v else {})}}
    engine, _, _, _ = dpe_engine.initialize(model=net, config=config, model_parameters=net.parameters(),
                                            optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
    return engine, net, boom, loss


def _error(err):
    return type(err).__name__, str(err), list(getattr(err, "__notes__", []))


def _is_victim(engine, victim):
    return (engine.stage_id, engine.grid.get_data_parallel_rank()) == victim


def _until_told(board, seconds=30):
    """Waits until another rank's failure reached this rank's board (even one
    it holds for its next batch); returns whether it did."""
    deadline = time.monotonic() + seconds
    while board.remote is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return board.remote is not None


def _hold_back_until_told(engine):
    """Makes this rank finish its next batch only once another rank's failure
    in the batch after has reached it: the failing replica ran ahead while this
    one still reduced its loss. Returns a list that gets whether it arrived."""
    aggregate, told = engine._aggregate_total_loss, []

    def held_back():
        told.append(_until_told(engine._guard.board))
        engine._aggregate_total_loss = aggregate
        return aggregate()

    engine._aggregate_total_loss = held_back
    return told


def callback_failures(rank, world_size, victims, zb_v=False, hold_back=None):
    """Each case: one good batch, then a batch that fails on the victim
    only; every rank records the error, the seconds from the start of that
    batch, whether its weights moved, and what the next batch says. The rank
    at `hold_back` (stage, data-parallel rank), in another replica than the
    victim, ends its good batch only after the victim's failure reached it."""
    out = {}
    for case, victim in victims.items():
        engine, net, boom, loss = build(world_size, p2p_timeout=30, zb_v=zb_v)
        told = _hold_back_until_told(engine) if hold_back is not None and _is_victim(engine, hold_back) else None
        engine.train_batch(data_iter=iter(data(1)))
        before = [p.detach().clone() for p in net.parameters()]
        batches = iter(data(2))
        mine = _is_victim(engine, victim)
        if mine and told is not None:
            raise AssertionError(f"case {case}: the victim {victim} cannot be held back")
        if mine and case == "forward":
            boom.fail_on = boom.calls + 3  # the third micro-batch's forward
        if mine and case == "loss":
            loss.fail_on = loss.calls + 2
        if mine and case == "load":
            batches = FailingData(data(2), 2, OSError("the data source went away"))
        if mine and case == "exhausted":
            batches = FailingData(data(2), 3, StopIteration())
        if mine and case == "batch_fn":
            calls = []

            def batch_fn(batch):
                calls.append(1)
                if len(calls) == 2:
                    raise KeyError("no such field in the batch")
                return batch

            engine.set_batch_fn(batch_fn)
        start = time.monotonic()
        result = {"victim": mine, "held_back_until_told": None if told is None else told == [True]}
        try:
            engine.train_batch(data_iter=batches)
            result["error"] = None
        except BaseException as err:
            result["error"] = _error(err)
        result["seconds"] = time.monotonic() - start
        result["weights_unchanged"] = all(torch.equal(a, p) for a, p in zip(before, net.parameters()))
        try:
            engine.train_batch(data_iter=iter(data(3)))
            result["next"] = None
        except BaseException as err:
            result["next"] = _error(err)
        out[case] = result
    return out


def failures_in_two_batches(rank, world_size):
    """PP=2 x DP=2. Replica 1 finishes its first batch and fails in a forward
    of its second (global rank 1). Global rank 2, replica 0's last stage, has
    stepped on the first batch when that failure reaches it, and fails itself
    before it broadcasts its loss to global rank 0, which waits for it: rank 0
    must stop at once, naming rank 2, not wait out p2p_timeout. Each rank
    reports its two batches' errors and the wall-clock time each ended."""
    engine, _, boom, _ = build(world_size, p2p_timeout=30)
    board = engine._guard.board
    where = (engine.stage_id, engine.grid.get_data_parallel_rank())
    if where == (1, 0):
        bounded = engine._losses.bounded

        def fail_before_the_loss_broadcast(work, what, group):
            bounded(work, what, group)  # the loss all-reduce with replica 1, which then goes on to its next batch
            told = _until_told(board)
            raise ValueError(f"global rank 2 failed before its loss broadcast (the other failure arrived: {told})")

        engine._losses.bounded = fail_before_the_loss_broadcast
    out = []
    for batch in range(2):
        if batch == 1 and where == (0, 1):
            boom.fail_on = boom.calls + 3
        try:
            engine.train_batch(data_iter=iter(data(batch)))
            out.append({"error": None})
        except BaseException as err:
            out.append({"error": _error(err)})
        out[-1]["ended_at"] = time.time()
    return out


def _train_until_error(engine, limit):
    for _ in range(limit):
        try:
            engine.train_batch(data_iter=iter(data(4)))
        except BaseException as err:
            return _error(err)
    return None


def stops_and_stalls(rank, world_size, victim, p2p_timeout):
    """The victim stops calling train_batch after one batch ("stops"), or
    stalls in its optimizer step for longer than p2p_timeout ("stalls");
    every other rank keeps calling train_batch until one raises."""
    out = {}
    for case in ("stops", "stalls"):
        engine, net, _, _ = build(world_size, p2p_timeout=p2p_timeout)
        engine.train_batch(data_iter=iter(data(1)))
        mine = _is_victim(engine, victim)
        start = time.monotonic()
        if mine and case == "stops":
            time.sleep(p2p_timeout + 3)  # alive, but never calls train_batch again
            out[case] = {"victim": True}
            continue
        if mine:
            step = engine._take_model_step

            def stalled(*args, **kwargs):
                time.sleep(p2p_timeout + 3)
                return step(*args, **kwargs)

            engine._take_model_step = stalled
        error = _train_until_error(engine, limit=50)
        out[case] = {"victim": mine, "error": error, "seconds": time.monotonic() - start}
    return out


def killed(rank, world_size, victim, p2p_timeout, seed, stamp_path):
    """The victim SIGKILLs itself at a random moment while every rank trains;
    survivors train until they raise and report the seconds since the kill."""
    engine, _, _, _ = build(world_size, p2p_timeout=p2p_timeout)
    engine.train_batch(data_iter=iter(data(1)))
    if _is_victim(engine, victim):
        delay = random.Random(seed).uniform(0.0, 0.3)

        def kill():
            with open(stamp_path, "w") as f:
                f.write(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Timer(delay, kill).start()
        while True:
            engine.train_batch(data_iter=iter(data(4)))
    error = _train_until_error(engine, limit=10**6)
    raised_at = time.time()
    with open(stamp_path) as f:
        killed_at = float(f.read())
    return {"error": error, "seconds": raised_at - killed_at}


def missing_data(rank, world_size, p2p_timeout=30):
    """S = world_size stages; only the first stage is given no data: every
    rank's error and how long it took."""
    torch.manual_seed(5)
    net = dpe.PipelineModule(layers=[nn.Linear(8, 8) for _ in range(world_size)] + [nn.Linear(8, 4)],
                             num_stages=world_size, loss_fn=nn.MSELoss(), partition_method="uniform")
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": MICRO_BATCHES,
              "steps_per_print": 10**9, "pipeline": {"p2p_timeout": p2p_timeout}}
    engine, _, _, _ = dpe_engine.initialize(model=net, config=config, model_parameters=net.parameters(),
                                            optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
    start = time.monotonic()
    try:
        engine.train_batch(data_iter=None if rank == 0 else iter(data(1)))
        error = None
    except BaseException as err:
        error = _error(err)
    return {"error": error, "seconds": time.monotonic() - start}


class SlowToBuild(nn.Linear):
    """A layer whose construction takes up to `seconds`: it waits for the
    marker the other rank writes once its first batch has failed (without the
    construction agreement that rank could fail, and exit, while this one is
    still building)."""

    def __init__(self, marker, seconds):
        super().__init__(8, 8)
        deadline = time.monotonic() + seconds
        while not os.path.exists(marker) and time.monotonic() < deadline:
            time.sleep(0.05)


def fails_before_peers_are_ready(rank, world_size, marker, p2p_timeout):
    """Stage 0's first forward fails at once and its process exits (taking
    the rendezvous store it hosts); stage 1 is slow to build its layers. Stage
    1 reports what it raised and how long its build and first batch took."""
    torch.manual_seed(5)
    boom = Boom()
    boom.fail_on = 1
    net = dpe.PipelineModule(layers=[dpe.LayerSpec(nn.Linear, 8, 8), boom, dpe.LayerSpec(SlowToBuild, marker, 3.0),
                                     dpe.LayerSpec(nn.Linear, 8, 4)],
                             num_stages=2, loss_fn=nn.MSELoss(), partition_method="uniform")
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": MICRO_BATCHES,
              "steps_per_print": 10**9, "pipeline": {"p2p_timeout": p2p_timeout}}
    start = time.monotonic()
    try:
        engine, _, _, _ = dpe_engine.initialize(model=net, config=config, model_parameters=net.parameters(),
                                                optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
        engine.train_batch(data_iter=iter(data(1)))
        error = None
    except BaseException as err:
        error = _error(err)
    if rank == 0:  # as a script does on an exception: the process ends
        with open(marker, "w") as f:
            f.write(repr(error))
        os._exit(1)
    return {"error": error, "seconds": time.monotonic() - start}


def gone_before_building(rank, world_size, gone, p2p_timeout):
    """Rank `gone` builds its module, then its process ends before it builds
    its engine; the other rank builds its engine and reports what it raised
    and how long deepspeed.initialize took."""
    torch.manual_seed(5)
    net = dpe.PipelineModule(layers=[nn.Linear(8, 8), nn.Linear(8, 4)], num_stages=2, loss_fn=nn.MSELoss(),
                             partition_method="uniform")
    # The module's groups are built collectively: the other rank must have its module before this one goes.
    torch.distributed.barrier()
    if rank == gone:
        os._exit(1)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": MICRO_BATCHES,
              "steps_per_print": 10**9, "pipeline": {"p2p_timeout": p2p_timeout}}
    start = time.monotonic()
    try:
        dpe_engine.initialize(model=net, config=config, model_parameters=net.parameters(),
                              optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
        error = None
    except BaseException as err:
        error = _error(err)
    return {"error": error, "seconds": time.monotonic() - start}
