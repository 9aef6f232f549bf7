"""`make demo`: pipeline-parallel training of a small classifier on the CPU.

Trains an MLP on scikit-learn's bundled handwritten digits (1,797 8x8 images,
no download) with 2 pipeline stages in 2 processes over gloo. The model is a
deepspeed_pipe_ext.PipelineModule (partition solved in C++, process groups
from the C++ topology); `deepspeed.initialize` returns deepspeed_pipe_ext's
PipelineEngine for it: the schedule (1F1B by default; gpipe or zb-h1 with
--schedule) runs in the C++ executor, activations and gradients move through
c10d from C++.

    python examples/demo.py [--steps 60] [--stages 2] [--schedule zb-h1]
    python examples/demo.py --schedule interleaved-1f1b --virtual-stages 2

3D parallelism: a character-level GPT on the standard library's source, its
attention and MLP split over tensor-parallel ranks (PP=2 x TP=2, 4 processes),
prints the loss and a sample of generated text:

    python examples/demo.py --model gpt --tensor-parallel 2 [--steps 600]

Launched here with torchrun; DeepSpeed's launcher runs the workers too:
    deepspeed --num_gpus 2 examples/demo.py --worker
"""
import argparse
import os
import subprocess
import sys
import time


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args):
    """Start one worker per stage with torchrun, as a user would."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.stages * args.tensor_parallel}",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", os.path.abspath(__file__),
           "--worker", f"--steps={args.steps}", f"--stages={args.stages}", f"--timeline={args.timeline}",
           f"--schedule={args.schedule}", f"--model={args.model}", f"--tensor-parallel={args.tensor_parallel}",
           f"--virtual-stages={args.virtual_stages}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.call(cmd, env=env)


def digits_batches(micro_batch, seed):
    import torch
    from sklearn.datasets import load_digits
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(x), generator=g)
        for start in range(0, len(order) - micro_batch + 1, micro_batch):
            idx = order[start:start + micro_batch]
            yield x[idx], y[idx]


def worker(args):
    import deepspeed
    import torch
    import torch.nn as nn

    import deepspeed_pipe_ext as dpe

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)
    hidden = 128
    layers = [dpe.LayerSpec(nn.Linear, 64, hidden), nn.GELU()]
    for _ in range(6):
        layers += [dpe.LayerSpec(nn.Linear, hidden, hidden), nn.GELU()]
    layers += [dpe.LayerSpec(nn.Linear, hidden, 10)]
    net = dpe.PipelineModule(layers=layers, num_stages=args.stages, loss_fn=nn.CrossEntropyLoss(),
                             partition_method="parameters-minmax", virtual_stages=args.virtual_stages,
                             virtual_layout=dpe.schedule.ScheduleKind.parse(args.schedule).layout.config_name)
    if rank == 0:
        print(net.describe_partition(), flush=True)

    micro_batch, micro_batches = 16, 8
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": micro_batches,
        "steps_per_print": 10**9,
        "pipeline": {"activation_checkpoint_interval": 0, "schedule": args.schedule},
    }
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    engine, _, _, _ = deepspeed.initialize(model=net, config=config, optimizer=optimizer,
                                           model_parameters=net.parameters())
    data = digits_batches(micro_batch, seed=engine.grid.data_parallel_id)
    samples = micro_batch * micro_batches * engine.grid.data_parallel_size
    window_start, window_steps = time.perf_counter(), 0
    for step in range(1, args.steps + 1):
        loss = engine.train_batch(data_iter=data)
        window_steps += 1
        if rank == 0 and (step % 10 == 0 or step == 1):
            rate = window_steps * samples / (time.perf_counter() - window_start)
            print(f"step {step:4d}  loss {loss.item():.4f}  {rate:8.1f} samples/s", flush=True)
            window_start, window_steps = time.perf_counter(), 0
    # Every stage's forward and backward passes of the last step, as they ran.
    timelines = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(timelines, engine.last_timeline)
    if rank == 0:
        print(f"engine: {type(engine).__module__}.{type(engine).__name__}", flush=True)
        from deepspeed_pipe_ext import timeline
        measured = timeline.measured_result(timelines[:args.stages])
        os.makedirs(os.path.dirname(os.path.abspath(args.timeline)), exist_ok=True)
        timeline.plot_timeline(measured, args.timeline, xlabel="milliseconds",
                               title=f"last training step as measured ({args.schedule}): {args.stages} stages, "
                               f"{micro_batches} micro-batches, idle fraction {measured['bubble_fraction']:.2f}")
        print(f"timeline of the last step: {args.timeline}", flush=True)
        trace = os.path.splitext(args.timeline)[0] + ".json"
        timeline.write_chrome_trace(timelines[:args.stages], trace)
        print(f"as a Chrome/Perfetto trace (all ranks): {trace}", flush=True)
    torch.distributed.barrier()


def gpt_worker(args):
    """PP=stages x TP=tensor_parallel: a character-level GPT learns Python source."""
    import deepspeed
    import demo_gpt  # beside this file
    import torch

    import deepspeed_pipe_ext as dpe
    from deepspeed_pipe_ext.topology import PipeModelDataParallelTopology

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank = torch.distributed.get_rank()
    text = demo_gpt.stdlib_text()
    vocab = demo_gpt.Vocabulary(text)
    ids = vocab.encode(text)
    torch.manual_seed(0)
    topology = PipeModelDataParallelTopology(num_pp=args.stages, num_mp=args.tensor_parallel,
                                             num_dp=torch.distributed.get_world_size() //
                                             (args.stages * args.tensor_parallel))
    net = dpe.PipelineModule(layers=demo_gpt.layers(len(vocab.chars), tp=args.tensor_parallel), topology=topology,
                             loss_fn=demo_gpt.loss_fn, partition_method="type:TransformerBlock")
    demo_gpt.TensorParallel.group = net.mpu().get_slice_parallel_group()
    if rank == 0:
        print(f"{len(text):,} characters of Python source, {len(vocab.chars)} symbols; "
              f"{args.stages} stages x {args.tensor_parallel} tensor-parallel ranks", flush=True)
        print(net.describe_partition(), flush=True)
    micro_batch, micro_batches = 8, 4
    config = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": micro_batches,
              "steps_per_print": 10**9, "gradient_clipping": 1.0,
              "pipeline": {"schedule": args.schedule}}
    engine, _, _, _ = deepspeed.initialize(model=net, config=config, model_parameters=net.parameters(),
                                           optimizer=torch.optim.Adam(net.parameters(), lr=3e-3))
    data = demo_gpt.windows(ids, micro_batch, seed=engine.grid.data_parallel_id)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        loss = engine.train_batch(data_iter=data)
        if rank == 0 and (step % 20 == 0 or step == 1):
            print(f"step {step:4d}  loss {loss.item():.4f}  {time.perf_counter() - start:6.1f} s", flush=True)
    sampler = topology.get_rank(pipe=args.stages - 1, data=0, model=0)  # the same rank everywhere
    sample = demo_gpt.generate(engine, vocab, prompt="def ", length=120, sampler=sampler)
    if rank == 0:
        print(f"engine: {type(engine).__module__}.{type(engine).__name__}", flush=True)
        print("sample:\n" + sample, flush=True)
    torch.distributed.barrier()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, help="training steps (default: 60 for mlp, 600 for gpt)")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--schedule", default="1f1b", help="1f1b (default), gpipe, zb-h1, interleaved-1f1b "
                        "(with --virtual-stages), or zb-v (two chunks per rank in a V)")
    parser.add_argument("--virtual-stages", type=int, default=None,
                        help="model chunks per rank (mlp; with --schedule interleaved-1f1b; zb-v has 2)")
    parser.add_argument("--timeline", default="out/demo_timeline.png",
                        help="where to draw the last step's measured timeline (needs matplotlib); the same "
                        "timeline, all ranks merged, goes beside it as a Chrome/Perfetto trace (.json)")
    parser.add_argument("--model", default="mlp", choices=["mlp", "gpt"],
                        help="mlp: a classifier of the bundled digits (default); gpt: a character-level GPT with "
                        "tensor-parallel blocks")
    parser.add_argument("--tensor-parallel", type=int, default=1, help="tensor-parallel ranks per stage (gpt)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    args = parser.parse_args()
    if args.steps is None:
        args.steps = 600 if args.model == "gpt" else 60
    from deepspeed_pipe_ext.schedule import ScheduleKind  # what each schedule runs: chunks per rank, layout
    try:
        kind = ScheduleKind.parse(args.schedule)
    except ValueError as err:
        parser.error(str(err))
    if args.virtual_stages is None:
        args.virtual_stages = kind.min_chunks
    if args.virtual_stages < kind.min_chunks or 0 < kind.max_chunks < args.virtual_stages:
        count = (f"{kind.min_chunks} or more" if kind.max_chunks == 0 else str(kind.min_chunks)
                 if kind.max_chunks == kind.min_chunks else f"{kind.min_chunks} to {kind.max_chunks}")
        parser.error(f"--schedule {args.schedule} runs {count} model chunk(s) per rank (--virtual-stages)")
    if args.virtual_stages > 1 and args.model != "mlp":
        parser.error("--virtual-stages is for the mlp model")
    if args.tensor_parallel > 1 and args.model != "gpt":
        parser.error("--tensor-parallel needs --model gpt (the digits classifier has no tensor-parallel layers)")
    if args.worker:
        gpt_worker(args) if args.model == "gpt" else worker(args)
    else:
        sys.exit(launch(args))


if __name__ == "__main__":
    main()
