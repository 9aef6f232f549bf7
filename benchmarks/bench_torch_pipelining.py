"""Train step time: DeepSpeed's PipelineEngine, ours and torch.distributed.pipelining, side by side.

Two processes over gloo (2 pipeline stages), each pinned to its own core and
one thread. The three engines train the same model (same seed; torch's stage
module is a copy of our module's local layers) on the same data, in the same
processes, alternating within each repetition; medians and ratios are reported.

  DeepSpeed: deepspeed.pipe.PipelineModule + deepspeed.initialize, engine.train_batch
  ours:      deepspeed_pipe_ext.PipelineModule + deepspeed_pipe_ext.engine.initialize, engine.train_batch
  torch:     PipelineStage(nn.Sequential(this rank's layers)) + Schedule1F1B(loss_fn=MSELoss),
             schedule.step(inputs on stage 0, target= and losses= on stage 1), the mean of the
             per-micro-batch losses on the last stage, then SGD step and zero_grad

All three: SGD(lr=1e-4), gradients = mean over micro-batches (DeepSpeed divides
each micro-batch's loss by gradient_accumulation_steps; torch's schedule divides
the gradients by n_microbatches, scale_grads=True), and a returned loss = mean of
the per-micro-batch losses. DeepSpeed's and our train_batch also broadcast that
loss from the last stage to every stage; torch's step leaves it on the last stage.
Before timing, the first two steps' losses of the three are compared.

  overhead-bound: 2 stages x 16 Linear(8, 8) layers, 32 micro-batches of batch size 1
  compute-bound:  2 stages x 4 Linear(768, 768) layers, 8 micro-batches of 64

    .venv/bin/python benchmarks/bench_torch_pipelining.py [--repeats 15]
"""
import copy

from common import alternate, build_engine, case_arguments, pin_to_one_core, slowest_rank_medians

CASES = {  # layers per stage, width, micro-batch size, micro-batches
    "overhead": (16, 8, 1, 32),
    "compute": (4, 768, 64, 8),
}
LR = 1e-4
WARMUP = 2
LOSS_TOLERANCE = 1e-5


class TorchPipelining:
    """torch.distributed.pipelining's 1F1B on this rank's stage, with an optimizer step."""

    def __init__(self, stage_module, rank, world_size, micro_batches, xs, ys):
        import torch
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B
        self.rank, self.last = rank, rank == world_size - 1
        # No input/output example args: the stage infers shapes on the first step (a warm-up rep).
        stage = PipelineStage(stage_module, stage_index=rank, num_stages=world_size, device=torch.device("cpu"))
        self.schedule = Schedule1F1B(stage, micro_batches, loss_fn=torch.nn.MSELoss())
        self.optimizer = torch.optim.SGD(stage_module.parameters(), lr=LR)
        # step() splits the whole batch along dim 0 into micro-batches: pass the concatenation.
        self.inputs, self.target = torch.cat(xs), torch.cat(ys)

    def train_batch(self):
        import torch
        if self.rank == 0:
            self.schedule.step(self.inputs)
            loss = None
        elif self.last:
            losses = []
            self.schedule.step(target=self.target, losses=losses, return_outputs=False)
            loss = torch.stack(losses).mean().detach()
        else:
            self.schedule.step()
            loss = None
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss


def measure(rank, world_size, case, repeats):
    import deepspeed
    import torch
    from deepspeed.pipe import PipelineModule as DSPipelineModule
    from deepspeed.runtime.pipe.engine import PipelineEngine as DSPipelineEngine

    import deepspeed_pipe_ext as dpe
    from deepspeed_pipe_ext import engine as dpe_engine
    pin_to_one_core(rank)

    layers, width, micro_batch, micro_batches = CASES[case]
    gen = torch.Generator().manual_seed(1234)
    xs = [torch.randn(micro_batch, width, generator=gen) for _ in range(micro_batches)]
    ys = [torch.randn(micro_batch, width, generator=gen) for _ in range(micro_batches)]
    data = lambda: iter(list(zip(xs, ys)))

    model = lambda spec: [spec(torch.nn.Linear, width, width) for _ in range(2 * layers)]
    ds = build_engine(DSPipelineModule, deepspeed.pipe.LayerSpec, deepspeed.initialize,
                      model(deepspeed.pipe.LayerSpec), micro_batch, micro_batches, lr=LR)
    ours = build_engine(dpe.PipelineModule, dpe.LayerSpec, dpe_engine.initialize, model(dpe.LayerSpec), micro_batch,
                        micro_batches, lr=LR)
    assert type(ds) is DSPipelineEngine, f"deepspeed.initialize gave {type(ds)}, not DeepSpeed's PipelineEngine"
    assert type(ours) is dpe_engine.PipelineEngine, f"ours is {type(ours)}"
    # torch's stage: the same layers this rank holds, with our module's starting weights.
    stage_module = torch.nn.Sequential(*[copy.deepcopy(layer) for layer in ours.module.forward_funcs])
    assert len(stage_module) == layers
    tp = TorchPipelining(stage_module, rank, world_size, micro_batches, xs, ys)

    steps = {
        "deepspeed": lambda: ds.train_batch(data_iter=data()),
        "ours": lambda: ours.train_batch(data_iter=data()),
        "torch": tp.train_batch,
    }
    times, warmup_losses = alternate(steps, repeats, WARMUP)
    # The loss of each warm-up step, on the last stage.
    first_losses = {name: [float(loss) if loss is not None else float("nan") for loss in losses]
                    for name, losses in warmup_losses.items()}
    result = slowest_rank_medians(times)
    if rank == world_size - 1:
        result["losses"] = first_losses
    return result


def main():
    from distributed import run_ranks
    args = case_arguments()
    print(f"train step, 2 stages on 2 processes (gloo, 1 core and 1 thread each), median of {args.repeats}, "
          f"{WARMUP} warm-up steps discarded")
    for case in args.cases.split(","):
        layers, width, micro_batch, micro_batches = CASES[case]
        results = run_ranks(measure, 2, case, args.repeats, timeout=1800)
        losses = results[-1]["losses"]
        t = {name: results[0][name] for name in ("deepspeed", "ours", "torch")}
        print(f"  {case}: 2 x {layers} Linear({width}, {width}), {micro_batches} micro-batches of {micro_batch}")
        for i in range(WARMUP):
            vals = {name: losses[name][i] for name in t}
            diff = max(abs(vals[a] - vals[b]) for a in vals for b in vals)
            verdict = "match" if diff <= LOSS_TOLERANCE else "MISMATCH: not the same work"
            print(f"    step {i + 1} loss   DeepSpeed {vals['deepspeed']:.8f}   ours {vals['ours']:.8f}   "
                  f"torch {vals['torch']:.8f}   max |diff| {diff:.1e} ({verdict})")
        print(f"    step time  DeepSpeed {t['deepspeed'] * 1000:9.2f} ms   ours {t['ours'] * 1000:9.2f} ms   "
              f"torch.distributed.pipelining {t['torch'] * 1000:9.2f} ms")
        print(f"    speed-up (their time / ours)   ours vs DeepSpeed {t['deepspeed'] / t['ours']:5.2f}x   "
              f"ours vs torch.distributed.pipelining {t['torch'] / t['ours']:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
