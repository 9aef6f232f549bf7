"""What the side-by-side benchmarks share: one core and one thread per rank,
engines built the same way, alternating timed repetitions, the slower rank's
time per repetition."""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "distributed"))


def case_arguments():
    """The command line of the two-regime benchmarks: --repeats N --cases overhead,compute."""
    import argparse
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--cases", default="overhead,compute")
    return parser.parse_args()


def pin_to_one_core(rank):
    import torch
    os.sched_setaffinity(0, {rank % os.cpu_count()})
    torch.set_num_threads(1)


def build_engine(module_cls, spec, make, layers, micro_batch, micro_batches, pipeline=None, lr=1e-4, **module_kwargs):
    """A 2-stage engine over `layers` (made with `spec`), MSE loss, SGD."""
    import torch
    torch.manual_seed(0)
    net = module_cls(layers=layers, num_stages=2, loss_fn=torch.nn.MSELoss(), partition_method="uniform",
                     **module_kwargs)
    config = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": micro_batches,
              "steps_per_print": 10**9}
    if pipeline:
        config["pipeline"] = pipeline
    engine, _, _, _ = make(model=net, config=config, optimizer=torch.optim.SGD(net.parameters(), lr=lr),
                           model_parameters=net.parameters())
    return engine


def alternate(steps, repeats, warmup):
    """Runs each of `steps` (name -> callable) once per repetition, in turn,
    after a barrier. Returns the timed seconds per name and what each step
    returned in the warm-up repetitions."""
    import torch.distributed as dist
    times = {name: [] for name in steps}
    warmup_results = {name: [] for name in steps}
    for rep in range(repeats + warmup):
        for name, step in steps.items():
            dist.barrier()
            start = time.perf_counter()
            out = step()
            elapsed = time.perf_counter() - start
            if rep < warmup:
                warmup_results[name].append(out)
            else:
                times[name].append(elapsed)
    return times, warmup_results


def slowest_rank_medians(times):
    """A step lasts until its slower stage is done: per repetition the max over
    ranks, then the median (called on every rank)."""
    import torch
    import torch.distributed as dist
    result = {}
    for name, t in times.items():
        gathered = [torch.zeros(len(t), dtype=torch.float64) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, torch.tensor(t, dtype=torch.float64))
        result[name] = statistics.median(torch.stack(gathered).max(dim=0).values.tolist())
    return result
