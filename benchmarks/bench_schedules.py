"""Every schedule the engine runs, compute-bound, against the simulator.

Two processes over gloo (2 pipeline stages), each pinned to its own core and
one thread; 8 Linear(768, 768) layers + Tanh, 8 micro-batches of 64. The same
layers (per-layer seeds) run under DeepSpeed's 1F1B and under our 1f1b,
gpipe, zb-h1, interleaved-1f1b (two chunks per rank) and zb-v (two chunks per
rank in a V), alternating repetitions; medians of the slower rank.

Each schedule's prediction is the simulator's makespan from costs measured in
the same run: every chunk's forward, full backward, input backward (B) and
weight backward (W) on each rank as the executor timed them during the timed
steps (medians; the simulator takes each rank's and chunk's own), and the one-way
time of one activation between the two ranks over gloo (the simulator's
send_latency; a hand-over inside a rank costs nothing), plus the optimizer
step timed alone. What the measured step exceeds it by is the runtime's own
cost: transfers on the rank's one core, callbacks, bookkeeping. Memory: the most micro-batches a rank holds between a
forward and its last backward pass, in whole-stage activations (a chunk holds
half a stage's), and the bytes of stage inputs, outputs and gradients the
executor held at its fullest.

    .venv/bin/python benchmarks/bench_schedules.py [--repeats 9] [--schedules gpipe,zb-v]
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


def pass_costs(durations, chunks):
    """This rank's (forward, input backward, weight backward) seconds per
    chunk, medians of the passes as they ran; a full backward's time goes to
    the input backward (the simulator charges a full pass both)."""
    median = lambda code, c: statistics.median(durations[(code, c)]) if durations.get((code, c)) else 0.0
    return [(median(1, c), median(2, c) + median(3, c), median(4, c)) for c in range(chunks)]


def optimizer_step_seconds(engine, repeats=8):
    """The optimizer step and zeroing of this rank's gradients, timed alone
    (after a backward filled the gradients; the learning rate is tiny)."""
    import torch
    module, samples = engine.module, []
    for _ in range(repeats):
        for p in module.parameters():
            p.grad = torch.zeros_like(p)
        start = time.perf_counter()
        engine.optimizer.step()
        engine.optimizer.zero_grad()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


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


def measure(rank, world_size, repeats, names):
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.pipe import PipelineModule as DSPipelineModule

    import deepspeed_pipe_ext as dpe
    from deepspeed_pipe_ext import engine as dpe_engine
    from deepspeed_pipe_ext import schedule
    pin_to_one_core(rank)

    g = torch.Generator().manual_seed(0)  # every rank the same batch: inputs and labels may be read on either
    batch = (torch.randn(MICRO_BATCH, WIDTH, generator=g), torch.randn(MICRO_BATCH, WIDTH, generator=g))
    data = lambda: iter([batch] * MICRO_BATCHES)
    engines = {"deepspeed 1f1b": build_engine(DSPipelineModule, deepspeed.pipe.LayerSpec, deepspeed.initialize,
                                              layer_specs(deepspeed.pipe.LayerSpec), MICRO_BATCH, MICRO_BATCHES,
                                              seed_layers=True)}
    for name in names:
        pipeline, kwargs = SCHEDULES[name]
        engines[name] = build_engine(dpe.PipelineModule, dpe.LayerSpec, dpe_engine.initialize,
                                     layer_specs(dpe.LayerSpec), MICRO_BATCH, MICRO_BATCHES, pipeline=pipeline,
                                     seed_layers=True, **kwargs)
    durations = {name: {} for name in engines}  # per engine: (op code, chunk) -> seconds of each pass as it ran

    def timed_step(name, engine):
        loss = engine.train_batch(data_iter=data()).item()
        for start, end, code, _, chunk in getattr(engine, "last_timeline", []):
            durations[name].setdefault((code, chunk), []).append(end - start)
        return loss

    times, warm = alternate({name: (lambda n=name, e=e: timed_step(n, e)) for name, e in engines.items()}, repeats,
                            warmup=2)
    result = {"time": slowest_rank_medians(times), "first loss": {n: w[0] for n, w in warm.items()}}

    latency = torch.tensor([one_way_transfer_seconds(rank)])
    dist.all_reduce(latency, op=dist.ReduceOp.MAX)
    result["send latency"] = latency.item()
    result["predicted"], result["costs"], result["stage activations"], result["activation bytes"] = {}, {}, {}, {}
    for name in names:
        pipeline, kwargs = SCHEDULES[name]
        engine, chunks = engines[name], kwargs.get("virtual_stages", 1)
        mine = torch.tensor([c for chunk in pass_costs(durations[name], chunks) for c in chunk]
                            + [optimizer_step_seconds(engine)], dtype=torch.float64)
        gathered = [torch.zeros_like(mine) for _ in range(world_size)]
        dist.all_gather(gathered, mine)
        table = [[tuple(g[3 * c:3 * c + 3].tolist()) for c in range(chunks)] for g in gathered]
        step = max(g[-1].item() for g in gathered)
        kind = pipeline.get("schedule", "1f1b")
        # Each rank's passes as they ran, then the optimizer step (not part of the simulated schedule).
        result["predicted"][name] = (schedule.simulate_measured(kind, MICRO_BATCHES, 2, table, chunks,
                                                                send_latency=latency.item(),
                                                                layout=kwargs.get("virtual_layout", ""))["makespan"]
                                     + step)
        result["costs"][name] = table, step
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
    parser.add_argument("--schedules", default=",".join(SCHEDULES),
                        help="which of our schedules to alternate with DeepSpeed's (1f1b is always run)")
    args = parser.parse_args()
    names = ["1f1b"] + [n for n in args.schedules.split(",") if n and n != "1f1b"]
    for n in names:
        if n not in SCHEDULES:
            parser.error(f"unknown schedule {n!r}: choose from {', '.join(SCHEDULES)}")
    result = run_ranks(measure, 2, args.repeats, names, timeout=1800)[0]
    t, predicted = result["time"], result["predicted"]
    ds, one = t["deepspeed 1f1b"], t["1f1b"]
    (stage0, stage1), step = result["costs"]["1f1b"]
    print(f"train_batch, compute-bound: 2 stages on 2 processes (gloo, 1 core and 1 thread each), {LAYERS} "
          f"Linear({WIDTH}, {WIDTH}) + Tanh, {MICRO_BATCHES} micro-batches of {MICRO_BATCH}, median of "
          f"{args.repeats}")
    print(f"1f1b's passes as they ran, F / B+W: stage 0 {stage0[0][0] * 1e3:.2f} / {stage0[0][1] * 1e3:.2f} ms, "
          f"stage 1 {stage1[0][0] * 1e3:.2f} / {stage1[0][1] * 1e3:.2f} ms; optimizer step {step * 1e3:.2f} ms; "
          f"one activation between the ranks {result['send latency'] * 1e3:.2f} ms")
    print(f"DeepSpeed 1F1B: {ds * 1e3:.1f} ms (first loss {result['first loss']['deepspeed 1f1b']:.6f})")
    print("| schedule | step | vs DeepSpeed | simulator | measured / predicted | vs our 1f1b (predicted) | "
          "peak activations per stage, whole-stage units (vs 1f1b) | peak held bytes per stage |")
    print("|---|---:|---:|---:|---:|---:|---|---|")
    base_act = result["stage activations"]["1f1b"]
    for name in names:
        acts = result["stage activations"][name]
        ratio = " / ".join(f"{a:g} ({a / base:.2f}x)" for a, base in zip(acts, base_act))
        held = " / ".join(f"{x / 2**20:.1f} MiB" for x in result["activation bytes"][name])
        print(f"| {name} | {t[name] * 1e3:.1f} ms | {ds / t[name]:.2f}x | {predicted[name] * 1e3:.1f} ms | "
              f"{t[name] / predicted[name]:.3f} | {t[name] / one:.3f} ({predicted[name] / predicted['1f1b']:.3f}) | "
              f"{ratio} | {held} |")
    losses = result["first loss"]
    same = all(abs(losses[n] - losses["deepspeed 1f1b"]) <= 1e-5 * abs(losses["deepspeed 1f1b"]) for n in names)
    print(f"first-step losses {'equal' if same else 'DIFFER: ' + str(losses)} across the engines and schedules")


if __name__ == "__main__":
    main()
