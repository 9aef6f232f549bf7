"""Run on every rank by test_nccl_order.py: DeepSpeed's engine, then ours
with every transfer on one tag (gloo then matches them in issue order, as NCCL
does) and P2P recording what it issues."""
import deepspeed
import torch
import torch.nn as nn
from deepspeed.pipe import PipelineModule as DSPipelineModule

import deepspeed_pipe_ext as dpe
from deepspeed_pipe_ext import engine as dpe_engine

from .engine_cases import batches, mlp_specs, transformer_specs


def varying_token_batches(seed, count, micro_batch=2):
    """Token batches whose sequence length changes from micro-batch to micro-batch."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        length = 3 + i % 3
        ids = torch.randint(0, 32, (micro_batch, length), generator=g)
        mask = torch.rand(micro_batch, length, generator=g) > 0.3
        mask[:, 0] = True
        out.append(((ids, mask), torch.randint(0, 3, (micro_batch, ), generator=g)))
    return out


def _run(module_cls, spec, make, num_stages, schedule, model, dynamic, record, steps=3, micro_batches=4):
    torch.manual_seed(5)
    kwargs = {"dynamic_shape": dynamic}
    if schedule in ("interleaved-1f1b", "zb-v"):  # two chunks per rank (ours); per-layer seeds for equal weights
        kwargs.update(seed_layers=True, partition_method="uniform")
        if module_cls is not DSPipelineModule:
            kwargs.update(virtual_stages=2, virtual_layout="v" if schedule == "zb-v" else "interleaved")
    if model == "mlp":
        net = module_cls(layers=mlp_specs(spec), num_stages=num_stages, loss_fn=nn.MSELoss(), **kwargs)
        data_for = lambda seed: batches(seed, micro_batches)
    else:
        kwargs.setdefault("partition_method", "uniform")
        net = module_cls(layers=transformer_specs(spec), num_stages=num_stages, loss_fn=nn.CrossEntropyLoss(),
                         **kwargs)
        data_for = lambda seed: varying_token_batches(seed, micro_batches)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": micro_batches,
              "steps_per_print": 10**9}
    if record:
        config["pipeline"] = {"schedule": schedule}
    engine, _, _, _ = make(model=net, config=config, optimizer=torch.optim.SGD(net.parameters(), lr=0.05),
                           model_parameters=net.parameters())
    if record and engine.p2p is not None:
        engine.p2p.set_single_tag(True)
        engine.p2p.set_recording(True)
    data = iter(data_for(100 + engine.grid.data_parallel_id) * steps)
    losses = [engine.train_batch(data_iter=data).item() for _ in range(steps)]
    evals = engine.eval_batch(iter(data_for(7)))
    if not record:
        return losses, evals.item()
    trace = list(engine.p2p.trace) if engine.p2p is not None else []
    program = engine._programs[(schedule, micro_batches)]
    return losses, evals.item(), trace, program.receives_after_meta, program.posted_receives


def recorded_traces(rank, world_size, num_stages, cases):
    """For each (schedule, model, dynamic_shape): DeepSpeed's losses, ours, and
    what our P2P issued, with this rank's stage and data-parallel index."""
    from deepspeed import initialize as ds_initialize
    out = []
    for schedule, model, dynamic in cases:
        theirs = _run(DSPipelineModule, deepspeed.pipe.LayerSpec, ds_initialize, num_stages, schedule, model, dynamic,
                      record=False)
        ours = _run(dpe.PipelineModule, dpe.LayerSpec, dpe_engine.initialize, num_stages, schedule, model, dynamic,
                    record=True)
        out.append({"theirs": theirs, "losses": ours[0], "eval": ours[1], "trace": ours[2], "after_meta": ours[3],
                    "posted": ours[4]})
    import torch.distributed as dist

    from deepspeed_pipe_ext.topology import PipeDataParallelTopology
    topo = PipeDataParallelTopology(num_pp=num_stages, num_dp=world_size // num_stages)
    coord = topo.get_coord(dist.get_rank())
    return {"stage": coord.pipe, "data": coord.data, "cases": out}
