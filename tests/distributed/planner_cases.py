"""Per-rank cases of the planner on real processes (tests/distributed/test_planner.py)."""
import deepspeed
import torch
import torch.nn as nn
from deepspeed.pipe import PipelineModule as DSPipelineModule

import deepspeed_pipe_ext as dpe

from .engine_cases import batches, deep_mlp_specs

MICRO_BATCHES, STEPS = 4, 6


def _config(pipeline):
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": MICRO_BATCHES,
            "steps_per_print": 10**9, "pipeline": pipeline}


def _train(net, pipeline, seed=3):
    engine, _, _, _ = deepspeed.initialize(model=net, config=_config(pipeline), model_parameters=net.parameters(),
                                           optimizer=torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9))
    data = batches(100 + engine.grid.data_parallel_id, MICRO_BATCHES)
    losses = [engine.train_batch(data_iter=iter(data)).item() for _ in range(STEPS)]
    return engine, losses


def planned_training_matches_deepspeed(rank, world_size, tight):
    """Plans the deep MLP (uncapped, or capped at the leanest candidate's
    peak so the pick must save memory), trains the planned module with
    "schedule": "auto" and DeepSpeed's 1F1B on the same seeded layers."""
    sample = batches(7, 1)[0]
    free = dpe.plan(deep_mlp_specs(dpe.LayerSpec), 2, MICRO_BATCHES, sample, loss_fn=nn.MSELoss(), repeats=1,
                    refuse=False)
    cap = None
    if tight:
        available = [c for c in free.candidates if not c.unavailable]
        cap = max(min(available, key=lambda c: max(c.peak_bytes)).peak_bytes)
    torch.manual_seed(3)
    theirs = DSPipelineModule(layers=deep_mlp_specs(deepspeed.pipe.LayerSpec), num_stages=2, loss_fn=nn.MSELoss(),
                              seed_layers=True, partition_method="uniform")
    _, their_losses = _train(theirs, {})
    torch.manual_seed(3)
    planner = {"micro_batches": MICRO_BATCHES, "repeats": 1, "memory_per_rank": cap}
    ours = dpe.PipelineModule(layers=deep_mlp_specs(dpe.LayerSpec), num_stages=2, loss_fn=nn.MSELoss(),
                              seed_layers=True, partition_method="auto", profile_inputs=sample, planner=planner)
    pipeline = {"schedule": "auto"} if cap is None else {"schedule": "auto", "memory_per_rank": cap}
    engine, our_losses = _train(ours, pipeline)
    best = ours.plan.best
    return {"theirs": their_losses, "ours": our_losses, "pick": (best.schedule, best.chunks, best.checkpoint_interval),
            "engine": (engine.schedule_kind, ours.virtual_stages, ours.activation_checkpoint_interval),
            "parts": (best.parts, list(ours.parts)), "fits": best.fits, "peak": max(best.peak_bytes), "cap": cap,
            "free_pick": free.best.name if free.best else None}


def auto_misuse(rank, world_size):
    """What "auto" refuses, each message caught."""
    sample = batches(7, 1)[0]
    out = {}

    def attempt(name, fn):
        try:
            fn()
            out[name] = "no error"
        except (ValueError, TypeError) as err:
            out[name] = str(err)

    plain = lambda: dpe.PipelineModule(layers=deep_mlp_specs(dpe.LayerSpec), num_stages=2,  # noqa: E731
                                       loss_fn=nn.MSELoss(), partition_method="uniform")
    auto = lambda **planner: dpe.PipelineModule(  # noqa: E731
        layers=deep_mlp_specs(dpe.LayerSpec), num_stages=2, loss_fn=nn.MSELoss(), partition_method="auto",
        profile_inputs=sample, planner={"repeats": 1, **planner})
    attempt("schedule_auto_without_plan", lambda: _train(plain(), {"schedule": "auto"}))
    attempt("no_sample", lambda: dpe.PipelineModule(layers=deep_mlp_specs(dpe.LayerSpec), num_stages=2,
                                                     loss_fn=nn.MSELoss(), partition_method="auto",
                                                     planner={"micro_batches": 4}))
    attempt("no_micro_batches", lambda: auto())
    attempt("other_micro_batches", lambda: _train(auto(micro_batches=8), {"schedule": "auto"}))
    attempt("other_cap", lambda: _train(auto(micro_batches=MICRO_BATCHES, memory_per_rank="1GiB"),
                                        {"schedule": "auto", "memory_per_rank": "2GiB"}))
    attempt("cannot_fit", lambda: auto(micro_batches=MICRO_BATCHES, memory_per_rank=1000))
    attempt("planner_without_auto", lambda: dpe.PipelineModule(layers=deep_mlp_specs(dpe.LayerSpec), num_stages=2,
                                                               planner={"micro_batches": 4}))
    return out
