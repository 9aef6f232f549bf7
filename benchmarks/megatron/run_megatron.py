"""Megatron-DeepSpeed's pretrain_gpt.py, unmodified, on DeepSpeed's pipeline engine and on ours, compared.

    # a checkout of deepspeedai/Megatron-DeepSpeed outside this repo (tried at commit 4efb479d), then
    .venv/bin/pip install regex==2024.11.6 six==1.17.0 pybind11==2.13.6 nltk==3.9.1  # Megatron's pure-Python deps
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/megatron/run_megatron.py --megatron /work/megatron-ds \\
        [--engine deepspeed|ours|both] [--configs pp2,pp2-tp2,pp2-ckpt,pp2-zero1,pp2-dropout] [--workdir DIR]

(or MEGATRON_DEEPSPEED=PATH instead of --megatron; without a checkout it says so and exits 0; it exits 1
when a run fails or the engines differ).

A tiny indexed dataset is made with Megatron's own tools/preprocess_data.py (NullTokenizer, generated
integer text) in the work dir. Each configuration trains a GPT (4 layers, hidden 64, 4 heads, seq 32, vocab
128) for 10 iterations, micro-batch 1 x 4 gradient-accumulation steps, fp32, Megatron's Adam (weight decay
0.01), gradient clipping 1.0, validation every 5 iterations, then saves a checkpoint; one torchrun process
per rank on the CPU over gloo. Both engines run launch.py, which runs pretrain_gpt.py with runpy and, for
`ours`, first calls deepspeed_pipe_ext.run_deepspeed_pipelines_on_this_engine(); a run whose ranks built
another engine class than the one asked for fails. Compared: the exact training losses, gradient
norms and validation losses (launch.py records them as float.hex), Megatron's printed iteration and
validation lines (timings left out), and every tensor of the saved checkpoint files (weights, optimizer
states, RNG states), bitwise, key by key.

What the harness provides, because it is not ours to fix on a CPU with DeepSpeed 0.19:
- stubs/ on PYTHONPATH, import-only stand-ins: `deepspeed.compression.compress` (removed in DeepSpeed
  0.19, imported unconditionally by megatron/training.py), `torchvision` (no CPU build here; imported
  by Megatron's vision datasets), `transformers` (imported by Megatron's tokenizers; NullTokenizer
  does not use it).
- micro-batch size 1: at micro-batch > 1 Megatron's ParallelAttention fails on DeepSpeed's engine too
  (query_layer.view on a non-contiguous q/k/v: "view size is not compatible"), fixed upstream later;
  no patch is applied.
- no fused kernels or CUDA-only paths: --no-masked-softmax-fusion --no-bias-gelu-fusion
  --no-bias-dropout-fusion --no-gradient-accumulation-fusion --no-async-tensor-model-parallel-allreduce,
  --distributed-backend gloo, and `zero_allow_untested_optimizer` (Megatron passes torch's Adam).
- LOCAL_SIZE=<ranks>: DeepSpeed's CPU accelerator then counts one device per rank, so Megatron's
  local rank agrees with torchrun's; Megatron's dataset helpers are built first (see build_dataset_helpers).
"""
import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

CONFIGS = {  # name: (tensor-parallel size, ZeRO stage, extra Megatron arguments)
    "pp2": (1, 0, []),
    "pp2-tp2": (2, 0, []),
    "pp2-ckpt": (1, 0, ["--checkpoint-activations", "--deepspeed-activation-checkpointing"]),
    "pp2-zero1": (1, 1, []),
    "pp2-dropout": (1, 0, ["--attention-dropout", "0.1", "--hidden-dropout", "0.1"]),
}
PP, MICRO_BATCH, ACCUMULATION, ITERATIONS = 2, 1, 4, 10
ENGINE_CLASSES = {"deepspeed": "deepspeed.runtime.pipe.engine.PipelineEngine",
                  "ours": "deepspeed_pipe_ext.engine.PipelineEngine"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(megatron):
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                PYTHONPATH=os.pathsep.join([os.path.join(HERE, "stubs"), megatron, REPO]))


def build_dataset_helpers(megatron):
    """Megatron's C++ dataset helpers, built in the checkout with this venv's pybind11 (its Makefile runs
    `python3 -m pybind11`). Only this make sees the venv first on PATH: a changed PATH in the training runs
    would make DeepSpeed rebuild its JIT shm_comm op (tens of seconds) for them and again for the next
    process without it."""
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    subprocess.run(["make", "-C", os.path.join(megatron, "megatron", "data")], env=dict(os.environ, PATH=path),
                   check=True, stdout=subprocess.DEVNULL, timeout=600)


def make_dataset(megatron, workdir):
    prefix = os.path.join(workdir, "data", "tiny")
    if os.path.exists(prefix + "_text_document.idx"):
        return prefix + "_text_document"
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    rng = random.Random(0)
    with open(prefix + ".jsonl", "w") as out:
        for _ in range(200):
            words = [str(rng.randrange(127)) for _ in range(rng.randint(20, 120))]
            out.write(json.dumps({"text": " ".join(words)}) + "\n")
    subprocess.run([sys.executable, os.path.join(megatron, "tools", "preprocess_data.py"), "--input", prefix + ".jsonl",
                    "--output-prefix", prefix, "--tokenizer-type", "NullTokenizer", "--vocab-size", "127",
                    "--append-eod", "--workers", "1"], env=environment(megatron), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    return prefix + "_text_document"


def megatron_arguments(data, tp, zero, extra, save, ds_config_path):
    global_batch = MICRO_BATCH * ACCUMULATION
    args = f"""--tensor-model-parallel-size {tp} --pipeline-model-parallel-size {PP}
        --num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --max-position-embeddings 32
        --micro-batch-size {MICRO_BATCH} --global-batch-size {global_batch} --train-iters {ITERATIONS}
        --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters 2 --clip-grad 1.0 --seed 1234
        --eval-interval 5 --eval-iters 2 --log-interval 1 --save {save} --save-interval {ITERATIONS}
        --data-path {data} --split 90,10,0 --data-impl mmap --num-workers 0
        --tokenizer-type NullTokenizer --vocab-size 127 --distributed-backend gloo
        --attention-dropout 0 --hidden-dropout 0
        --no-masked-softmax-fusion --no-bias-gelu-fusion --no-bias-dropout-fusion
        --no-gradient-accumulation-fusion --no-async-tensor-model-parallel-allreduce
        --deepspeed --deepspeed_config {ds_config_path} --zero-stage {zero}""".split()
    return args + extra  # later arguments win (dropout)


def ds_config(zero):
    return {"train_batch_size": MICRO_BATCH * ACCUMULATION, "train_micro_batch_size_per_gpu": MICRO_BATCH,
            "gradient_accumulation_steps": ACCUMULATION, "gradient_clipping": 1.0, "steps_per_print": 10**9,
            "zero_optimization": {"stage": zero}, "zero_allow_untested_optimizer": True,
            "fp16": {"enabled": False}, "bf16": {"enabled": False}, "wall_clock_breakdown": False}


def run(megatron, workdir, data, name, engine, timeout):
    tp, zero, extra = CONFIGS[name]
    out = os.path.join(workdir, name, engine)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    with open(os.path.join(out, "ds_config.json"), "w") as f:
        json.dump(ds_config(zero), f)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(PP * tp),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               os.path.join(HERE, "launch.py"), "--engine", engine, "--record", out,
               os.path.join(megatron, "pretrain_gpt.py")]
    command += megatron_arguments(data, tp, zero, extra, os.path.join(out, "checkpoint"),
                                  os.path.join(out, "ds_config.json"))
    # LOCAL_SIZE: DeepSpeed's CPU accelerator counts one device per rank (as its own launcher sets),
    # so Megatron's local_rank = rank % device_count matches torchrun's LOCAL_RANK.
    env = dict(environment(megatron), LOCAL_SIZE=str(PP * tp))
    start = time.time()
    with open(os.path.join(out, "log.txt"), "w") as log:
        job = subprocess.Popen(command, cwd=megatron, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
        try:
            rc = job.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)  # torchrun and its ranks
            job.wait()
            rc = "timeout"
    seconds = time.time() - start
    classes = recorded(out)[0]
    if rc == 0 and classes != {ENGINE_CLASSES[engine]}:  # the comparison would be vacuous
        rc = f"ran {sorted(classes)}"
    return {"dir": out, "rc": rc, "seconds": seconds}


def iteration_seconds(log_path):
    """Megatron's printed time per iteration, summed over the run (startup and checkpointing excluded)."""
    return sum(float(line.split("elapsed time per iteration (ms):")[1].split("|")[0]) / 1000
               for line in open(log_path, errors="replace") if "elapsed time per iteration (ms):" in line)


def printed_lines(log_path):
    """Megatron's printed iteration lines without their timings (loss, learning rate, grad norm, skipped
    iterations, ...), and its validation lines."""
    train, valid = [], []
    for line in open(log_path, errors="replace"):
        if " iteration " in line and "lm loss:" in line:
            train.append([field.strip() for field in line.split("|") if not any(
                word in field for word in ("elapsed time", "per second", "TFLOPs"))])
        elif "validation loss at" in line:
            valid.append(line.strip())
    return train, valid


def recorded(out):
    """What launch.py recorded: (the engine classes the ranks ran,
    {rank file: {'train': [loss dicts], 'eval': [loss dicts]}} with exact floats)."""
    classes, losses = set(), {}
    for name in sorted(os.listdir(out)):
        if name.startswith("losses_rank"):
            kinds = losses[name] = {"train": [], "eval": []}
            for line in open(os.path.join(out, name)):
                entry = json.loads(line)
                kind = entry.pop("kind")
                if kind == "engine":
                    classes.add(entry["engine"])
                else:
                    kinds[kind].append({k: float.fromhex(v) for k, v in entry.items()})
    return classes, losses


def tensors(obj, prefix=""):
    import torch
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from tensors(value, f"{prefix}[{i}]")


def checkpoint_tensors(root, megatron):
    import torch
    for path in (megatron, os.path.join(HERE, "stubs")):  # the files pickle Megatron's args
        if path not in sys.path:
            sys.path.insert(0, path)
    found = {}
    for folder, _, files in os.walk(root):
        for name in sorted(files):
            if name.endswith(".pt"):
                path = os.path.join(folder, name)
                for key, tensor in tensors(torch.load(path, map_location="cpu", weights_only=False)):
                    found[f"{os.path.relpath(path, root)}:{key}"] = tensor
    return found


def compare(reference, ours, megatron):
    """What differs between two runs' losses and checkpoints."""
    import torch
    report = {}
    exact_a, exact_b = recorded(reference["dir"])[1], recorded(ours["dir"])[1]
    for kind in ("train", "eval"):
        a, b = ({(rank, i, key): value for rank in exact_a for i, entry in enumerate(run.get(rank, {}).get(kind, []))
                 for key, value in entry.items()} for run in (exact_a, exact_b))
        if not a or set(a) != set(b):
            report[kind] = "missing"
            continue
        diff = max(abs(a[key] - b[key]) for key in a)
        report[kind] = f"bitwise ({len(a)})" if all(a[key] == b[key] for key in a) else f"max diff {diff:.3g}"
    printed_a, printed_b = printed_lines(os.path.join(reference["dir"], "log.txt")), \
        printed_lines(os.path.join(ours["dir"], "log.txt"))
    report["printed"] = "same" if printed_a == printed_b and printed_a[0] else "differ"
    a, b = checkpoint_tensors(os.path.join(reference["dir"], "checkpoint"), megatron), \
        checkpoint_tensors(os.path.join(ours["dir"], "checkpoint"), megatron)
    differing = {}
    for key in sorted(set(a) | set(b)):
        if key not in a or key not in b:
            differing[key] = "only in " + ("deepspeed" if key in a else "ours")
        elif a[key].shape != b[key].shape or a[key].dtype != b[key].dtype:
            differing[key] = f"{tuple(a[key].shape)}/{a[key].dtype} vs {tuple(b[key].shape)}/{b[key].dtype}"
        elif not torch.equal(a[key], b[key]):
            differing[key] = f"max abs diff {(a[key].double() - b[key].double()).abs().max().item():.3g}"
    report["weights"] = f"equal ({len(a)} tensors)" if a and not differing else f"{len(differing)} of {len(a)} differ"
    report["differing"] = differing
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--megatron", default=os.environ.get("MEGATRON_DEEPSPEED"),
                        help="a Megatron-DeepSpeed checkout (default: $MEGATRON_DEEPSPEED)")
    parser.add_argument("--engine", choices=["deepspeed", "ours", "both"], default="both")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "megatron_pipe_runs"))
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per run")
    args = parser.parse_args()
    if not args.megatron or not os.path.isfile(os.path.join(args.megatron, "pretrain_gpt.py")):
        print("No Megatron-DeepSpeed checkout given or found (--megatron PATH or MEGATRON_DEEPSPEED=PATH, a "
              "directory with pretrain_gpt.py): nothing to run.")
        return 0
    megatron = os.path.abspath(args.megatron)
    engines = ["deepspeed", "ours"] if args.engine == "both" else [args.engine]
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; known: {', '.join(CONFIGS)}")
    build_dataset_helpers(megatron)
    data = make_dataset(megatron, args.workdir)
    rows = []
    for name in names:
        runs = {engine: run(megatron, args.workdir, data, name, engine, args.timeout) for engine in engines}
        for engine, result in runs.items():
            print(f"{name} {engine}: exit {result['rc']} in {result['seconds']:.0f} s, log {result['dir']}/log.txt",
                  flush=True)
        report = {}
        if len(runs) == 2 and all(r["rc"] == 0 for r in runs.values()):
            report = compare(runs["deepspeed"], runs["ours"], megatron)
            for key, what in report["differing"].items():
                print(f"  {name}: {key}: {what}")
        rows.append((name, runs, report))
    header = ("config", "engine", "exit", "train loss+grad norm", "eval loss", "printed", "checkpoint", "wall s",
              "iterations s")
    table = [header]
    for name, runs, report in rows:
        for engine, result in runs.items():
            compared = engine == "ours" and report
            table.append((name, engine, str(result["rc"]),
                          report.get("train", "") if compared else "", report.get("eval", "") if compared else "",
                          report.get("printed", "") if compared else "",
                          report.get("weights", "") if compared else "", f"{result['seconds']:.0f}",
                          f"{iteration_seconds(os.path.join(result['dir'], 'log.txt')):.2f}"))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
    failed = any(r["rc"] != 0 for _, runs, _ in rows for r in runs.values())
    differ = any(report and (report["differing"] or not report["train"].startswith("bitwise")
                             or not report["eval"].startswith("bitwise") or report["printed"] != "same")
                 for _, _, report in rows)
    return 1 if failed or differ else 0


if __name__ == "__main__":
    sys.exit(main())
