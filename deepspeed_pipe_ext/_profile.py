"""Measuring what the planner plans from: each layer's forward, input backward
(B) and weight backward (W) time on a sample micro-batch, the bytes it saves
for backward, its output and its parameter, gradient and optimizer state; and
the runtime's own costs (per pass, per message). The measurements are plain
data (`CostProfile`), saved and read back as JSON."""
import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from deepspeed.runtime.pipe import module as ds_module

from ._native import _C


@dataclasses.dataclass
class LayerProfile:
    """One layer's costs for one micro-batch (seconds and bytes)."""
    name: str
    forward: float
    backward_input: float
    backward_weight: float
    saved_bytes: int
    output_bytes: int
    parameter_bytes: int
    state_bytes: int
    optimizer: float = 0.0
    has_parameters: bool = False
    differentiable_input: bool = True  # a floating-point input (not token ids)


@dataclasses.dataclass
class RuntimeProfile:
    """What the runtime itself costs: seconds per compute pass, seconds of a
    rank's own time per send or receive, a message's latency and the bytes per
    second between stage ranks (0: not measured, unlimited)."""
    pass_overhead: float = 0.0
    transfer_overhead: float = 0.0
    latency: float = 0.0
    bandwidth: float = 0.0


@dataclasses.dataclass
class CostProfile:
    """Everything the planner needs, measured once (`profile`) and reusable:
    `save` / `CostProfile.load` (JSON)."""
    layers: list[LayerProfile]
    input_bytes: int
    runtime: RuntimeProfile = dataclasses.field(default_factory=RuntimeProfile)
    device: str = "cpu"

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump({"version": 1, **dataclasses.asdict(self)}, f, indent=1)

    @classmethod
    def load(cls, path: str) -> "CostProfile":
        with open(path) as f:
            data = json.load(f)
        if data.get("version") != 1:
            raise ValueError(f"{path} is not a cost profile this version reads (version {data.get('version')!r}; "
                             "write it again with deepspeed_pipe_ext.planner.profile(...).save(path))")
        return cls(layers=[LayerProfile(**layer) for layer in data["layers"]], input_bytes=data["input_bytes"],
                   runtime=RuntimeProfile(**data["runtime"]), device=data.get("device", "cpu"))

    def to_request(self) -> _C.PlanRequest:
        request = _C.PlanRequest()
        layers = []
        for layer in self.layers:
            cost = _C.LayerCost()
            for field in ("forward", "backward_input", "backward_weight", "saved_bytes", "output_bytes",
                          "state_bytes", "parameter_bytes", "optimizer", "has_parameters", "differentiable_input"):
                setattr(cost, field, getattr(layer, field))
            layers.append(cost)
        request.layers = layers
        request.input_bytes = self.input_bytes
        runtime = _C.RuntimeCost()
        for field in ("pass_overhead", "transfer_overhead", "latency", "bandwidth"):
            setattr(runtime, field, getattr(self.runtime, field))
        request.runtime = runtime
        return request


def tensors_of(value: Any) -> list[torch.Tensor]:
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors_of(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors_of(v)]
    return []


def nbytes(value: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors_of(value))


def layer_name(layer: Any) -> str:
    if isinstance(layer, ds_module.LayerSpec):
        return layer.typename.__name__
    if isinstance(layer, nn.Module):
        return type(layer).__name__
    return getattr(layer, "__name__", type(layer).__name__)


def build_layers(specs: Sequence[Any], device: Any) -> list[tuple[Callable, list[nn.Parameter]]]:
    """Each layer as a callable and its trainable parameters; a TiedLayerSpec's
    module is built once per key (DeepSpeed shares it between its places)."""
    built, layers = {}, []
    for layer in specs:
        if isinstance(layer, ds_module.TiedLayerSpec):
            if layer.key not in built:
                built[layer.key] = layer.build().to(device)
            module = built[layer.key]
            fn = module if layer.forward_fn is None else partial(layer.forward_fn, module)
        elif isinstance(layer, ds_module.LayerSpec):
            module = fn = layer.build().to(device)
        else:
            module, fn = layer, layer
        params = [p for p in module.parameters() if p.requires_grad] if isinstance(module, nn.Module) else []
        layers.append((fn, params))
    return layers


def _fresh_input(x: Any, device: Any) -> Any:
    """`x` detached on `device`, floating tensors requiring grad (a stage input)."""
    if torch.is_tensor(x):
        x = x.detach().to(device)
        return x.requires_grad_() if x.is_floating_point() else x
    if isinstance(x, (tuple, list)):
        return type(x)(_fresh_input(v, device) for v in x)
    return x


class _SavedBytes:
    """Bytes of the distinct tensors autograd saves for backward, parameters
    excluded (they are counted as state), via saved-tensor hooks."""

    def __init__(self, params: list[nn.Parameter]):
        self.skip = {p.untyped_storage().data_ptr() for p in params}
        self.seen, self.total = set(), 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            ptr = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):  # a tensor without storage (sparse, nested)
            ptr = None
        if ptr is not None and ptr not in self.skip and ptr not in self.seen:
            self.seen.add(ptr)
            self.total += t.untyped_storage().nbytes()
        return t

    def hooks(self) -> Any:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def _synchronize(device: Any) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def measure_layers(specs: Sequence[Any], sample: Any, loss_fn: Callable | None = None, *, device: Any = "cpu",
                   repeats: int = 3, optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
                   state_bytes_per_parameter: float = 8.0) -> tuple[list[LayerProfile], int]:
    """Each layer's profile, run in sequence from `sample` ((inputs, labels)
    with a loss_fn, else the inputs): median seconds of `repeats` forwards, B
    and W (the executor's own split backward), the bytes the forward saves for
    backward, its output bytes, and its state: parameters and gradients plus
    `state_bytes_per_parameter` bytes of optimizer state per parameter. The loss
    is charged to the last layer. With `optimizer` (a factory over a parameter
    list), each layer's share of one optimizer step's time, by parameter count.
    Returns the profiles and the bytes of one micro-batch's input."""
    if loss_fn is not None:
        if not (isinstance(sample, (tuple, list)) and len(sample) == 2):
            raise ValueError("with a loss_fn, the sample is one micro-batch as the data iterator yields it: "
                             "(inputs, labels)")
        inputs, labels = sample
    else:
        inputs, labels = sample, None
    repeats = max(1, int(repeats))
    layers = build_layers(specs, device)
    x = _fresh_input(inputs, device)
    input_bytes = nbytes(x)
    profiles = []
    for idx, ((fn, params), spec) in enumerate(zip(layers, specs)):
        try:
            profile, x = _measure_layer(fn, params, x, device, repeats, state_bytes_per_parameter, layer_name(spec))
        except Exception as err:
            raise RuntimeError(f"profiling layer {idx} ({layer_name(spec)}) on the sample micro-batch failed: "
                               f"{err}") from err
        profiles.append(profile)
    if loss_fn is not None:
        forward, backward = _measure_loss(loss_fn, x, _fresh_input(labels, device), device, repeats)
        profiles[-1].forward += forward
        profiles[-1].backward_input += backward
    if optimizer is not None:
        _share_optimizer_time(profiles, layers, optimizer, device, repeats)
    return profiles, input_bytes


def _measure_layer(fn, params, x, device, repeats, state_bytes_per_parameter, name):
    inputs = [t for t in tensors_of(x) if t.requires_grad]
    forward, backward_input, backward_weight = [], [], []
    out = saved = None
    for _ in range(repeats + 1):  # the first is a warm-up
        saved = _SavedBytes(params)
        _synchronize(device)
        start = time.perf_counter()
        with saved.hooks():
            out = fn(x)
        _synchronize(device)
        forward.append(time.perf_counter() - start)
        outputs = [t for t in tensors_of(out) if t.requires_grad]
        if not outputs:
            backward_input.append(0.0)
            backward_weight.append(0.0)
            continue
        grads = [torch.ones_like(t) for t in outputs]
        start = time.perf_counter()
        deferred = _C.backward_input(outputs, grads, inputs)
        _synchronize(device)
        backward_input.append(time.perf_counter() - start)
        start = time.perf_counter()
        deferred.run()
        _synchronize(device)
        backward_weight.append(time.perf_counter() - start)
        for p in params:
            p.grad = None
    parameter_bytes = sum(p.numel() * p.element_size() for p in params)
    numel = sum(p.numel() for p in params)
    median = lambda samples: statistics.median(samples[1:])  # noqa: E731
    profile = LayerProfile(name=name, forward=median(forward), backward_input=median(backward_input),
                           backward_weight=median(backward_weight), saved_bytes=saved.total,
                           output_bytes=nbytes(out), parameter_bytes=parameter_bytes,
                           state_bytes=int(2 * parameter_bytes + state_bytes_per_parameter * numel),
                           has_parameters=bool(params),
                           differentiable_input=any(t.is_floating_point() for t in tensors_of(x)))
    for field in ("forward", "backward_input", "backward_weight"):
        if not math.isfinite(getattr(profile, field)):
            setattr(profile, field, 0.0)
    return profile, _fresh_input(out, device)


def _measure_loss(loss_fn, outputs, labels, device, repeats):
    forward, backward = [], []
    for _ in range(repeats + 1):
        x = _fresh_input(outputs, device)
        _synchronize(device)
        start = time.perf_counter()
        loss = loss_fn(x, labels)
        _synchronize(device)
        forward.append(time.perf_counter() - start)
        start = time.perf_counter()
        if torch.is_tensor(loss) and loss.requires_grad:
            loss.backward()
        _synchronize(device)
        backward.append(time.perf_counter() - start)
    return statistics.median(forward[1:]), statistics.median(backward[1:])


def _share_optimizer_time(profiles, layers, optimizer, device, repeats):
    params = list({id(p): p for _, ps in layers for p in ps}.values())
    if not params:
        return
    opt = optimizer(params)
    samples = []
    for _ in range(repeats + 1):
        for p in params:
            p.grad = torch.zeros_like(p)
        _synchronize(device)
        start = time.perf_counter()
        opt.step()
        _synchronize(device)
        samples.append(time.perf_counter() - start)
        opt.zero_grad()
    total = statistics.median(samples[1:])
    numel = sum(p.numel() for p in params)
    for profile, (_, ps) in zip(profiles, layers):
        profile.optimizer = total * sum(p.numel() for p in ps) / numel


def measure_runtime(group: Any = None, message_bytes: int = 1 << 20, repeats: int = 50) -> RuntimeProfile:
    """The runtime's own costs on this machine. Per pass: the executor's time
    per compute pass with callbacks that do almost nothing (one stage, no
    transfers). Per message, when torch.distributed runs with two or more
    ranks (every rank of `group` must call this): half the round trip of a
    one-element message between the group's first two ranks (the latency, also
    the rank's own time per transfer on a CPU backend, where the rank's core
    moves the bytes), and the bytes per second of a `message_bytes` message."""
    runtime = RuntimeProfile(pass_overhead=_pass_overhead(repeats))
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) >= 2:
        small = _half_round_trip(torch.zeros(1), group, repeats)
        large = _half_round_trip(torch.zeros(max(1, message_bytes // 4)), group, max(5, repeats // 5))
        runtime.latency = small
        # A large message no slower than a small one (noise): the bytes cost nothing measurable.
        runtime.bandwidth = message_bytes / (large - small) if large > small else 0.0
        cpu = dist.get_backend(group) == "gloo"
        runtime.transfer_overhead = small if cpu else 0.0
        values = torch.tensor([runtime.pass_overhead, runtime.transfer_overhead, runtime.latency,
                               runtime.bandwidth], dtype=torch.float64)
        src = dist.get_global_rank(group, 0) if group is not None else 0
        dist.broadcast(values, src=src, group=group)  # every rank plans from the same numbers
        runtime = RuntimeProfile(*values.tolist())
    return runtime


class _NoWork:
    """Callbacks for one stage that do the least a pass can: a scalar forward
    and its backward."""

    def __init__(self, micro_batches):
        self.weight = nn.Parameter(torch.ones(()))
        self.left = micro_batches

    def load(self):
        self.left -= 1
        return torch.ones(()), None

    def forward_loss(self, inputs, labels):
        return inputs * self.weight

    def backward_loss(self, loss):
        loss.backward()

    def reduce_tied_grads(self):
        pass

    def reduce_grads(self):
        pass

    def optimizer_step(self):
        pass


def _pass_overhead(repeats):
    micro_batches = 32
    program = _C.StageProgram("1f1b", micro_batches, 1, 0, False)
    samples = []
    for _ in range(max(3, repeats // 4)):
        start = time.perf_counter()
        _C.run_stage(program, None, _NoWork(micro_batches))
        samples.append((time.perf_counter() - start) / (2 * micro_batches))
    return statistics.median(samples)


def _half_round_trip(x, group, repeats):
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    me, (first, second) = dist.get_rank(), ranks[:2]
    samples = []
    for _ in range(repeats + 1):
        dist.barrier(group=group)
        start = time.perf_counter()
        if me == first:
            dist.send(x, second, group=group)
            dist.recv(x, second, group=group)
        elif me == second:
            dist.recv(x, first, group=group)
            dist.send(x, first, group=group)
        samples.append((time.perf_counter() - start) / 2)
    return statistics.median(samples[1:])
