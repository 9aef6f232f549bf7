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
keeps a stage from waiting for the other's reply after every micro-batch, and
with zb-h1 (backward split into B and W, W filling the bubbles), against the
simulator's zb-h1 prediction from B and W measured alone, and with
interleaved-1f1b (two model chunks per rank), against its prediction.

    .venv/bin/python benchmarks/bench_engine.py [--repeats 15]
"""
import statistics
import time

from common import alternate, build_engine, case_arguments, pin_to_one_core, slowest_rank_medians


def measure(rank, world_size, case, repeats):
    import deepspeed
    import torch
    import torch.distributed as dist
    import torch.nn as nn
    from deepspeed.pipe import PipelineModule as DSPipelineModule

    import deepspeed_pipe_ext as dpe
    from deepspeed_pipe_ext import engine as dpe_engine
    from deepspeed_pipe_ext import schedule
    pin_to_one_core(rank)

    width, micro_batch, micro_batches, layers = (8, 1, 32, 32) if case == "overhead" else (768, 64, 8, 8)
    model = lambda spec: [spec(nn.Linear, width, width) for _ in range(layers)]
    g = torch.Generator().manual_seed(0)  # every rank the same batch (the first stage reads inputs, the last labels)
    batch = (torch.randn(micro_batch, width, generator=g), torch.randn(micro_batch, width, generator=g))
    data = lambda: iter([batch] * micro_batches)

    engines = {
        "deepspeed": build_engine(DSPipelineModule, deepspeed.pipe.LayerSpec, deepspeed.initialize,
                                  model(deepspeed.pipe.LayerSpec), micro_batch, micro_batches),
        "ours": build_engine(dpe.PipelineModule, dpe.LayerSpec, dpe_engine.initialize, model(dpe.LayerSpec),
                             micro_batch, micro_batches),
        "ours, gpipe": build_engine(dpe.PipelineModule, dpe.LayerSpec, dpe_engine.initialize, model(dpe.LayerSpec),
                                    micro_batch, micro_batches, pipeline={"schedule": "gpipe"}),
        "ours, zb-h1": build_engine(dpe.PipelineModule, dpe.LayerSpec, dpe_engine.initialize, model(dpe.LayerSpec),
                                    micro_batch, micro_batches, pipeline={"schedule": "zb-h1"}),
        "ours, interleaved-1f1b": build_engine(dpe.PipelineModule, dpe.LayerSpec, dpe_engine.initialize,
                                               model(dpe.LayerSpec), micro_batch, micro_batches,
                                               pipeline={"schedule": "interleaved-1f1b"}, virtual_stages=2),
    }
    times, _ = alternate({name: (lambda e=e: e.train_batch(data_iter=data())) for name, e in engines.items()},
                         repeats, warmup=2)
    result = slowest_rank_medians(times)

    # The no-overhead limits: the simulator's 1F1B and zb-h1 from this stage's compute measured alone.
    from deepspeed_pipe_ext._native import _C
    module = engines["ours"].module
    x = torch.randn(micro_batch, width, requires_grad=True)
    costs = {"forward": [], "backward": [], "backward_input": [], "backward_weight": []}
    for _ in range(50 if case == "overhead" else 10):
        start = time.perf_counter()
        out = module(x)
        mid = time.perf_counter()
        out.backward(torch.ones_like(out))
        costs["forward"].append(mid - start)
        costs["backward"].append(time.perf_counter() - mid)
        out = module(x)
        start = time.perf_counter()
        deferred = _C.backward_input([out], [torch.ones_like(out)], [x])
        mid = time.perf_counter()
        deferred.run()
        costs["backward_input"].append(mid - start)
        costs["backward_weight"].append(time.perf_counter() - mid)
    mine = torch.tensor([statistics.median(v) for v in costs.values()])
    gathered = [torch.zeros(len(costs)) for _ in range(world_size)]
    dist.all_gather(gathered, mine)
    f, b, b_input, b_weight = (max(c[i].item() for c in gathered) for i in range(len(costs)))
    result["predicted"] = schedule.simulate("1f1b", micro_batches, 2, forward=f, backward_input=b,
                                            backward_weight=0.0)["makespan"]
    result["predicted zb-h1"] = schedule.simulate("zb-h1", micro_batches, 2, forward=f, backward_input=b_input,
                                                  backward_weight=b_weight)["makespan"]
    # Two chunks per rank, each half of the stage measured above.
    result["predicted interleaved-1f1b"] = schedule.simulate("interleaved-1f1b", micro_batches, 2, chunks=2,
                                                             forward=f, backward_input=b,
                                                             backward_weight=0.0)["makespan"]
    return result


def main():
    from distributed import run_ranks
    args = case_arguments()
    print(f"train_batch, 2 stages on 2 processes (gloo, 1 core and 1 thread each), median of {args.repeats}")
    for case in args.cases.split(","):
        result = run_ranks(measure, 2, case, args.repeats, timeout=1200)[0]
        ds, ours, gpipe = result["deepspeed"], result["ours"], result["ours, gpipe"]
        print(f"  {case:9s} DeepSpeed {ds * 1000:9.2f} ms   ours {ours * 1000:9.2f} ms   speed-up {ds / ours:5.2f}x   "
              f"1F1B prediction {result['predicted'] * 1000:9.2f} ms (ours / prediction "
              f"{ours / result['predicted']:.3f})", flush=True)
        print(f"  {case:9s} ours with the gpipe schedule {gpipe * 1000:9.2f} ms   speed-up {ds / gpipe:5.2f}x",
              flush=True)
        zb, zb_predicted = result["ours, zb-h1"], result["predicted zb-h1"]
        print(f"  {case:9s} ours with the zb-h1 schedule {zb * 1000:9.2f} ms   speed-up {ds / zb:5.2f}x   "
              f"zb-h1 prediction {zb_predicted * 1000:9.2f} ms (ours / prediction {zb / zb_predicted:.3f}); "
              f"zb-h1 / 1f1b: ours {zb / ours:.3f}, predicted {zb_predicted / result['predicted']:.3f}", flush=True)
        il, il_predicted = result["ours, interleaved-1f1b"], result["predicted interleaved-1f1b"]
        print(f"  {case:9s} ours with interleaved-1f1b (2 chunks per rank) {il * 1000:9.2f} ms   speed-up "
              f"{ds / il:5.2f}x   prediction {il_predicted * 1000:9.2f} ms (ours / prediction "
              f"{il / il_predicted:.3f}); interleaved / 1f1b: ours {il / ours:.3f}, predicted "
              f"{il_predicted / result['predicted']:.3f}", flush=True)


if __name__ == "__main__":
    main()
