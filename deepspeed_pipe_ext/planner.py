"""The pipeline plans itself: measured layer costs and a memory cap in; the
partition, the schedule, its model chunks and the activation checkpoint
interval out, with the predicted step time and per-rank peak memory of every
candidate.

    plan = deepspeed_pipe_ext.plan(layers, num_stages=4, micro_batches=16, sample=(inputs, labels),
                                   memory_per_rank="60GiB", loss_fn=loss_fn)
    print(plan.describe())            # every candidate, the pick marked
    net = plan.module()               # a PipelineModule built as planned
    cfg["pipeline"] = plan.config()   # schedule, activation_checkpoint_interval

The search (csrc/core/planner.cpp) partitions each candidate by the exact
min-max of the time each part takes (under a cap, subject to every rank's
memory with the schedule's own micro-batches in flight), simulates it with the
measured costs, and walks each rank's order for its peak memory.

    python -m deepspeed_pipe_ext.planner PROFILE.json --stages 4 --micro-batches 16 --memory-per-rank 60GiB
"""
import argparse
import dataclasses
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from ._native import _C
from ._profile import CostProfile, LayerProfile, RuntimeProfile, measure_layers, measure_runtime

__all__ = ["plan", "profile", "Plan", "Candidate", "CostProfile", "LayerProfile", "RuntimeProfile", "PlanError",
           "parse_bytes"]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tib": 2**40}


class PlanError(ValueError):
    """No candidate fits the memory cap; `.plan` holds every candidate."""

    def __init__(self, message: str, plan: "Plan"):
        super().__init__(message)
        self.plan = plan


def parse_bytes(value: int | float | str | None) -> float:
    """A memory size: a number of bytes, or text such as "60GiB", "512 MB"."""
    if value is None:
        return 0.0
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"a memory size must be >= 0 bytes, got {value}")
        return float(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read the memory size {value!r}: write bytes as a number, or a number and a unit "
                         "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), such as '60GiB'")
    return float(match.group(1)) * _UNITS[match.group(2).lower()]


def _format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


@dataclasses.dataclass
class Candidate:
    """One plan the search considered, with what the model predicts for it."""
    schedule: str
    chunks: int
    layout: str
    checkpoint_interval: int
    micro_batches: int
    parts: list[int]
    step_time: float
    bubble: float
    peak_bytes: list[float]
    fits: bool
    unavailable: str = ""
    name: str = ""

    @classmethod
    def from_native(cls, c: _C.PlanCandidate) -> "Candidate":
        return cls(schedule=c.kind.config_name, chunks=c.chunks, layout=c.layout.config_name,
                   checkpoint_interval=c.checkpoint_interval, micro_batches=c.micro_batches, parts=list(c.parts),
                   step_time=c.step_time, bubble=c.bubble, peak_bytes=list(c.peak_bytes), fits=c.fits,
                   unavailable=c.unavailable, name=c.name)

    def config(self) -> dict[str, Any]:
        """The "pipeline" section of a DeepSpeed config that runs it."""
        return {"schedule": self.schedule, "activation_checkpoint_interval": self.checkpoint_interval}


class Plan:
    """Every candidate, fastest first, and the pick: the fastest whose every
    rank fits `memory_per_rank`."""

    def __init__(self, candidates: list[Candidate], best: int, *, num_stages: int, memory_per_rank: float,
                 profile: CostProfile, default: Candidate | None = None, layers: Sequence[Any] | None = None,
                 loss_fn: Callable | None = None):
        self.candidates = candidates
        self.best_index = best
        self.num_stages = num_stages
        self.memory_per_rank = memory_per_rank
        self.profile = profile
        self.default = default
        self.layers = layers
        self.loss_fn = loss_fn

    @property
    def best(self) -> Candidate | None:
        return self.candidates[self.best_index] if self.best_index >= 0 else None

    def _chosen(self) -> Candidate:
        if self.best is None:
            raise PlanError(self.shortfall(), self)
        return self.best

    def shortfall(self) -> str:
        """Why nothing fits: the rank each of the fastest and the leanest
        candidates is short on, by how much, and what would fit."""
        cap = self.memory_per_rank
        available = [c for c in self.candidates if not c.unavailable]
        if not available:
            reasons = "; ".join(sorted({c.unavailable for c in self.candidates}))
            return f"no candidate can run: {reasons}"
        fastest, leanest = available[0], min(available, key=lambda c: max(c.peak_bytes))

        def short(c):
            rank = max(range(len(c.peak_bytes)), key=lambda r: c.peak_bytes[r])
            return (f"{c.name} needs {_format_bytes(c.peak_bytes[rank])} on rank {rank}, "
                    f"{_format_bytes(c.peak_bytes[rank] - cap)} over the cap")
        return (f"no plan fits memory_per_rank={_format_bytes(cap)} on all {self.num_stages} stages: the fastest, "
                f"{short(fastest)}; the leanest, {short(leanest)}. Raise memory_per_rank to at least "
                f"{_format_bytes(max(leanest.peak_bytes))}, use more stages, or a smaller micro-batch")

    def describe(self) -> str:
        """A table of every candidate: predicted step time, bubble, peak memory per rank; the pick marked."""
        cap = f", memory_per_rank {_format_bytes(self.memory_per_rank)}" if self.memory_per_rank else ""
        lines = [f"pipeline plan: {len(self.profile.layers)} layers on {self.num_stages} stages{cap}",
                 f"  {'':2}{'candidate':52} {'step':>10} {'bubble':>7}  peak memory per rank"]
        rows = list(self.candidates) + ([self.default] if self.default else [])
        for i, c in enumerate(rows):
            is_default = self.default is not None and i == len(self.candidates)
            mark = "->" if i == self.best_index else ("  " if c.fits else " x")
            name = c.name + (f", {c.micro_batches} micro-batches" if self._several_micro_batch_counts() else "")
            if is_default:
                name = f"default: DeepSpeed's {c.name}, 'parameters' partition"
            if c.unavailable:
                lines.append(f"  {mark}{name:52} unavailable: {c.unavailable}")
                continue
            peaks = " / ".join(_format_bytes(b) for b in c.peak_bytes)
            lines.append(f"  {mark}{name:52} {c.step_time * 1e3:8.2f} ms {c.bubble:7.3f}  {peaks}")
        if self.best is not None:
            b = self.best
            lines.append(f"picked: {b.name}, layer boundaries {b.parts}")
        else:
            lines.append(self.shortfall())
        return "\n".join(lines)

    def _several_micro_batch_counts(self) -> bool:
        return len({c.micro_batches for c in self.candidates}) > 1

    def config(self) -> dict[str, Any]:
        """The "pipeline" section of the DeepSpeed config for the pick."""
        return self._chosen().config()

    def module_kwargs(self) -> dict[str, Any]:
        """PipelineModule's arguments for the pick: the partition, the model
        chunks and their layout, the checkpoint interval."""
        c = self._chosen()
        kwargs = {"num_stages": self.num_stages, "partition_method": list(c.parts),
                  "activation_checkpoint_interval": c.checkpoint_interval}
        if c.chunks > 1:
            kwargs.update(virtual_stages=c.chunks, virtual_layout=c.layout)
        return kwargs

    def module(self, **kwargs: Any) -> Any:
        """A PipelineModule over the planned layers built as planned (other
        PipelineModule arguments pass through)."""
        from .module import PipelineModule
        if self.layers is None:
            raise ValueError("this plan was made from a saved profile, without the layers: pass them, "
                             "PipelineModule(layers=..., **plan.module_kwargs())")
        kwargs.setdefault("loss_fn", self.loss_fn)
        return PipelineModule(layers=list(self.layers), **self.module_kwargs(), **kwargs)

    def save(self, path: str) -> None:
        """The plan as JSON: the profile, the cap, every candidate and the pick."""
        data = {"version": 1, "num_stages": self.num_stages, "memory_per_rank": self.memory_per_rank,
                "best": self.best_index, "profile": dataclasses.asdict(self.profile),
                "candidates": [dataclasses.asdict(c) for c in self.candidates],
                "default": dataclasses.asdict(self.default) if self.default else None}
        with open(path, "w") as f:
            json.dump(data, f, indent=1)

    @classmethod
    def load(cls, path: str) -> "Plan":
        with open(path) as f:
            data = json.load(f)
        if data.get("version") != 1:
            raise ValueError(f"{path} is not a plan this version reads (save it again with Plan.save)")
        p = data["profile"]
        profile = CostProfile(layers=[LayerProfile(**layer) for layer in p["layers"]], input_bytes=p["input_bytes"],
                              runtime=RuntimeProfile(**p["runtime"]), device=p.get("device", "cpu"))
        default = Candidate(**data["default"]) if data.get("default") else None
        return cls([Candidate(**c) for c in data["candidates"]], data["best"], num_stages=data["num_stages"],
                   memory_per_rank=data["memory_per_rank"], profile=profile, default=default)

    def draw(self, path: str) -> None:
        """The pick's schedule as a picture (png, svg, pdf: matplotlib), each
        pass as long as the profile predicts."""
        from .timeline import plot_timeline
        c = self._chosen()
        costs = [[self._pass_costs(c, rank, chunk) for chunk in range(c.chunks)] for rank in range(self.num_stages)]
        result = _C.simulate_pass_costs(c.schedule, c.micro_batches, self.num_stages, c.chunks, costs,
                                        self.profile.runtime.latency, c.layout)
        plot_timeline(result, path, title=f"{c.name}: predicted {c.step_time * 1e3:.1f} ms per step",
                      xlabel="seconds, as the profile predicts")

    def _pass_costs(self, c, rank, chunk):
        vs = _C.virtual_stage_of(rank, chunk, self.num_stages, c.layout)
        layers = self.profile.layers[c.parts[vs]:c.parts[vs + 1]]
        return (sum(layer.forward for layer in layers), sum(layer.backward_input for layer in layers),
                sum(layer.backward_weight for layer in layers))


def _state_bytes_per_parameter(config: dict[str, Any] | None) -> float:
    """Optimizer state per parameter from a DeepSpeed config: Adam's two fp32
    moments (8 bytes), SGD's momentum (4) or none; an fp32 master copy (4 more)
    under fp16 or bf16; ZeRO stage 1 divides all of it by the data-parallel
    size (`"data_parallel_size"` in the config, default 1)."""
    if not config:
        return 8.0
    optimizer = (config.get("optimizer") or {}).get("type", "adam").lower()
    params = (config.get("optimizer") or {}).get("params", {})
    if "sgd" in optimizer:
        per = 4.0 if params.get("momentum", 0) else 0.0
    elif "lamb" in optimizer or "adam" in optimizer:
        per = 8.0
    else:
        per = 8.0
    if (config.get("fp16") or {}).get("enabled") or (config.get("bf16") or {}).get("enabled"):
        per += 4.0
    if (config.get("zero_optimization") or {}).get("stage", 0) >= 1:
        per /= max(1, int(config.get("data_parallel_size", 1)))
    return per


def profile(layers: Sequence[Any], sample: Any, loss_fn: Callable | None = None, *, repeats: int = 3,
            device: Any = None, config: dict[str, Any] | None = None,
            optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer] | None = None,
            runtime: RuntimeProfile | None = None) -> CostProfile:
    """Measures the layers on `sample` (one micro-batch, (inputs, labels) with
    a loss_fn), and the runtime's costs (measure_runtime; pass `runtime` to
    skip). Under torch.distributed every rank must call it: every rank
    measures at once, as the stages will run (ranks that share a machine slow
    each other down), and every rank takes the mean of their times, so all
    plan from the same numbers."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    per_parameter = _state_bytes_per_parameter(config)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):  # building the layers must not move the user's RNG
        layer_profiles, input_bytes = measure_layers(layers, sample, loss_fn, device=device, repeats=repeats,
                                                     optimizer=optimizer, state_bytes_per_parameter=per_parameter)
    if dist.is_available() and dist.is_initialized():
        fields = ("forward", "backward_input", "backward_weight", "optimizer")
        times = torch.tensor([[getattr(p, f) for f in fields] for p in layer_profiles], dtype=torch.float64)
        dist.all_reduce(times)
        times /= dist.get_world_size()
        for p, row in zip(layer_profiles, times.tolist()):
            for f, value in zip(fields, row):
                setattr(p, f, value)
    if runtime is None:
        runtime = measure_runtime()
    return CostProfile(layers=layer_profiles, input_bytes=input_bytes, runtime=runtime, device=str(device))


def plan(layers: Sequence[Any] | None = None, num_stages: int = 2, micro_batches: int | Sequence[int] = 1,
         sample: Any = None, *, memory_per_rank: int | float | str | None = None, loss_fn: Callable | None = None,
         cost_profile: CostProfile | None = None, schedules: Sequence[str] | None = None,
         checkpoint_intervals: Sequence[int] = (0, 1, 2, 4), interleaved_chunks: Sequence[int] = (2, 3, 4),
         base_bytes: int | float | str = 0, config: dict[str, Any] | None = None, repeats: int = 3,
         refuse: bool = True) -> Plan:
    """Plans a pipeline of `layers` (PipelineModule's layer list) on
    `num_stages` stages: measures them on `sample` (or takes `cost_profile`),
    then searches every schedule in `schedules` (default: every one the engine
    trains with), each with each checkpoint interval (0: none), for the
    fastest predicted step whose every rank fits `memory_per_rank` (bytes, or
    text such as "60GiB"; None: no cap). `base_bytes` is what each rank holds
    whatever its layers (the framework, buffers). A list of `micro_batches`
    makes the count a choice too (fastest per micro-batch). With `refuse`
    (the default), raises PlanError naming the rank that is short, and by how
    much, when nothing fits."""
    if cost_profile is None:
        if layers is None or sample is None:
            raise ValueError("plan() needs the layers and a sample micro-batch to measure them on, or a "
                             "cost_profile=CostProfile.load(path)")
        cost_profile = profile(layers, sample, loss_fn, repeats=repeats, config=config)
    elif layers is not None and len(layers) != len(cost_profile.layers):
        raise ValueError(f"the cost profile has {len(cost_profile.layers)} layers, the model {len(layers)}: "
                         "profile this model")
    counts = [micro_batches] if isinstance(micro_batches, int) else list(micro_batches)
    request = cost_profile.to_request()
    request.stages = int(num_stages)
    request.micro_batches = counts
    request.memory_per_rank = parse_bytes(memory_per_rank)
    request.base_bytes = parse_bytes(base_bytes)
    if schedules is not None:
        request.kinds = list(schedules)
    request.checkpoint_intervals = list(checkpoint_intervals)
    request.interleaved_chunks = list(interleaved_chunks)
    native, best = _C.plan_pipeline(request)
    default = None
    try:  # DeepSpeed's default for comparison: 1f1b on its 'parameters' partition
        weights = [layer.parameter_bytes for layer in cost_profile.layers]
        if any(weights) and len(weights) >= num_stages:
            parts = _C.partition_balanced([float(w) for w in weights], int(num_stages))
            default = Candidate.from_native(_C.evaluate_candidate(request, "1f1b", 1, 0, counts[0], parts))
    except ValueError:
        default = None
    result = Plan([Candidate.from_native(c) for c in native], best, num_stages=int(num_stages),
                  memory_per_rank=request.memory_per_rank, profile=cost_profile, default=default, layers=layers,
                  loss_fn=loss_fn)
    if refuse and result.best is None:
        raise PlanError(result.shortfall(), result)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """The command line: plan from a saved profile, print every candidate,
    optionally save the plan and draw the pick."""
    parser = argparse.ArgumentParser(prog="python -m deepspeed_pipe_ext.planner", description=main.__doc__)
    parser.add_argument("profile", help="a cost profile saved by deepspeed_pipe_ext.planner.profile(...).save(path)")
    parser.add_argument("--stages", type=int, required=True)
    parser.add_argument("--micro-batches", default="1", help="a count, or several separated by commas")
    parser.add_argument("--memory-per-rank", default=None, help="bytes, or text such as 60GiB")
    parser.add_argument("--base-bytes", default="0", help="what each rank holds whatever its layers")
    parser.add_argument("--schedules", default=None, help="comma-separated schedule names (default: all)")
    parser.add_argument("--checkpoint-intervals", default="0,1,2,4")
    parser.add_argument("--save", metavar="JSON", help="write the plan here")
    parser.add_argument("--plot", metavar="PNG", help="draw the picked schedule here")
    args = parser.parse_args(argv)
    try:
        result = plan(cost_profile=CostProfile.load(args.profile), num_stages=args.stages,
                      micro_batches=[int(m) for m in args.micro_batches.split(",")],
                      memory_per_rank=args.memory_per_rank, base_bytes=args.base_bytes,
                      schedules=args.schedules.split(",") if args.schedules else None,
                      checkpoint_intervals=[int(k) for k in args.checkpoint_intervals.split(",")], refuse=False)
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
    print(result.describe())
    if args.save:
        result.save(args.save)
    if args.plot and result.best is not None:
        result.draw(args.plot)
    if result.best is None:
        parser.exit(1)


if __name__ == "__main__":
    main()
