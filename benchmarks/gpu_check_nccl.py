"""The GPU check's sections with several ranks on the one GPU over NCCL
(benchmarks/gpu_check.py runs them; `--only nccl` picks them alone).

NCCL 2.30 and later put several ranks on one GPU when
NCCL_MULTI_RANK_GPU_ENABLE=1 is set (gpu_check.sh sets it, with
NCCL_NVLS_ENABLE=0 and NCCL_MAX_CTAS=2, and preloads the NCCL that `make nccl`
built). Older NCCL refuses ("Duplicate GPU detected"): these sections then say
which NCCL was loaded and stop. Under --cpu-dry-run they run the same code over
gloo; the figures mean nothing there.

Each section compares with DeepSpeed's own engine run in the same processes
(same seeds, same data), as the CPU tests do.
"""
import functools
import math
import os
import statistics
import sys
import time
from unittest import mock

import gpu_check as base

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MULTI_RANK_NCCL = (2, 30, 0)


def multi_rank_backend():
    """'nccl' where NCCL admits several ranks on one GPU; 'gloo' in a CPU dry run. The parent asks too, before
    spawning, so that a missing NCCL is one clear error, not one per rank."""
    if base.DEVICE == "cpu":
        return "gloo"
    import torch
    version = tuple(torch.cuda.nccl.version())
    if version < MULTI_RANK_NCCL:
        raise RuntimeError(f"torch loaded NCCL {'.'.join(map(str, version))}; several ranks on one GPU need NCCL 2.30 "
                           "or later: run `make nccl` and carry build/nccl/libnccl.so.2.xz (gpu_check.sh preloads it)")
    if os.environ.get("NCCL_MULTI_RANK_GPU_ENABLE") != "1":
        raise RuntimeError("NCCL_MULTI_RANK_GPU_ENABLE=1 is not set (gpu_check.sh sets it)")
    return "nccl"


def _nccl_worker(body, env, rank, world_size, port, out_dir, queue, device):
    """A spawned rank on the one GPU over NCCL (gloo in a dry run): runs body(rank, world_size, out_dir)."""
    os.environ.update(env)
    base.DEVICE = device
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)  # tests.distributed's cases
    backend = multi_rank_backend()
    base._worker(rank, world_size, port, queue, device, lambda r, w: body(r, w, out_dir), backend=backend)


def spawn(body, world_size, out_dir, env=None, timeout=180):
    return base.spawn(functools.partial(_nccl_worker, body, dict(env or {})), world_size, out_dir, timeout=timeout)


def _failed(runs, world_size):
    return len(runs) < world_size or any("error" in r for r in runs.values())


def _errors(runs):
    return {rank: r.get("error", "")[-1500:] for rank, r in runs.items() if "error" in r}


# --- S=2: the first real test of the transfer plan ---------------------------------------------------------------

PRECISIONS = ("fp32", "bf16", "fp16")


def _schedules_body(rank, world_size, out_dir):
    import torch
    steps = 4 if base.DEVICE == "cuda" else 3
    out = {"backend": _backend_name(), "nccl_loaded": _nccl_loaded()}
    for precision in PRECISIONS:
        overflow = 1 if precision == "fp16" else None
        theirs = base.train("deepspeed", 2, precision, steps, overflow_step=overflow)
        runs = {}
        # Split backward (zb-h1) runs without DeepSpeed's fp16/bf16 backward wrappers: fp32 only (the engine refuses).
        for schedule in ("1f1b", "gpipe") + (("zb-h1", ) if precision == "fp32" else ()):
            ours = base.train("ours", 2, precision, steps, overflow_step=overflow, schedule=schedule)
            assert ours["engine"] == "deepspeed_pipe_ext.engine", ours["engine"]
            runs[schedule] = {
                "losses": ours["losses"], "skipped": ours["skipped"], "loss_scale": ours["loss_scale"],
                "weights_bitwise_equal": all(torch.equal(a, b) for a, b in zip(ours["weights"], theirs["weights"])),
                "max_weight_difference": max(float((a - b).abs().max()) for a, b in zip(ours["weights"],
                                                                                          theirs["weights"])),
                "through_host": ours["p2p_through_host"]}
        out[precision] = {"deepspeed": {"losses": theirs["losses"], "skipped": theirs["skipped"],
                                        "loss_scale": theirs["loss_scale"]}, "ours": runs}
    return out


def _nccl_loaded():
    """The NCCL this process really loaded (the preloaded one, if the preload took)."""
    import torch
    if base.DEVICE != "cuda":
        return None
    return ".".join(map(str, torch.cuda.nccl.version()))


def _backend_name():
    import torch.distributed as dist
    return dist.get_backend()


@base.section("S=2 over NCCL, two ranks on one GPU: 1f1b, gpipe, zb-h1 x fp32, bf16, fp16 vs DeepSpeed")
def schedules_s2(out_dir):
    runs = spawn(_schedules_body, 2, out_dir)
    assert not _failed(runs, 2), _errors(runs)
    out = {"backend": runs[0]["backend"], "nccl_loaded_by_rank": [runs[r]["nccl_loaded"] for r in sorted(runs)]}
    every = True
    for precision in PRECISIONS:
        tolerance = 1e-2 if precision == "bf16" else 1e-6
        theirs = runs[1][precision]["deepspeed"]
        row = {}
        for schedule, ours in runs[1][precision]["ours"].items():
            equal = base.same_losses(ours["losses"], theirs["losses"], rtol=tolerance)
            row[schedule] = {"losses_equal": equal, "skipped_equal": ours["skipped"] == theirs["skipped"],
                             "loss_scale_equal": ours["loss_scale"] == theirs["loss_scale"],
                             "weights_bitwise_equal": all(runs[r][precision]["ours"][schedule]["weights_bitwise_equal"]
                                                          for r in runs),
                             "max_weight_difference": max(runs[r][precision]["ours"][schedule]["max_weight_difference"]
                                                          for r in runs),
                             "staged_through_host": ours["through_host"]}
            every &= equal and row[schedule]["skipped_equal"]
        row["losses_deepspeed"] = theirs["losses"]
        out[precision] = row
    # The overflowing step (1): its loss is inf in both engines, the next one finite, the loss scales equal.
    fp16 = runs[1]["fp16"]
    out["fp16_overflow_step_skipped"] = all(
        run["losses"][1] == float("inf") and math.isfinite(run["losses"][2])
        for run in [fp16["deepspeed"], *fp16["ours"].values()]) and all(
        run["loss_scale"] == fp16["deepspeed"]["loss_scale"] for run in fp16["ours"].values())
    out["all_equal"] = every
    assert every and out["fp16_overflow_step_skipped"], out
    return out


# --- Virtual stages and dynamic shapes; what each rank issued, replayed ------------------------------------------

S2_CASES = [("1f1b", "mlp", False), ("1f1b", "transformer", True), ("interleaved-1f1b", "mlp", False),
            ("interleaved-1f1b", "transformer", True), ("zb-v", "mlp", False), ("zb-v", "transformer", True)]
S4_CASES = [("1f1b", "mlp", False), ("gpipe", "mlp", False), ("zb-h1", "transformer", True)]


def _recorded_body(cases, rank, world_size, out_dir):
    from tests.distributed import nccl_order_cases
    result = nccl_order_cases.recorded_traces(rank, world_size, world_size, cases)
    result["backend"] = _backend_name()
    return result


def check_recorded(runs, num_stages, cases):
    """DeepSpeed's losses (1e-6) and eval, and every rank's recorded operations replayed under NCCL's rules."""
    from deepspeed_pipe_ext import _C
    out = {}
    for index, (schedule, model, dynamic) in enumerate(cases):
        traces = {runs[r]["stage"]: runs[r]["cases"][index]["trace"] for r in runs}
        replay = _C.check_nccl_order([traces[s] for s in range(num_stages)])
        case = runs[num_stages - 1]["cases"][index]
        out[f"{schedule}/{model}{' dynamic' if dynamic else ''}"] = {
            "losses_equal": base.same_losses(case["losses"], case["theirs"][0]),
            "eval_equal": base.same_losses([case["eval"]], [case["theirs"][1]]),
            "replay_ok": replay["ok"], "operations": replay["operations"],
            "receives_after_meta": sum(runs[r]["cases"][index]["after_meta"] for r in runs),
            **({} if replay["ok"] else {"report": replay["report"][-800:]})}
    out["all_ok"] = all(v["losses_equal"] and v["eval_equal"] and v["replay_ok"] for v in out.values())
    return out


@base.section("virtual stages at S=2 over NCCL: interleaved-1f1b and zb-v, fixed and dynamic shapes, replayed")
def virtual_s2(out_dir):
    runs = spawn(functools.partial(_recorded_body, S2_CASES), 2, out_dir)
    assert not _failed(runs, 2), _errors(runs)
    out = {"backend": runs[0]["backend"], **check_recorded(runs, 2, S2_CASES)}
    assert out["all_ok"], out
    return out


@base.section("S=4 over NCCL, four ranks on one GPU (NCCL_MAX_CTAS=1), replayed")
def four_stages(out_dir):
    runs = spawn(functools.partial(_recorded_body, S4_CASES), 4, out_dir, env={"NCCL_MAX_CTAS": "1"})
    refused = [r for r in runs.values() if r.get("phase") == "join"]
    if refused:  # whether NCCL admits four ranks on one GPU is one of the questions: fail, saying what it printed
        raise RuntimeError("NCCL did not admit four ranks on one GPU (NCCL_MAX_CTAS=1): "
                           + refused[0]["error"].strip().splitlines()[-1])
    assert not _failed(runs, 4), _errors(runs)
    out = {"admitted": True, "backend": runs[0]["backend"], **check_recorded(runs, 4, S4_CASES)}
    assert out["all_ok"], out
    return out


# --- PP=2 x TP=2 and failed batches: the gloo sections' bodies, on NCCL ------------------------------------------

@base.section("PP=2 x TP=2 over NCCL, four ranks on one GPU: split transfers and tensor-parallel all-reduces")
def tensor_parallel_nccl(out_dir):
    backend = multi_rank_backend()
    # Four ranks' communicators on one GPU, as at S=4 (the workers inherit it).
    with mock.patch.dict(os.environ, {"NCCL_MAX_CTAS": "1"}):
        return base.tensor_parallel_split.__wrapped__(out_dir, backend=backend)


@base.section("a failed batch at S=2 over NCCL: every rank raises within 5 s, nobody steps, the next batch refuses")
def failed_batch_nccl(out_dir):
    return base.failed_batch.__wrapped__(out_dir, backend=multi_rank_backend())


# --- A compute-bound step under torch.profiler: do transfers hide behind compute? ---------------------------------

def _merge(intervals):
    merged = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def hidden_fraction(transfers, compute):
    """The share of transfer-kernel time during which a compute kernel of the same process ran."""
    busy = _merge(compute)
    total = sum(end - start for start, end in transfers)
    covered = 0.0
    for start, end in transfers:
        for b_start, b_end in busy:
            covered += max(0.0, min(end, b_end) - max(start, b_start))
    return (covered / total if total else None), total


def _overlap_body(rank, world_size, out_dir):
    import deepspeed
    import torch
    import torch.nn as nn
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    import deepspeed_pipe_ext as dpe
    on_gpu = base.DEVICE == "cuda"
    width, micro_batch, micro_batches = (2048, 256, 8) if on_gpu else (32, 4, 4)
    torch.manual_seed(1)
    layers = [dpe.LayerSpec(nn.Linear, width, width) for _ in range(8)]
    net = dpe.PipelineModule(layers=layers, num_stages=2, loss_fn=nn.MSELoss(), partition_method="uniform")
    engine, _, _, _ = deepspeed.initialize(model=net, config={"train_micro_batch_size_per_gpu": micro_batch,
                                                              "gradient_accumulation_steps": micro_batches,
                                                              "steps_per_print": 10**9},
                                           model_parameters=net.parameters(),
                                           optimizer=torch.optim.SGD(net.parameters(), lr=1e-6))
    data = [(torch.randn(micro_batch, width), torch.randn(micro_batch, width)) for _ in range(micro_batches)]
    for _ in range(2):
        engine.train_batch(data_iter=iter(data))
    base.sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        engine.train_batch(data_iter=iter(data))
        base.sync()
        step_ms = (time.perf_counter() - start) * 1e3
    if rank == 0:
        prof.export_chrome_trace(os.path.join(out_dir, "s2_nccl_stage0_trace.json"))
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    copies = ("memcpy", "memset")  # device copies are not compute
    transfers = [(e.time_range.start, e.time_range.end) for e in kernels if "nccl" in e.name.lower()]
    compute = [(e.time_range.start, e.time_range.end) for e in kernels
               if "nccl" not in e.name.lower() and not e.name.lower().startswith(copies)]
    assert transfers or not on_gpu, "the profiler recorded no NCCL kernel: nothing to measure"
    fraction, transfer_us = hidden_fraction(transfers, compute)
    compute_us = sum(end - start for start, end in _merge(compute))
    return {"step_ms": round(step_ms, 2), "transfer_kernels": len(transfers),
            "transfer_kernel_ms": round(transfer_us / 1e3, 3), "compute_busy_ms": round(compute_us / 1e3, 3),
            "hidden_fraction": None if fraction is None else round(fraction, 3), "width": width,
            "micro_batch": micro_batch, "micro_batches": micro_batches}


@base.section("a compute-bound S=2 step over NCCL under torch.profiler: transfer time hidden behind compute")
def overlap_s2(out_dir):
    runs = spawn(_overlap_body, 2, out_dir)
    assert not _failed(runs, 2), _errors(runs)
    trace = os.path.join(out_dir, "s2_nccl_stage0_trace.json")
    return {"by_rank": {r: runs[r] for r in sorted(runs)}, "trace": trace, "trace_bytes": os.path.getsize(trace),
            "note": "NCCL's send/recv kernels include their wait for the peer; the fraction counts the time a compute "
                    "kernel of the same rank ran meanwhile"}


# --- Overhead-bound train_batch at S=2 over NCCL: ours vs DeepSpeed, side by side ---------------------------------

def _overhead_body(rank, world_size, out_dir):
    repeats = 15 if base.DEVICE == "cuda" else 3
    return {**base.overhead_side_by_side(2, repeats), "repeats": repeats}


@base.section("overhead-bound train_batch at S=2 over NCCL: DeepSpeed vs ours, side by side")
def overhead_s2(out_dir):
    runs = spawn(_overhead_body, 2, out_dir)
    assert not _failed(runs, 2), _errors(runs)
    return {"by_rank": {r: runs[r] for r in sorted(runs)}, "speedup_rank0": runs[0]["speedup"]}


# --- Does packing a tuple into one message pay? (the measurement a CUDA packing kernel would need first) --------

def _tuple_body(rank, world_size, out_dir):
    """A (hidden, mask, positions) activation, as GPT-style stages pass it, sent by our P2P as three messages
    (as the executor does) and as one: the three packed into one byte buffer on the device, unpacked on arrival
    (torch.cat and views: what a packing kernel would have to beat). Median seconds per transfer, both ways."""
    import torch
    import torch.distributed as dist

    from deepspeed_pipe_ext import _C
    device = "cuda:0" if base.DEVICE == "cuda" else "cpu"
    p2p = _C.P2P(dist.group.WORLD, 60.0, f"rank {rank}", device=device)
    repeats = 50 if base.DEVICE == "cuda" else 5
    out = {}
    for batch, seq, hidden in ((1, 128, 1024), (4, 2048, 4096)) if base.DEVICE == "cuda" else ((1, 8, 16), ):
        hid = torch.randn(batch, seq, hidden, device=device, dtype=torch.bfloat16)
        mask = torch.ones(batch, seq, device=device, dtype=torch.bool)
        pos = torch.arange(seq, device=device).expand(batch, seq).contiguous()
        parts = (hid, mask, pos)

        def pack():
            return torch.cat([t.reshape(-1).view(torch.uint8) for t in parts])

        def unpack(flat):
            views, at = [], 0
            for t in parts:
                n = t.numel() * t.element_size()
                views.append(flat[at:at + n].view(t.dtype).view(t.shape))
                at += n
            return views

        times = {"three messages": [], "one packed message": []}
        for rep in range(repeats + 3):
            for how in times:
                dist.barrier()
                base.sync()
                start = time.perf_counter()
                if rank == 0:
                    p2p.send(parts if how == "three messages" else pack(), 1, 0 if how == "three messages" else 2,
                             "activation")
                    p2p.wait_sends()
                else:
                    got = p2p.recv(0, 0 if how == "three messages" else 2, "activation")
                    if how == "one packed message":
                        got = unpack(got)
                base.sync()
                if rep >= 3:
                    times[how].append(time.perf_counter() - start)
        med = {how: statistics.median(t) * 1e6 for how, t in times.items()}
        out[f"{batch}x{seq}x{hidden} bf16 + mask + positions"] = {
            "three_us": round(med["three messages"], 1), "packed_us": round(med["one packed message"], 1),
            "packed_speedup": round(med["three messages"] / med["one packed message"], 3)}
    return out


@base.section("a tuple activation over NCCL: three messages vs one packed message (does a packing kernel pay?)")
def tuple_packing(out_dir):
    runs = spawn(_tuple_body, 2, out_dir)
    assert not _failed(runs, 2), _errors(runs)
    return {"receiver": runs[1], "sender": runs[0]}


SECTIONS = [schedules_s2, virtual_s2, four_stages, tensor_parallel_nccl, failed_batch_nccl, overlap_s2, overhead_s2,
            tuple_packing]
