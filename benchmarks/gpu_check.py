"""The GPU check: what can be proven on one NVIDIA GPU, in one run, with every
figure printed in one summary (and written to <out>/gpu_check.json).

    bash benchmarks/gpu_check.sh        # builds the extension, then runs this

1. S=1 on CUDA over NCCL: our engine's losses (and weights, skipped steps)
   against DeepSpeed's PipelineEngine for fp32, bf16 and fp16 (dynamic loss
   scale, with one micro-batch whose labels make the fp16 loss overflow).
2. Activation checkpointing with dropout on CUDA: gradients bitwise equal to
   no checkpointing (reentrant and non-reentrant).
3. S=2 in two processes on the one GPU over gloo: the transfers are staged
   through pinned host memory; losses equal to S=1 on the same GPU. Rank 0
   also records a torch.profiler trace of one step (CPU and CUDA activity).
4. Overhead-bound train_batch at S=1 (many tiny layers, 32 micro-batches):
   DeepSpeed's engine against ours, alternating repetitions, medians.
5. PP=2 x TP=2 in four processes on the one GPU over gloo: a tensor-parallel
   MLP whose stage links are split across the tensor-parallel ranks
   (pipe_partitioned / grad_partitioned) and gathered on arrival; the same
   losses with the split off and under gpipe and zb-h1; 1/TP of the bytes.
6. A failed batch at S=2 on the one GPU: a forward, a loss and a data
   iterator raising on one rank; every rank stops at once, no weight moves,
   the next batch refuses (the host-staged transfers are aborted).
7. Several ranks on the one GPU over NCCL (benchmarks/gpu_check_nccl.py; needs
   NCCL 2.30+, which `make nccl` builds and gpu_check.sh preloads): S=2 under
   1f1b, gpipe and zb-h1 in fp32, bf16 and fp16; interleaved-1f1b and zb-v with
   fixed and dynamic shapes; S=4; PP=2 x TP=2; a failed batch; each rank's
   recorded transfers replayed through the NCCL-order checker; a profiled
   compute-bound step (transfer time hidden behind compute); overhead-bound
   train_batch at S=2 against DeepSpeed.
"""
import argparse
import json
import os
import socket
import statistics
import sys
import time
import traceback

RESULTS = {}
# --cpu-dry-run runs the same code on the CPU over gloo (to check the script
# itself before spending GPU time); the figures mean nothing there.
DEVICE, BACKEND = "cuda", "nccl"
# --budget-s: a section that would start after this (time.monotonic()) is skipped, so that a slow run returns
# its summary within the device machine's per-call limit instead of being cut off mid-section.
DEADLINE = None


def sync():
    import torch
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def section(name):
    def wrap(fn):
        def run(*args, **kwargs):
            if DEADLINE is not None and time.monotonic() > DEADLINE:
                RESULTS[name] = {"ok": False, "seconds": 0.0,
                                 "error": "skipped: the check's --budget-s was spent before this section started"}
                print(f"[{name}] skipped: out of budget", flush=True)
                return
            start = time.perf_counter()
            try:
                RESULTS[name] = {"ok": True, **fn(*args, **kwargs)}
            except Exception:
                RESULTS[name] = {"ok": False, "error": traceback.format_exc()[-3000:]}
            RESULTS[name]["seconds"] = round(time.perf_counter() - start, 1)
            print(f"[{name}] {json.dumps(RESULTS[name], default=str)[:1500]}", flush=True)
        run.section_name = name
        run.__wrapped__ = fn  # the body alone, for a section that reruns another's on another backend
        return run
    return wrap


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join(rank, world_size, port, backend):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE=str(world_size))  # every rank on the one GPU
    import deepspeed
    if backend == "gloo":
        # Joined without a bound device: DeepSpeed binds the default group to the GPU on a CUDA machine,
        # and torch then builds new groups by splitting it, which gloo cannot do.
        import torch.distributed as dist
        dist.init_process_group(backend="gloo", init_method="env://")
    deepspeed.init_distributed(dist_backend=backend, verbose=False)


def mlp_specs(spec, width=64, depth=6):
    import torch.nn as nn
    layers = [spec(nn.Linear, 16, width)]
    for _ in range(depth):
        layers += [spec(nn.Linear, width, width), nn.GELU()]
    return layers + [spec(nn.Linear, width, 4)]


def batches(seed, count, dtype, micro_batch=8):
    import torch
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(micro_batch, 16, generator=g).to(dtype), torch.randn(micro_batch, 4, generator=g).to(dtype))
            for _ in range(count)]


def train(engine_kind, num_stages, precision, steps, micro_batches=4, overflow_step=None, schedule=None):
    """One engine (ours or DeepSpeed's) on the MLP; the same seeds per layer."""
    import deepspeed
    import torch
    import torch.nn as nn
    from deepspeed.pipe import PipelineModule as DSPipelineModule

    import deepspeed_pipe_ext as dpe
    ours = engine_kind == "ours"
    module_cls, spec = (dpe.PipelineModule, dpe.LayerSpec) if ours else (DSPipelineModule, deepspeed.pipe.LayerSpec)
    torch.manual_seed(1)
    net = module_cls(layers=mlp_specs(spec), num_stages=num_stages, loss_fn=nn.MSELoss(), seed_layers=True,
                     partition_method="uniform")
    config = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": micro_batches,
              "steps_per_print": 10**9}
    if schedule is not None:
        config["pipeline"] = {"schedule": schedule}
    if ours:  # a hung transfer fails well within the check's own per-section limits
        config.setdefault("pipeline", {})["p2p_timeout"] = 60
    dtype = torch.float32
    if precision.startswith("bf16"):
        config["bf16"], dtype = {"enabled": True}, torch.bfloat16
    if precision.endswith("zero1"):
        config["zero_optimization"] = {"stage": 1}
        config["zero_allow_untested_optimizer"] = True
    if precision == "fp16":
        config["fp16"], dtype = {"enabled": True, "loss_scale_window": 2, "hysteresis": 1}, torch.float16
    engine, _, _, _ = deepspeed.initialize(model=net, config=config, model_parameters=net.parameters(),
                                           optimizer=torch.optim.AdamW(net.parameters(), lr=1e-3))
    data = batches(7, micro_batches, dtype)
    losses = []
    for step in range(steps):
        step_data = data
        if step == overflow_step:  # labels whose squared error fp16 cannot hold: the step must be skipped
            step_data = [(x, y * 1e4) for x, y in data]
        losses.append(float(engine.train_batch(data_iter=iter(step_data))))
    weights = [p.detach().float().cpu() for p in net.parameters()]
    skipped = getattr(engine, "skipped_steps", 0)
    scale = getattr(getattr(engine.optimizer, "loss_scale_config", None), "cur_scale", None)
    return {"engine": type(engine).__module__, "losses": losses, "weights": weights, "skipped": skipped,
            "loss_scale": scale,
            "p2p_through_host": bool(getattr(getattr(engine, "p2p", None), "stages_through_host", False))}


def same_losses(a, b, rtol=1e-6):
    import math
    return len(a) == len(b) and all((x == y) or (math.isfinite(x) and abs(x - y) <= rtol * max(abs(y), 1e-12))
                                    for x, y in zip(a, b))


@section("S=1 on CUDA over NCCL, ours vs DeepSpeed")
def parity_s1():
    import torch
    out = {}
    for precision in ("fp32", "bf16", "fp16", "bf16-zero1"):
        overflow = 2 if precision == "fp16" else None
        theirs = train("deepspeed", 1, precision, 6, overflow_step=overflow)
        ours = train("ours", 1, precision, 6, overflow_step=overflow)
        assert ours["engine"] == "deepspeed_pipe_ext.engine", ours["engine"]
        weights_equal = all(torch.equal(a, b) for a, b in zip(ours["weights"], theirs["weights"]))
        out[precision] = {"losses_equal": same_losses(ours["losses"], theirs["losses"]),
                          "weights_bitwise_equal": weights_equal, "skipped_ours": ours["skipped"],
                          "skipped_deepspeed": theirs["skipped"], "loss_scale_ours": ours["loss_scale"],
                          "loss_scale_deepspeed": theirs["loss_scale"], "losses_ours": ours["losses"],
                          "losses_deepspeed": theirs["losses"]}
    out["all_equal"] = all(v["losses_equal"] and v["skipped_ours"] == v["skipped_deepspeed"]
                           for v in out.values() if isinstance(v, dict))
    # The overflowing step: its loss is inf, the scale falls, and the next loss is finite (the step was skipped).
    fp16 = out["fp16"]
    out["fp16_overflow_skipped"] = (fp16["losses_ours"][2] == float("inf") and fp16["losses_ours"][3] < 10
                                    and fp16["loss_scale_ours"] == fp16["loss_scale_deepspeed"])
    assert out["all_equal"] and out["fp16_overflow_skipped"], out
    return out


@section("activation checkpointing with dropout on CUDA")
def checkpoint_dropout():
    import torch
    import torch.nn as nn

    from deepspeed_pipe_ext import activation_checkpointing as ac
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.Dropout(0.3), nn.GELU(), nn.Linear(256, 64),
                          nn.Dropout(0.2)).to(DEVICE)
    x = torch.randn(32, 64, device=DEVICE, requires_grad=True)
    rng = torch.cuda if DEVICE == "cuda" else torch
    params = list(model.parameters())

    def grads(run):
        for p in params:
            p.grad = None
        x.grad = None
        rng.manual_seed(123)
        run().square().sum().backward()
        return [x.grad.clone()] + [p.grad.clone() for p in params], rng.get_rng_state()

    plain, plain_rng = grads(lambda: model(x))
    reentrant, re_rng = grads(lambda: ac.checkpoint(model, x))
    non_reentrant, nr_rng = grads(lambda: ac.non_reentrant_checkpoint(model, x, params=params))
    out = {"reentrant_bitwise_equal": all(torch.equal(a, b) for a, b in zip(plain, reentrant)),
           "non_reentrant_bitwise_equal": all(torch.equal(a, b) for a, b in zip(plain, non_reentrant)),
           "rng_state_after_equal": torch.equal(plain_rng, re_rng) and torch.equal(plain_rng, nr_rng)}
    assert all(out.values()), out
    return out


def _worker(rank, world_size, port, queue, device, body, backend="gloo"):
    """A spawned rank: joins a group (gloo, or NCCL where it admits several ranks on one GPU) on the one GPU,
    runs body(rank, world_size), reports."""
    global DEVICE
    DEVICE = device
    import faulthandler
    faulthandler.enable(all_threads=True)  # a crash shows every thread's Python stack
    from deepspeed_pipe_ext._native import _C
    _C.print_native_stack_on_crash()  # ... after the native one
    phase = "join"  # whether a failure came while joining the group (NCCL refusing ranks) or in the body
    try:
        dry_run_patches()
        join(rank, world_size, port, backend)
        phase = "body"
        result = body(rank, world_size)
        result.pop("weights", None)
        queue.put((rank, result))
    except Exception:
        queue.put((rank, {"error": traceback.format_exc()[-3000:], "phase": phase}))


def _s2_body(rank, world_size, out_dir):
    result = train("ours", world_size, "fp32", 6)
    result["losses_by_schedule"] = {kind: train("ours", world_size, "fp32", 6, schedule=kind)["losses"]
                                    for kind in ("gpipe", "zb-h1")}
    # One more step under torch.profiler: the pipe labels and the CUDA kernels, as a Chrome trace.
    import deepspeed
    import torch
    import torch.nn as nn
    from torch.profiler import ProfilerActivity, profile

    import deepspeed_pipe_ext as dpe
    torch.manual_seed(1)
    net = dpe.PipelineModule(layers=mlp_specs(dpe.LayerSpec), num_stages=world_size, loss_fn=nn.MSELoss(),
                             seed_layers=True, partition_method="uniform")
    engine, _, _, _ = deepspeed.initialize(model=net, config={"train_micro_batch_size_per_gpu": 8,
                                                              "gradient_accumulation_steps": 4,
                                                              "steps_per_print": 10**9},
                                           model_parameters=net.parameters(),
                                           optimizer=torch.optim.AdamW(net.parameters(), lr=1e-3))
    data = batches(7, 4, torch.float32)
    engine.train_batch(data_iter=iter(data))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with profile(activities=activities) as prof:
        engine.train_batch(data_iter=iter(data))
        sync()
    if rank == 0:
        prof.export_chrome_trace(os.path.join(out_dir, "s2_stage0_trace.json"))
    result["profiled_pipe_labels"] = sorted({e.name for e in prof.events() if e.name.startswith("pipe stage")})
    return result


def _s2_worker(rank, world_size, port, out_dir, queue, device):
    _worker(rank, world_size, port, queue, device, lambda r, w: _s2_body(r, w, out_dir))


def _s1_gloo_worker(rank, world_size, port, out_dir, queue, device):
    _worker(rank, world_size, port, queue, device, lambda r, w: train("ours", 1, "fp32", 6))


def spawn(worker, world_size, out_dir, timeout=240):
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world_size, port, out_dir, queue, DEVICE))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results = {}
    deadline = time.monotonic() + timeout
    while len(results) < world_size and time.monotonic() < deadline:
        try:
            rank, value = queue.get(timeout=5)
            results[rank] = value
        except Exception:
            if all(not p.is_alive() for p in procs) and queue.empty():
                break
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
    return results


@section("S=2 in two processes on one GPU over gloo (host-staged transfers) vs S=1")
def host_staged_s2(out_dir):
    s2 = spawn(_s2_worker, 2, out_dir)
    s1 = spawn(_s1_gloo_worker, 1, out_dir)
    assert all("error" not in r for r in list(s2.values()) + list(s1.values())), (s2, s1)
    assert same_losses(s2[0]["losses"], s1[0]["losses"]), (s2[0]["losses"], s1[0]["losses"])
    assert all(same_losses(losses, s1[0]["losses"]) for losses in s2[0]["losses_by_schedule"].values())
    return {"losses_s2": s2[0]["losses"], "losses_s1": s1[0]["losses"],
            "losses_equal": same_losses(s2[0]["losses"], s1[0]["losses"]),
            "loss_falls": s2[0]["losses"][-1] < s2[0]["losses"][0],
            "gpipe_zbh1_losses_equal": {kind: same_losses(losses, s1[0]["losses"])
                                        for kind, losses in s2[0]["losses_by_schedule"].items()},
            "stages_through_host": [s2[r]["p2p_through_host"] for r in sorted(s2)],
            "profiled_labels": {r: [n for n in s2[r]["profiled_pipe_labels"] if "mb 1" in n] for r in sorted(s2)}}


def overhead_side_by_side(num_stages, repeats, micro_batches=32, layers=32):
    """DeepSpeed's engine and ours on many tiny layers (the runtime's own cost dominates), alternating
    train_batch calls after two warm-up rounds; medians in ms. Every rank of the job calls it."""
    import deepspeed
    import torch
    import torch.nn as nn
    from deepspeed.pipe import PipelineModule as DSPipelineModule

    import deepspeed_pipe_ext as dpe

    def build(module_cls, spec):
        torch.manual_seed(0)
        net = module_cls(layers=[spec(nn.Linear, 8, 8) for _ in range(layers)], num_stages=num_stages,
                         loss_fn=nn.MSELoss(), partition_method="uniform")
        engine, _, _, _ = deepspeed.initialize(model=net, config={"train_micro_batch_size_per_gpu": 1,
                                                                  "gradient_accumulation_steps": micro_batches,
                                                                  "steps_per_print": 10**9},
                                               model_parameters=net.parameters(),
                                               optimizer=torch.optim.SGD(net.parameters(), lr=1e-4))
        return engine

    engines = {"deepspeed": build(DSPipelineModule, deepspeed.pipe.LayerSpec),
               "ours": build(dpe.PipelineModule, dpe.LayerSpec)}
    batch = (torch.randn(1, 8), torch.randn(1, 8))
    times = {name: [] for name in engines}
    for rep in range(repeats + 2):
        for name, engine in engines.items():
            sync()
            start = time.perf_counter()
            engine.train_batch(data_iter=iter([batch] * micro_batches))
            sync()
            if rep >= 2:
                times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    return {"layers": layers, "micro_batches": micro_batches, "deepspeed_ms": round(med["deepspeed"], 2),
            "ours_ms": round(med["ours"], 2), "speedup": round(med["deepspeed"] / med["ours"], 2)}


@section("overhead-bound train_batch at S=1 on CUDA: DeepSpeed vs ours")
def overhead_s1(repeats=15):
    return overhead_side_by_side(1, repeats)


def _tests_on_path():
    tests = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "distributed")
    if tests not in sys.path:
        sys.path.insert(0, tests)


TP_CONFIGS = {"split": {}, "unsplit": {"pipe_partitioned": False, "grad_partitioned": False},
              "split gpipe": {"schedule": "gpipe"}, "split zb-h1": {"schedule": "zb-h1"}}


def _tp_worker(rank, world_size, port, out_dir, queue, device, backend="gloo"):
    def body(rank, world_size):
        _tests_on_path()
        import tensor_parallel_cases as cases
        runs = cases.train(rank, world_size, list(TP_CONFIGS.values()), steps=6, engines="ours")
        out = {}
        for name, (run, ) in zip(TP_CONFIGS, runs):
            out[name] = {"losses": run["losses"], "eval": run["eval"], "sent": run["sent"], "flags": run["flags"],
                         "weights_on": sorted({str(w.device) for w in run["weights"].values()})}
        return out
    _worker(rank, world_size, port, queue, device, body, backend)


@section("PP=2 x TP=2 in four processes on one GPU over gloo: split transfers, every schedule")
def tensor_parallel_split(out_dir, backend="gloo"):
    import functools
    runs = spawn(functools.partial(_tp_worker, backend=backend), 4, out_dir)
    assert len(runs) == 4 and all("error" not in r for r in runs.values()), runs
    last = runs[3]  # a last-stage rank: it holds the losses
    split, unsplit = last["split"]["losses"], last["unsplit"]["losses"]
    sent = {name: runs[0][name]["sent"] for name in ("split", "unsplit")}
    assert same_losses(split, unsplit) and split[-1] < split[0], (split, unsplit)
    assert all(same_losses(last[name]["losses"], split) for name in ("split gpipe", "split zb-h1"))
    return {"losses_split": split, "losses_unsplit": unsplit,
            "split_equals_unsplit": same_losses(split, unsplit),
            "gpipe_zbh1_equal": {name: same_losses(last[name]["losses"], split)
                                 for name in ("split gpipe", "split zb-h1")},
            "loss_falls": split[-1] < split[0], "eval_equal": last["split"]["eval"] == last["unsplit"]["eval"],
            "stage0_activation_send_bytes": sent, "flags_split": last["split"]["flags"],
            "weights_on": last["split"]["weights_on"]}


FAULT_CASES = {"forward": (0, 0), "loss": (1, 0), "load": (0, 0)}  # case: the victim's (stage, data-parallel rank)


def _fault_worker(case, rank, world_size, port, out_dir, queue, device, backend="gloo"):
    def body(rank, world_size):
        import faulthandler
        faulthandler.dump_traceback_later(45, exit=True)  # a hang shows every thread's stack, then ends the rank
        _tests_on_path()
        import fault_cases
        print(f"[fault case {case}] rank {rank} starts", file=sys.stderr, flush=True)
        result = fault_cases.callback_failures(rank, world_size, {case: FAULT_CASES[case]})
        print(f"[fault case {case}] rank {rank} done: {result}", file=sys.stderr, flush=True)
        faulthandler.cancel_dump_traceback_later()
        return result
    _worker(rank, world_size, port, queue, device, body, backend)


@section("a failed batch at S=2 on one GPU over gloo: every rank stops, nothing steps")
def failed_batch(out_dir, backend="gloo"):
    import functools
    out = {}
    cases = os.environ.get("GPU_CHECK_FAULT_CASES", ",".join(FAULT_CASES)).split(",")
    for case in cases:  # one job per case, so that a hang in one leaves the others' figures
        runs = spawn(functools.partial(_fault_worker, case, backend=backend), 2, out_dir, timeout=75)
        if len(runs) < 2 or any("error" in r for r in runs.values()):
            out[case] = {"failed": {rank: r.get("error", "")[-600:] for rank, r in runs.items()}, "ranks_reported":
                         sorted(runs)}
            continue
        ranks = [runs[r][case] for r in sorted(runs)]
        out[case] = {"every_rank_raised": all(r["error"] is not None for r in ranks),
                     "seconds_max": round(max(r["seconds"] for r in ranks), 3),
                     "weights_unchanged": all(r["weights_unchanged"] for r in ranks),
                     "next_batch_refused": all(r["next"] is not None for r in ranks),
                     "errors": [f"{r['error'][0]}: {r['error'][1][:160]}" for r in ranks if r["error"]]}
    out["all_stopped_within_5s"] = all(v.get("every_rank_raised") and v["seconds_max"] < 5 and v["weights_unchanged"]
                                       and v["next_batch_refused"] for v in out.values())
    assert out["all_stopped_within_5s"], out
    return out


def dry_run_patches():
    """On the CPU, DeepSpeed refuses fp16 unless its accelerator says otherwise."""
    if DEVICE == "cpu":
        from deepspeed.accelerator import get_accelerator
        get_accelerator().is_fp16_supported = lambda: True


def environment():
    import subprocess

    import deepspeed
    import torch
    if DEVICE == "cpu":
        return {"gpu": "none (CPU dry run)", "nvidia_smi": "", "torch": torch.__version__, "cuda": None, "nccl": None,
                "deepspeed": deepspeed.__version__, "python": sys.version.split()[0]}
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
    try:
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception as err:
        nccl = f"unknown ({err})"
    return {"gpu": torch.cuda.get_device_name(0), "nvidia_smi": smi, "torch": torch.__version__,
            "cuda": torch.version.cuda, "nccl": nccl, "deepspeed": deepspeed.__version__,
            "python": sys.version.split()[0], "ld_preload": os.environ.get("LD_PRELOAD", ""),
            "nccl_env": {k: v for k, v in os.environ.items() if k.startswith("NCCL_")}}


def save_results(out_dir):
    with open(os.path.join(out_dir, "gpu_check.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="out/gpu_check")
    parser.add_argument("--cpu-dry-run", action="store_true", help="check this script on a machine without a GPU")
    parser.add_argument("--only", nargs="*", default=None,
                        help="run only the sections whose names contain one of these")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip the sections that would start this many seconds after the check began")
    args = parser.parse_args()
    global DEVICE, BACKEND, DEADLINE
    if args.budget_s is not None:
        DEADLINE = time.monotonic() + args.budget_s
    if args.cpu_dry_run:
        DEVICE, BACKEND = "cpu", "gloo"
        dry_run_patches()
    os.makedirs(args.out, exist_ok=True)
    RESULTS["environment"] = environment()
    print(f"[environment] {RESULTS['environment']}", flush=True)
    save_results(args.out)
    join(0, 1, free_port(), BACKEND)
    sys.modules.setdefault("gpu_check", sys.modules[__name__])  # one module for the NCCL sections' `import gpu_check`
    import gpu_check_nccl
    # The failed batches first: if a rank still crashes, its native stack is the first thing the run prints.
    sections = [(failed_batch, (args.out, )), (gpu_check_nccl.failed_batch_nccl, (args.out, )), (parity_s1, ()),
                (checkpoint_dropout, ()), (overhead_s1, ()), (host_staged_s2, (args.out, )),
                (tensor_parallel_split, (args.out, ))]
    sections += [(run, (args.out, )) for run in gpu_check_nccl.SECTIONS if run is not gpu_check_nccl.failed_batch_nccl]
    for run, run_args in sections:
        if args.only is None or any(word in run.section_name for word in args.only):
            run(*run_args)
            save_results(args.out)  # after each section: a run cut off keeps what finished
    print("\n==== summary ====")
    env = RESULTS["environment"]
    print(f"{env['gpu']} ({env['nvidia_smi']}), torch {env['torch']}, CUDA {env['cuda']}, NCCL {env['nccl']}, "
          f"DeepSpeed {env['deepspeed']}")
    for name, r in RESULTS.items():
        if name == "environment":
            continue
        long = {"losses_ours", "losses_deepspeed", "losses_s1", "losses_s2", "error", "losses_split", "losses_unsplit",
                "errors", "report"}
        shown = {k: ({kk: vv for kk, vv in v.items() if kk not in long} if isinstance(v, dict) else v)
                 for k, v in r.items() if k not in long}
        print(f"{'PASS' if r.get('ok') else 'FAIL'}  {name}: {json.dumps(shown, default=str)[:900]}")
        if not r.get("ok"):
            print("      " + r["error"].strip().splitlines()[-1])
    failed = [name for name, r in RESULTS.items() if name != "environment" and not r.get("ok")]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
