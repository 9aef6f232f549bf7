"""train_batch time: DeepSpeed's PipelineEngine against ours, side by side.

Two processes over gloo (2 pipeline stages), each pinned to its own core and
one thread. Both engines train the same model (same seeds, same data) in the
same processes, alternating repetitions; medians of the slower rank's time and
the ratio are reported.

  overhead-bound: 2 stages x 16 tiny Linear layers, 32 micro-batches of batch size 1
  compute-bound:  2 stages x 4 Linear(768, 768) layers, 8 micro-batches of 64
In both, the simulator's 1F1B prediction from each stage's forward and backward
measured alone: what a runtime without any overhead of its own would take.
Ours also runs with the gpipe schedule (all forwards, then all backwards), which
keeps a stage from waiting for the other's reply after every micro-batch.

    .venv/bin/python benchmarks/bench_engine.py [--repeats 15]
"""
import argparse
import statistics
import time

from common import alternate, build_engine, pin_to_one_core, slowest_rank_medians


def measure(rank, world_size, case, repeats):
    import torch
    import torch.distributed as dist
    import torch.nn as nn
    import deepspeed
    from deepspeed.pipe import PipelineModule as DSPipelineModule
    import deepspeed_pipe_ext as dpe
    from deepspeed_pipe_ext import engine as dpe_engine
    from deepspeed_pipe_ext import schedule
    pin_to_one_core(rank)

    width, micro_batch, micro_batches, layers = (8, 1, 32, 32) if case == "overhead" else (768, 64, 8, 8)
    model = lambda spec: [spec(nn.Linear, width, width) for _ in range(layers)]
    batch = (torch.randn(micro_batch, width), torch.randn(micro_batch, width))
    data = lambda: iter([batch] * micro_batches)

    engines = {
        "deepspeed": build_engine(DSPipelineModule, deepspeed.pipe.LayerSpec, deepspeed.initialize,
                                  model(deepspeed.pipe.LayerSpec), micro_batch, micro_batches),
        "ours": build_engine(dpe.PipelineModule, dpe.LayerSpec, dpe_engine.initialize, model(dpe.LayerSpec),
                             micro_batch, micro_batches),
        "ours, gpipe": build_engine(dpe.PipelineModule, dpe.LayerSpec, dpe_engine.initialize, model(dpe.LayerSpec),
                                    micro_batch, micro_batches, pipeline={"schedule": "gpipe"}),
    }
    times, _ = alternate({name: (lambda e=e: e.train_batch(data_iter=data())) for name, e in engines.items()},
                         repeats, warmup=2)
    result = slowest_rank_medians(times)

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
