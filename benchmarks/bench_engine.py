"""train_batch time: DeepSpeed's PipelineEngine against ours, side by side.

Two processes over gloo (2 pipeline stages), each pinned to its own core and
one thread. Both engines train the same model (same seeds, same data) in the
same processes, alternating repetitions; medians and the ratio are reported.

  overhead-bound: 2 stages x 16 tiny Linear layers, 32 micro-batches of batch size 1
  compute-bound:  2 stages x 4 Linear(768, 768) layers, 8 micro-batches of 64
In both, the simulator's 1F1B prediction from each stage's forward and backward
measured alone: what a runtime without any overhead of its own would take.
Ours also runs with the gpipe schedule (all forwards, then all backwards), which
keeps a stage from waiting for the other's reply after every micro-batch.

    .venv/bin/python benchmarks/bench_engine.py [--repeats 15]
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def build(module_cls, spec, make, layers_fn, micro_batch, micro_batches, schedule=None):
    import torch
    torch.manual_seed(0)
    net = module_cls(layers=layers_fn(spec), num_stages=2, loss_fn=torch.nn.MSELoss(), partition_method="uniform")
    config = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": micro_batches,
              "steps_per_print": 10**9}
    if schedule:
        config["pipeline"] = {"schedule": schedule}
    engine, _, _, _ = make(model=net, config=config, optimizer=torch.optim.SGD(net.parameters(), lr=1e-4),
                           model_parameters=net.parameters())
    return engine


def measure(rank, world_size, case, repeats):
    import torch
    import torch.distributed as dist
    import torch.nn as nn
    import deepspeed
    from deepspeed.pipe import PipelineModule as DSPipelineModule
    import deepspeed_pipe_ext as dpe
    from deepspeed_pipe_ext import engine as dpe_engine
    from deepspeed_pipe_ext import schedule
    os.sched_setaffinity(0, {rank % os.cpu_count()})
    torch.set_num_threads(1)

    if case == "overhead":
        width, micro_batch, micro_batches = 8, 1, 32
        layers_fn = lambda spec: [spec(nn.Linear, width, width) for _ in range(32)]
    else:
        width, micro_batch, micro_batches = 768, 64, 8
        layers_fn = lambda spec: [spec(nn.Linear, width, width) for _ in range(8)]
    batch = (torch.randn(micro_batch, width), torch.randn(micro_batch, width))
    data = lambda: iter([batch] * micro_batches)

    engines = {
        "deepspeed": build(DSPipelineModule, deepspeed.pipe.LayerSpec, deepspeed.initialize, layers_fn, micro_batch,
                           micro_batches),
        "ours": build(dpe.PipelineModule, dpe.LayerSpec, dpe_engine.initialize, layers_fn, micro_batch,
                      micro_batches),
        "ours, gpipe": build(dpe.PipelineModule, dpe.LayerSpec, dpe_engine.initialize, layers_fn, micro_batch,
                             micro_batches, "gpipe"),
    }
    times = {name: [] for name in engines}
    for rep in range(repeats + 2):
        for name, engine in engines.items():
            dist.barrier()
            start = time.perf_counter()
            engine.train_batch(data_iter=data())
            elapsed = time.perf_counter() - start
            if rep >= 2:  # warm-up
                times[name].append(elapsed)
    result = {name: statistics.median(t) for name, t in times.items()}

    # The no-overhead limit: the simulator's 1F1B from this stage's compute measured alone.
    module = engines["ours"].module
    x = torch.randn(micro_batch, width, requires_grad=True)
    fwd, bwd = [], []
    for _ in range(50 if case == "overhead" else 10):
        start = time.perf_counter()
        out = module(x)
        mid = time.perf_counter()
        out.backward(torch.ones_like(out))
        fwd.append(mid - start)
        bwd.append(time.perf_counter() - mid)
    costs = torch.tensor([statistics.median(fwd), statistics.median(bwd)])
    gathered = [torch.zeros(2) for _ in range(world_size)]
    dist.all_gather(gathered, costs)
    f = max(c[0].item() for c in gathered)
    b = max(c[1].item() for c in gathered)
    predicted = schedule.simulate("1f1b", micro_batches, 2, forward=f, backward_input=b, backward_weight=0.0)
    result["predicted"] = predicted["makespan"]
    return result


def main():
    from distributed import run_ranks
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--cases", default="overhead,compute")
    args = parser.parse_args()
    print(f"train_batch, 2 stages on 2 processes (gloo, 1 core and 1 thread each), median of {args.repeats}")
    for case in args.cases.split(","):
        result = run_ranks(measure, 2, case, args.repeats, timeout=1200)[0]
        ds, ours, gpipe = result["deepspeed"], result["ours"], result["ours, gpipe"]
        print(f"  {case:9s} DeepSpeed {ds * 1000:9.2f} ms   ours {ours * 1000:9.2f} ms   speed-up {ds / ours:5.2f}x   "
              f"1F1B prediction {result['predicted'] * 1000:9.2f} ms (ours / prediction "
              f"{ours / result['predicted']:.3f})", flush=True)
        print(f"  {case:9s} ours with the gpipe schedule {gpipe * 1000:9.2f} ms   speed-up {ds / gpipe:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
