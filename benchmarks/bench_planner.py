"""The planner against exhaustive measurement: for each model, plan, then run
every candidate that fits the cap (and DeepSpeed's default, its own engine
with 1F1B on the 'parameters' partition) for a few steps, alternating, and
compare what the planner predicted and picked with what was measured.

Two processes over gloo (2 pipeline stages), each pinned to one core and one
thread; 8 micro-batches; SGD. Time: median of the slower rank's train_batch.
Memory, in a second pair of processes planning from the same profile: each
rank's peak resident memory during one train_batch above where it started
(see bench_activation_checkpointing.peak_memory; glibc's mmap threshold fixed
at 64 KiB, which slows allocation, hence the separate run), against the
planner's prediction of the same: what it predicts the rank holds at its
fullest, less the layers' state that exists before the step, plus the
gradients the step allocates.

    .venv/bin/python benchmarks/bench_planner.py [--repeats 5] [--models mlp,tight,embedding,wide]
    .venv/bin/python benchmarks/bench_planner.py --search   # the search alone, 128 layers on 16 stages
"""
import argparse
import os
import statistics

from bench_activation_checkpointing import peak_memory
from common import alternate, pin_to_one_core, slowest_rank_medians

MICRO_BATCHES = 8


def mlp(nn, spec, width=512, blocks=8):
    layers = []
    for _ in range(blocks):
        layers += [spec(nn.Linear, width, width), nn.Tanh()]
    return layers


def models(torch, nn):
    """name -> (layer builder over a LayerSpec class, sample micro-batch, cap: None, a byte count, or a
    function of the uncapped plan)."""
    g = torch.Generator().manual_seed(0)
    dense = (torch.randn(64, 512, generator=g), torch.randn(64, 512, generator=g))
    wide = (torch.randn(16, 2048, generator=g), torch.randn(16, 2048, generator=g))
    tokens = (torch.randint(0, 32000, (64, 8), generator=g), torch.randn(64, 8, 256, generator=g))

    def between_leanest_and_1f1b(plan):
        one = next(c for c in plan.candidates if c.schedule == "1f1b" and c.checkpoint_interval == 0)
        leanest = min((c for c in plan.candidates if not c.unavailable), key=lambda c: max(c.peak_bytes))
        return (max(one.peak_bytes) + max(leanest.peak_bytes)) / 2

    def embedding(spec):
        layers = [spec(nn.Embedding, 32000, 256)]
        for _ in range(6):
            layers += [spec(nn.Linear, 256, 256), nn.GELU()]
        return layers

    def embedding_cap(plan):
        """Halfway between 1f1b's rank 0 on its time-balanced partition and on
        the embedding alone: rank 0 must shed layers to fit."""
        from deepspeed_pipe_ext._native import _C
        one = next(c for c in plan.candidates if c.schedule == "1f1b" and c.checkpoint_interval == 0)
        request = plan.profile.to_request()
        request.stages, request.micro_batches = 2, [MICRO_BATCHES]
        alone = _C.evaluate_candidate(request, "1f1b", 1, 0, MICRO_BATCHES, [0, 1, len(plan.profile.layers)])
        return (one.peak_bytes[0] + alone.peak_bytes[0]) / 2

    return {
        "mlp": (lambda spec: mlp(nn, spec), dense, None),
        "tight": (lambda spec: mlp(nn, spec), dense, between_leanest_and_1f1b),
        "embedding": (embedding, tokens, embedding_cap),
        "wide": (lambda spec: [spec(nn.Linear, 2048, 2048) for _ in range(4)], wide, None),
    }


def measure(rank, world_size, name, repeats, cost_profile=None):
    """With no cost_profile: profiles, plans and times every candidate. With
    one (the first run's): the same plan, each candidate's peak memory."""
    import deepspeed
    import torch
    import torch.nn as nn
    from deepspeed.pipe import PipelineModule as DSPipelineModule

    import deepspeed_pipe_ext as dpe
    from deepspeed_pipe_ext import engine as dpe_engine
    pin_to_one_core(rank)
    build_layers, sample, cap = models(torch, nn)[name]
    loss_fn = nn.MSELoss()
    free = dpe.plan(build_layers(dpe.LayerSpec), 2, MICRO_BATCHES, sample, loss_fn=loss_fn, repeats=5, refuse=False,
                    cost_profile=cost_profile)
    limit = cap(free) if callable(cap) else cap
    plan = dpe.plan(build_layers(dpe.LayerSpec), 2, MICRO_BATCHES, loss_fn=loss_fn, cost_profile=free.profile,
                    memory_per_rank=limit, refuse=False)
    data = lambda: iter([sample] * MICRO_BATCHES)  # noqa: E731
    config = lambda pipeline: {"train_micro_batch_size_per_gpu": sample[0].shape[0],  # noqa: E731
                               "gradient_accumulation_steps": MICRO_BATCHES, "steps_per_print": 10**9,
                               "pipeline": pipeline}

    def ours(c):
        torch.manual_seed(0)
        kwargs = {"virtual_stages": c.chunks, "virtual_layout": c.layout} if c.chunks > 1 else {}
        net = dpe.PipelineModule(layers=build_layers(dpe.LayerSpec), num_stages=2, loss_fn=loss_fn,
                                 partition_method=list(c.parts),
                                 activation_checkpoint_interval=c.checkpoint_interval, **kwargs)
        engine, _, _, _ = dpe_engine.initialize(model=net, config=config(c.config()),
                                                optimizer=torch.optim.SGD(net.parameters(), lr=1e-4),
                                                model_parameters=net.parameters())
        return engine

    def deepspeeds():
        torch.manual_seed(0)
        net = DSPipelineModule(layers=build_layers(deepspeed.pipe.LayerSpec), num_stages=2, loss_fn=loss_fn,
                               partition_method="parameters")
        engine, _, _, _ = deepspeed.initialize(model=net, config=config({}),
                                               optimizer=torch.optim.SGD(net.parameters(), lr=1e-4),
                                               model_parameters=net.parameters())
        return engine

    candidates = [c for c in plan.candidates if not c.unavailable and c.fits]
    engines = {c.name: ours(c) for c in candidates}
    engines["deepspeed default"] = deepspeeds()
    steps = {n: (lambda e=e: e.train_batch(data_iter=data()).item()) for n, e in engines.items()}
    if cost_profile is not None:
        for step in steps.values():
            step()  # the optimizer's state exists from the first step on
        import torch.distributed as dist
        gathered = [None] * world_size
        dist.all_gather_object(gathered, {n: peak_memory(step) for n, step in steps.items()})
        return gathered
    times, _ = alternate(steps, repeats, warmup=1)
    measured = slowest_rank_medians(times)
    grads = {c.name: _rank_parameter_bytes(plan, c, rank) for c in candidates}
    return {"plan": plan.describe(), "cap": limit, "best": plan.best.name if plan.best else None,
            "predicted": {c.name: c.step_time for c in candidates},
            "predicted default": plan.default.step_time if plan.default else None,
            "peak predicted": {c.name: _activation_peak(plan, c, rank) + grads[c.name] for c in candidates},
            "peak total": {c.name: c.peak_bytes[rank] for c in candidates},
            "measured": measured, "grads": grads, "runtime": plan.profile.runtime, "profile": free.profile}


def _rank_parts(plan, c, rank):
    from deepspeed_pipe_ext._native import _C
    return [_C.virtual_stage_of(rank, chunk, plan.num_stages, c.layout) for chunk in range(c.chunks)]


def _rank_parameter_bytes(plan, c, rank):
    return sum(layer.parameter_bytes for vs in _rank_parts(plan, c, rank)
               for layer in plan.profile.layers[c.parts[vs]:c.parts[vs + 1]])


def _activation_peak(plan, c, rank):
    state = sum(layer.state_bytes for vs in _rank_parts(plan, c, rank)
                for layer in plan.profile.layers[c.parts[vs]:c.parts[vs + 1]])
    return c.peak_bytes[rank] - state


def search_seconds(layers=128, stages=16, micro_batches=64):
    """How long the search takes on a synthetic profile (no measuring): every
    schedule and interval, a memory cap, median of 3."""
    import time

    from deepspeed_pipe_ext import planner
    profile = planner.CostProfile(
        layers=[planner.LayerProfile(name="Block", forward=1e-3 * (1 + (i % 7) / 10), backward_input=1e-3,
                                     backward_weight=1e-3, saved_bytes=2**20, output_bytes=2**18,
                                     parameter_bytes=2**22, state_bytes=2**24, has_parameters=True)
                for i in range(layers)], input_bytes=2**18)
    samples, plan = [], None
    for _ in range(3):
        start = time.perf_counter()
        plan = planner.plan(cost_profile=profile, num_stages=stages, micro_batches=micro_batches,
                            memory_per_rank="1GiB")
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), len(plan.candidates), plan.best.name


def main():
    from distributed import run_ranks
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", default="mlp,tight,embedding,wide")
    parser.add_argument("--search", action="store_true", help="only time the search at 128 layers, 16 stages")
    args = parser.parse_args()
    if args.search:
        seconds, count, best = search_seconds()
        print(f"search: 128 layers, 16 stages, 64 micro-batches, {count} candidates in {seconds:.2f} s "
              f"(one core); picked {best}")
        return
    rows = []
    for name in args.models.split(","):
        per_rank = run_ranks(measure, 2, name, args.repeats, timeout=3000)
        r0 = per_rank[0]
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)  # read by glibc as the ranks start: see peak_memory
        r0["memory"] = run_ranks(measure, 2, name, args.repeats, r0["profile"], timeout=3000)[0]
        del os.environ["MALLOC_MMAP_THRESHOLD_"]
        print(f"== {name}")
        print(r0["plan"])
        measured, predicted = r0["measured"], r0["predicted"]
        if not predicted:
            print("no candidate fits the cap: nothing to measure")
            continue
        ratios = [measured[n] / predicted[n] for n in predicted]
        print(f"runtime costs: {r0['runtime']}")
        print(f"{'candidate':52} {'predicted':>10} {'measured':>10} {'ratio':>6}  memory predicted / measured "
              "per rank (MiB)")
        for n in sorted(predicted, key=lambda n: measured[n]):
            mem = " | ".join(f"{r['peak predicted'][n] / 2**20:.1f} / {r0['memory'][i][n] / 2**20:.1f}"
                             for i, r in enumerate(per_rank))
            print(f"{n:52} {predicted[n] * 1e3:8.1f}ms {measured[n] * 1e3:8.1f}ms {measured[n] / predicted[n]:6.3f}"
                  f"  {mem}")
        best_measured = min(predicted, key=lambda n: measured[n])
        pick = r0["best"]
        print(f"default (DeepSpeed's engine, 1f1b, 'parameters'): measured {measured['deepspeed default'] * 1e3:.1f} "
              f"ms; ours predicted {r0['predicted default'] * 1e3 if r0['predicted default'] else float('nan'):.1f} ms")
        print(f"pick {pick}: {measured[pick] * 1e3:.1f} ms, best measured {best_measured}: "
              f"{measured[best_measured] * 1e3:.1f} ms ({measured[pick] / measured[best_measured]:.3f}x); "
              f"measured/predicted median {statistics.median(ratios):.3f}, range {min(ratios):.3f}-{max(ratios):.3f}")
        rows.append((name, pick, predicted[pick], measured[pick], best_measured, measured[best_measured],
                     measured["deepspeed default"], r0["cap"],
                     [(r["peak predicted"][pick], r0["memory"][i][pick]) for i, r in enumerate(per_rank)]))
    print("| model | cap per rank | plan picked | predicted | measured | best measured candidate | pick vs best | "
          "DeepSpeed default | vs default | memory predicted / measured, per rank |")
    print("|---|---:|---|---:|---:|---|---:|---:|---:|---|")
    for name, pick, pp, pm, best, bm, default, cap, mem in rows:
        capped = f"{cap / 2**20:.1f} MiB" if cap else "none"
        memory = " / ".join(f"{p / 2**20:.1f} / {m / 2**20:.1f} MiB" for p, m in mem)
        print(f"| {name} | {capped} | {pick} | {pp * 1e3:.1f} ms | {pm * 1e3:.1f} ms | {best} ({bm * 1e3:.1f} ms) | "
              f"{pm / bm:.3f} | {default * 1e3:.1f} ms | {default / pm:.2f}x | {memory} |")


if __name__ == "__main__":
    main()
