"""Every schedule the engine runs, compute-bound, against the simulator.

Two processes over gloo (2 pipeline stages), each pinned to its own core and
one thread; 8 Linear(768, 768) layers + Tanh, 8 micro-batches of 64. The same
layers (per-layer seeds) run under DeepSpeed's 1F1B and under our 1f1b,
gpipe, zb-h1, interleaved-1f1b (two chunks per rank) and zb-v (two chunks per
rank in a V), alternating repetitions; medians of the slower rank.

Each schedule's prediction is the simulator's makespan from costs measured in
the same processes: every chunk's forward, full backward, input backward (B)
and weight backward (W) timed alone on its own layers (summed over a rank's
chunks, the slower rank's), and the one-way time of one activation between
the two ranks over gloo (the simulator's send_latency; a hand-over inside a
rank costs nothing). Memory: the most micro-batches a rank holds between a
forward and its last backward pass, in whole-stage activations (a chunk holds
half a stage's), and the bytes of stage inputs, outputs and gradients the
executor held at its fullest.

    .venv/bin/python benchmarks/bench_schedules.py [--repeats 9]
"""
import argparse
import statistics
import time

from common import alternate, build_engine, pin_to_one_core, slowest_rank_medians

WIDTH, MICRO_BATCH, MICRO_BATCHES, LAYERS = 768, 64, 8, 8
SCHEDULES = {  # name -> (pipeline config, module keyword arguments)
    "1f1b": ({}, {}),
    "gpipe": ({"schedule": "gpipe"}, {}),
    "zb-h1": ({"schedule": "zb-h1"}, {}),
    "interleaved-1f1b": ({"schedule": "interleaved-1f1b"}, {"virtual_stages": 2}),
    "zb-v": ({"schedule": "zb-v"}, {"virtual_stages": 2, "virtual_layout": "v"}),
}


def layer_specs(spec):
    import torch.nn as nn
    layers = []
    for _ in range(LAYERS):
        layers += [spec(nn.Linear, WIDTH, WIDTH), nn.Tanh()]
    return layers


def chunk_costs(module, chunks, repeats=8):
    """Median seconds of (forward, full backward, input backward, weight
    backward) per chunk of this rank, summed over its chunks."""
    import torch
    from deepspeed_pipe_ext._native import _C
    totals = [0.0] * 4
    for chunk in range(chunks):
        run = (lambda x: module(x)) if chunks == 1 else (lambda x, c=chunk: module(x, chunk=c))
        samples = [[] for _ in range(4)]
        for _ in range(repeats):
            x = torch.randn(MICRO_BATCH, WIDTH, requires_grad=True)
            start = time.perf_counter()
            out = run(x)
            mid = time.perf_counter()
            out.backward(torch.ones_like(out))
            samples[0].append(mid - start)
            samples[1].append(time.perf_counter() - mid)
            out = run(x)
            start = time.perf_counter()
            deferred = _C.backward_input([out], [torch.ones_like(out)], [x])
            mid = time.perf_counter()
            deferred.run()
            samples[2].append(mid - start)
            samples[3].append(time.perf_counter() - mid)
        for i in range(4):
            totals[i] += statistics.median(samples[i])
    module.zero_grad(set_to_none=True)
    return totals


def one_way_transfer_seconds(rank, repeats=20):
    """Half the round trip of one activation between the two ranks over gloo."""
    import torch
    import torch.distributed as dist
    x = torch.randn(MICRO_BATCH, WIDTH)
    samples = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        if rank == 0:
            dist.send(x, 1)
            dist.recv(x, 1)
        else:
            dist.recv(x, 0)
            dist.send(x, 0)
        samples.append((time.perf_counter() - start) / 2)
    return statistics.median(samples)


def measure(rank, world_size, repeats):
    import torch
    import torch.distributed as dist
    import deepspeed
    from deepspeed.pipe import PipelineModule as DSPipelineModule
    import deepspeed_pipe_ext as dpe
    from deepspeed_pipe_ext import engine as dpe_engine
    from deepspeed_pipe_ext import schedule
    pin_to_one_core(rank)

    batch = (torch.randn(MICRO_BATCH, WIDTH), torch.randn(MICRO_BATCH, WIDTH))
    data = lambda: iter([batch] * MICRO_BATCHES)
    engines = {"deepspeed 1f1b": build_engine(DSPipelineModule, deepspeed.pipe.LayerSpec, deepspeed.initialize,
                                              layer_specs(deepspeed.pipe.LayerSpec), MICRO_BATCH, MICRO_BATCHES,
                                              seed_layers=True)}
    for name, (pipeline, kwargs) in SCHEDULES.items():
        engines[name] = build_engine(dpe.PipelineModule, dpe.LayerSpec, dpe_engine.initialize,
                                     layer_specs(dpe.LayerSpec), MICRO_BATCH, MICRO_BATCHES, pipeline=pipeline,
                                     seed_layers=True, **kwargs)
    times, warm = alternate({name: (lambda e=e: e.train_batch(data_iter=data()).item()) for name, e in engines.items()},
                            repeats, warmup=2)
    result = {"time": slowest_rank_medians(times), "first loss": {n: w[0] for n, w in warm.items()}}

    latency = torch.tensor([one_way_transfer_seconds(rank)])
    dist.all_reduce(latency, op=dist.ReduceOp.MAX)
    result["send latency"] = latency.item()
    result["predicted"], result["costs"], result["stage activations"], result["activation bytes"] = {}, {}, {}, {}
    for name, (pipeline, kwargs) in SCHEDULES.items():
        engine, chunks = engines[name], kwargs.get("virtual_stages", 1)
        mine = torch.tensor(chunk_costs(engine.module, chunks))
        gathered = [torch.zeros(4, dtype=mine.dtype) for _ in range(world_size)]
        dist.all_gather(gathered, mine)
        f, b, b_input, b_weight = torch.stack(gathered).max(dim=0).values.tolist()
        kind = pipeline.get("schedule", "1f1b")
        if kind in ("zb-h1", "zb-v"):  # split backward: B and W as measured
            costs = dict(forward=f, backward_input=b_input, backward_weight=b_weight)
        else:  # a full backward: the simulator charges backward_input + backward_weight
            costs = dict(forward=f, backward_input=b, backward_weight=0.0)
        result["predicted"][name] = schedule.simulate(kind, MICRO_BATCHES, 2, chunks, send_latency=latency.item(),
                                                      **costs)["makespan"]
        result["costs"][name] = (f, b, b_input, b_weight)
        usage = engine.last_buffer_usage
        live = torch.tensor([usage["peak_live_buffers"] / chunks, float(usage["peak_activation_bytes"])])
        every = [torch.zeros(2, dtype=live.dtype) for _ in range(world_size)]
        dist.all_gather(every, live)
        result["stage activations"][name] = [e[0].item() for e in every]
        result["activation bytes"][name] = [e[1].item() for e in every]
    return result


def main():
    from distributed import run_ranks
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    result = run_ranks(measure, 2, args.repeats, timeout=1800)[0]
    t, predicted = result["time"], result["predicted"]
    ds, one = t["deepspeed 1f1b"], t["1f1b"]
    f, b, b_input, b_weight = result["costs"]["1f1b"]
    print(f"train_batch, compute-bound: 2 stages on 2 processes (gloo, 1 core and 1 thread each), {LAYERS} "
          f"Linear({WIDTH}, {WIDTH}) + Tanh, {MICRO_BATCHES} micro-batches of {MICRO_BATCH}, median of "
          f"{args.repeats}")
    print(f"measured per stage: F {f * 1e3:.2f} ms, B+W {b * 1e3:.2f} ms, B {b_input * 1e3:.2f} ms, "
          f"W {b_weight * 1e3:.2f} ms; one activation between the ranks {result['send latency'] * 1e3:.2f} ms")
    print(f"DeepSpeed 1F1B: {ds * 1e3:.1f} ms (first loss {result['first loss']['deepspeed 1f1b']:.6f})")
    print("| schedule | step | vs DeepSpeed | simulator | measured / predicted | vs our 1f1b (predicted) | "
          "peak activations per stage, whole-stage units (vs 1f1b) | peak held bytes per stage |")
    print("|---|---:|---:|---:|---:|---:|---|---|")
    base_act = result["stage activations"]["1f1b"]
    for name in SCHEDULES:
        acts = result["stage activations"][name]
        ratio = " / ".join(f"{a:g} ({a / base:.2f}x)" for a, base in zip(acts, base_act))
        held = " / ".join(f"{x / 2**20:.1f} MiB" for x in result["activation bytes"][name])
        print(f"| {name} | {t[name] * 1e3:.1f} ms | {ds / t[name]:.2f}x | {predicted[name] * 1e3:.1f} ms | "
              f"{t[name] / predicted[name]:.3f} | {t[name] / one:.3f} ({predicted[name] / predicted['1f1b']:.3f}) | "
              f"{ratio} | {held} |")
    losses = result["first loss"]
    same = all(abs(losses[n] - losses["deepspeed 1f1b"]) <= 1e-5 * abs(losses["deepspeed 1f1b"]) for n in SCHEDULES)
    print(f"first-step losses {'equal' if same else 'DIFFER'} across the engines and schedules")


if __name__ == "__main__":
    main()
