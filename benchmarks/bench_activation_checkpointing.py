"""Activation checkpointing: peak activation memory and step time, DeepSpeed's
PipelineEngine against ours, with and without checkpointing, side by side.

Two processes over gloo (2 pipeline stages), each pinned to one core and one
thread. The model: 8 blocks per stage of Linear(512, 512) + GELU +
Dropout(0.1), 8 micro-batches of 64, 1F1B. "Peak memory" is the peak resident
memory of a stage's process during one train_batch above where it started
(see peak_memory): activations kept for backward, gradients, buffers.
Checkpointing uses interval 1 (each block is a group), reentrant (DeepSpeed's
default) for both engines, and also our non-reentrant mode. Ours releases a
sent stage output's storage (its graph kept, as Megatron's
deallocate_output_tensor); the "sent outputs kept" rows turn that off
("pipeline": {"deallocate_outputs": false}) to show what it saves.

    .venv/bin/python benchmarks/bench_activation_checkpointing.py [--repeats 7]
"""
import argparse
import os
import re

from common import alternate, build_engine, pin_to_one_core, slowest_rank_medians

WIDTH, MICRO_BATCH, MICRO_BATCHES, BLOCKS = 256, 256, 8, 8


def _status_kib(field):
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def peak_memory(run):
    """Peak resident memory while run() runs, above where it started (bytes).

    main() sets a fixed glibc mmap threshold of 64 KiB, so every tensor of
    that size or more is its own mapping, returned to the system when freed:
    resident memory then follows the live tensors instead of the heap's high
    water mark. Writing 5 to clear_refs resets the peak (VmHWM)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = _status_kib("VmRSS")
    run()
    return (_status_kib("VmHWM") - start) * 1024


def measure(rank, world_size, repeats):
    import deepspeed
    import torch
    import torch.nn as nn
    from deepspeed.pipe import PipelineModule as DSPipelineModule

    import deepspeed_pipe_ext as dpe
    from deepspeed_pipe_ext import engine as dpe_engine
    pin_to_one_core(rank)

    class Block(nn.Module):

        def __init__(self):
            super().__init__()
            self.lin, self.drop = nn.Linear(WIDTH, WIDTH), nn.Dropout(0.1)

        def forward(self, x):
            return self.drop(nn.functional.gelu(self.lin(x)))

    def build(module_cls, spec, make, interval, reentrant, deallocate=True):
        return build_engine(module_cls, spec, make, [spec(Block) for _ in range(2 * BLOCKS)], MICRO_BATCH,
                            MICRO_BATCHES, pipeline={"activation_checkpoint_interval": interval,
                                                     "use_reentrant": reentrant, "deallocate_outputs": deallocate})

    configs = {
        "DeepSpeed": (DSPipelineModule, deepspeed.pipe.LayerSpec, deepspeed.initialize, 0, True),
        "DeepSpeed, checkpointing": (DSPipelineModule, deepspeed.pipe.LayerSpec, deepspeed.initialize, 1, True),
        "ours": (dpe.PipelineModule, dpe.LayerSpec, dpe_engine.initialize, 0, True),
        "ours, sent outputs kept": (dpe.PipelineModule, dpe.LayerSpec, dpe_engine.initialize, 0, True, False),
        "ours, checkpointing": (dpe.PipelineModule, dpe.LayerSpec, dpe_engine.initialize, 1, True),
        "ours, checkpointing, sent outputs kept": (dpe.PipelineModule, dpe.LayerSpec, dpe_engine.initialize, 1, True,
                                                   False),
        "ours, checkpointing (non-reentrant)": (dpe.PipelineModule, dpe.LayerSpec, dpe_engine.initialize, 1, False),
    }
    engines = {name: build(*args) for name, args in configs.items()}
    batch = (torch.randn(MICRO_BATCH, WIDTH), torch.randn(MICRO_BATCH, WIDTH))
    data = lambda: iter([batch] * MICRO_BATCHES)

    memory = {}
    for name, engine in engines.items():
        engine.train_batch(data_iter=data())  # warm-up: gradients, optimizer state, receive buffers
        memory[name] = peak_memory(lambda: engine.train_batch(data_iter=data()))

    times, _ = alternate({name: (lambda e=e: e.train_batch(data_iter=data())) for name, e in engines.items()},
                         repeats, warmup=1)
    steps = slowest_rank_medians(times)
    return {name: (memory[name], steps[name]) for name in engines}


def main():
    from distributed import run_ranks
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)  # read by glibc when the ranks start: see peak_memory
    per_rank = run_ranks(measure, 2, args.repeats, timeout=1800)
    print(f"2 stages x {BLOCKS} blocks of Linear({WIDTH}, {WIDTH}) + GELU + Dropout, {MICRO_BATCHES} micro-batches "
          f"of {MICRO_BATCH}, 1F1B; checkpoint interval 1; median train_batch of {args.repeats}")
    print(f"  {'':40s} {'stage 0 peak MiB':>16s} {'stage 1 peak MiB':>16s} {'step ms':>9s} {'vs. no ckpt':>11s}")
    for name in per_rank[0]:
        mem = [r[name][0] / 2**20 for r in per_rank]
        step = per_rank[0][name][1]
        base = "DeepSpeed" if name.startswith("DeepSpeed") else "ours"
        cost = step / per_rank[0][base][1]
        print(f"  {name:40s} {mem[0]:16.2f} {mem[1]:16.2f} {step * 1000:9.1f} {cost:10.2f}x")


if __name__ == "__main__":
    main()
