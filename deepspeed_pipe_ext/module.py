"""PipelineModule, LayerSpec and TiedLayerSpec: DeepSpeed's user API.

The classes subclass DeepSpeed's, so `deepspeed.initialize` and code written
against `deepspeed.pipe` accept them; the partitioning is solved in C++ and the
process groups come from the C++ topology.
"""
import os
import re
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from deepspeed.runtime import utils as ds_utils
from deepspeed.runtime.activation_checkpointing import checkpointing
from deepspeed.runtime.pipe import module as ds_module

from . import activation_checkpointing
from . import partition as _partition
from ._native import _C
from ._profile import measure_layers
from .topology import PipeDataParallelTopology, PipelineParallelGrid, _require_dist, as_topology

__all__ = ["PipelineModule", "LayerSpec", "TiedLayerSpec", "PipelineError"]

PipelineError = ds_module.PipelineError


def _global_rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else -1


def _check_module_type(typename):
    if not (isinstance(typename, type) and issubclass(typename, nn.Module)):
        raise TypeError(f"LayerSpec needs a torch.nn.Module subclass, got {typename!r}; "
                        "put plain functions straight into the layer list instead")


class LayerSpec(ds_module.LayerSpec):
    """Describes a layer to build only on the stage that owns it:
    `LayerSpec(nn.Linear, 4, 8)` builds `nn.Linear(4, 8)` there."""

    def __init__(self, typename: type[nn.Module], *module_args: Any, **module_kwargs: Any) -> None:
        _check_module_type(typename)
        self.typename = typename
        self.module_args = module_args
        self.module_kwargs = module_kwargs
        self.global_rank = _global_rank()


class TiedLayerSpec(ds_module.TiedLayerSpec):
    """A layer whose module (and the weights named by `tied_weight_attr`) is
    shared by every layer with the same `key`, across stages."""

    def __init__(self,
                 key: str,
                 typename: type[nn.Module],
                 *module_args: Any,
                 forward_fn: Callable[..., Any] | None = None,
                 tied_weight_attr: str | Iterable[str] = ['weight'],
                 **module_kwargs: Any) -> None:
        LayerSpec.__init__(self, typename, *module_args, **module_kwargs)
        self.key = key
        self.forward_fn = forward_fn
        self.tied_weight_attr = [tied_weight_attr] if isinstance(tied_weight_attr, str) else list(tied_weight_attr)


def _layer_name(layer):
    if isinstance(layer, ds_module.LayerSpec):
        return layer.typename.__name__
    if isinstance(layer, nn.Module):
        return layer.__class__.__name__
    return getattr(layer, '__name__', None)


def _check_layers(specs):
    for idx, layer in enumerate(specs):
        if isinstance(layer, ds_module.PipelineModule):
            raise NotImplementedError(f"layer {idx} is itself a PipelineModule: nested pipelines are not supported; "
                                      "pass its layers instead")
        if not (isinstance(layer, (nn.Module, ds_module.LayerSpec)) or callable(layer)):
            raise TypeError(f"layer {idx} is a {type(layer).__name__} ({layer!r}): each layer must be an nn.Module, "
                            "a LayerSpec/TiedLayerSpec, or a callable taking the previous layer's output")


class PipelineModule(ds_module.PipelineModule):
    """A sequence of layers split into pipeline stages.

    Takes DeepSpeed's arguments. `partition_method` accepts DeepSpeed's
    'parameters', 'uniform' and 'type:REGEX' (same layouts as DeepSpeed), and
    also 'parameters-minmax' (the partition whose heaviest stage has the fewest
    parameters), 'profile' (measured forward+backward time per layer on
    `profile_inputs`, a sample micro-batch, then the min-max partition), an
    explicit list of num_stages + 1 layer boundaries, or 'auto': the planner
    (deepspeed_pipe_ext.plan) measures the layers on `profile_inputs` and picks
    the partition, the model chunks and the checkpoint interval, with the
    options in `planner` (micro_batches, memory_per_rank, ...); run it with
    "pipeline": {"schedule": "auto"}. The plan is kept as `.plan`.
    """
    virtual_stages = 1  # model chunks per rank, and where they sit ("interleaved" or "v")
    virtual_layout = "interleaved"

    def __init__(self,
                 layers: Iterable[nn.Module | ds_module.LayerSpec | Callable[..., Any]],
                 num_stages: int | None = None,
                 topology: Any = None,
                 loss_fn: Callable[..., Any] | None = None,
                 seed_layers: bool = False,
                 seed_fn: Callable[[int], Any] | None = None,
                 base_seed: int = 1234,
                 partition_method: str | Sequence[int] = 'parameters',
                 activation_checkpoint_interval: int = 0,
                 activation_checkpoint_func: Callable[..., Any] = checkpointing.checkpoint,
                 checkpointable_layers: list[str] | None = None,
                 dynamic_shape: bool = False,
                 *,
                 profile_inputs: Any = None,
                 profile_repeats: int = 3,
                 virtual_stages: int = 1,
                 virtual_layout: str = "interleaved",
                 planner: dict[str, Any] | None = None) -> None:
        # DeepSpeed's __init__ is not called: everything it sets is set here,
        # with our topology, grid and partition solver.
        nn.Module.__init__(self)
        if num_stages is None and topology is None:
            raise RuntimeError('must provide num_stages or topology')
        _require_dist()
        if checkpointable_layers is not None and not isinstance(checkpointable_layers, list):
            raise TypeError("checkpointable_layers must be a list of layer class names")
        if activation_checkpoint_interval < 0:
            raise ValueError(f"activation_checkpoint_interval must be >= 0, got {activation_checkpoint_interval}")

        self.micro_offset = 0
        self.loss_fn = loss_fn
        self.checkpointable_layers = checkpointable_layers
        self.seed_layers = seed_layers
        self.seed_fn = seed_fn
        self.base_seed = base_seed
        self.profile_inputs = profile_inputs
        self.profile_repeats = profile_repeats
        if isinstance(virtual_stages, bool) or not isinstance(virtual_stages, int) or virtual_stages < 1:
            raise ValueError(f"virtual_stages must be a positive int (model chunks per rank), got {virtual_stages!r}")
        if virtual_layout not in ("interleaved", "v"):
            raise ValueError(f"virtual_layout must be 'interleaved' (rank r holds parts r, r + stages, ...; for "
                             f"interleaved-1f1b) or 'v' (rank r holds parts r and 2 * stages - 1 - r; for zb-v), "
                             f"got {virtual_layout!r}")
        if virtual_layout == "v" and virtual_stages != 2:
            raise ValueError(f"virtual_layout='v' places two model chunks per rank (the V of zb-v): use "
                             f"virtual_stages=2, got {virtual_stages}")
        self.virtual_stages = virtual_stages
        self.virtual_layout = virtual_layout

        self.world_group = dist.group.WORLD
        self.global_rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))

        if topology is not None:
            self._topo = as_topology(topology)
            self.num_stages = self._topo.get_dim('pipe')
            if num_stages is not None and num_stages != self.num_stages:
                raise ValueError(f"num_stages={num_stages} disagrees with the topology's pipe dim "
                                 f"({self.num_stages}); pass only one of them")
        else:
            if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
                raise ValueError(f"num_stages must be a positive int, got {num_stages!r}")
            self.num_stages = num_stages
            if self.world_size % num_stages != 0:
                raise RuntimeError(f'num_stages ({num_stages}) must divide distributed world size '
                                   f'({self.world_size}): launch a multiple of {num_stages} processes')
            self._topo = PipeDataParallelTopology(num_pp=num_stages, num_dp=self.world_size // num_stages)
        self._grid = PipelineParallelGrid(process_group=self.world_group, topology=self._topo)
        self.stage_id = self._grid.get_stage_id()

        self._layer_specs = list(layers)
        _check_layers(self._layer_specs)
        self._num_layers = len(self._layer_specs)
        self._local_start = 0
        self._local_stop = None
        self.plan = None
        if isinstance(partition_method, str) and partition_method.lower() == "auto":
            self.plan = self._make_plan(planner)
            best = self.plan.best
            partition_method, activation_checkpoint_interval = list(best.parts), best.checkpoint_interval
            self.virtual_stages, self.virtual_layout = best.chunks, best.layout
        elif planner is not None:
            raise ValueError("planner options are for partition_method='auto'")
        self._partition_layers(method=partition_method)

        self.forward_funcs: list[Callable[..., Any]] = []
        self.fwd_map: dict[str, int] = {}
        self.tied_modules = nn.ModuleDict()
        self.tied_weight_attrs: dict[str, list[str]] = {}
        self.activation_checkpoint_interval = activation_checkpoint_interval
        self.activation_checkpoint_func = activation_checkpoint_func
        self.is_checkpointable_results: list[bool] = []
        self.is_checkpointable_results_interval = None

        self._build()
        self.to(self._device())
        self.tied_comms = self._index_tied_modules()
        self._synchronize_tied_weights()
        self.dynamic_shape = dynamic_shape

    def _device(self):
        from deepspeed.accelerator import get_accelerator
        return get_accelerator().device_name(self.local_rank)

    # ------------------------------------------------------------------ partitioning
    def _partition_weights(self, method):
        """Per-layer weights for a weight-based method, and the solver to use."""
        if method == 'parameters':
            # Builds every LayerSpec once, as DeepSpeed does (same RNG use, so
            # the same initial weights as DeepSpeed's engine).
            return self._count_layer_params(), _partition.partition_balanced
        if method == 'parameters-minmax':
            return self._count_layer_params_on_meta(), _partition.partition_minmax
        if method.startswith('type:'):
            pattern = method.split(':', 1)[1]
            weights = [0] * self._num_layers
            for idx in self._find_layer_type(pattern):
                weights[idx] = 1
            return weights, _partition.partition_balanced
        if method == 'profile':
            return self._profile_layer_costs(), _partition.partition_minmax
        raise ValueError(f"unknown partition_method {method!r}: use one of 'parameters', 'uniform', "
                         "'type:REGEX', 'parameters-minmax', 'profile', or a list of num_stages + 1 layer boundaries")

    def _partition_layers(self, method='uniform'):
        # With virtual stages the layers go into stages x virtual_stages parts; rank r holds parts r, r + stages, ...
        num_stages = self.num_stages * self.virtual_stages
        if isinstance(method, (list, tuple)):
            self.partition_weights = None
            self.parts = self._check_explicit_boundaries(method)
        elif not isinstance(method, str):
            raise TypeError(f"partition_method must be a string or a list of boundaries, got {type(method).__name__}")
        else:
            method = method.lower()
            if method == 'uniform':
                self.partition_weights = [1] * self._num_layers
                self.parts = _partition.partition_uniform(self._num_layers, num_stages)
            else:
                weights, solve = self._partition_weights(method)
                self.partition_weights = weights
                self.parts = solve(weights, num_stages)
        self.partition_method = method
        for part in range(num_stages):
            if self.parts[part] == self.parts[part + 1]:
                raise ValueError(f"{self._part_name(part)} gets no layers ({self._num_layers} layers into "
                                 f"{num_stages} parts, boundaries {self.parts}): use fewer stages or more layers")
        # This rank's layers, chunk by chunk: [start, stop) in the whole pipeline's numbering.
        self._chunk_bounds = [(self.parts[self.part_of(c)], self.parts[self.part_of(c) + 1])
                              for c in range(self.virtual_stages)]
        self._set_bounds(start=self._chunk_bounds[0][0], stop=self._chunk_bounds[-1][1])

    def chunk_bounds(self, chunk: int) -> tuple[int, int]:
        """[start, stop) of this rank's model chunk `chunk` in the whole pipeline's layer numbering."""
        return self._chunk_bounds[chunk]

    def part_of(self, chunk: int, stage_id: int | None = None) -> int:
        """The part (virtual stage) that model chunk `chunk` of `stage_id` (default: this rank's) holds."""
        stage = self.stage_id if stage_id is None else stage_id
        return _C.virtual_stage_of(stage, chunk, self.num_stages, self.virtual_layout)

    def place_of(self, part: int) -> tuple[int, int]:
        """(stage, chunk) that holds part `part`."""
        return tuple(_C.place_of_virtual(part, self.num_stages, self.virtual_layout))  # type: ignore[return-value]

    def _part_name(self, part):
        if self.virtual_stages == 1:
            return f"stage {part}"
        stage, chunk = self.place_of(part)
        return f"part {part} (stage {stage}, chunk {chunk})"

    def stage_owner(self, layer_idx: int) -> int:
        """The stage (rank along the pipe axis) that builds layer `layer_idx`."""
        if not 0 <= layer_idx < self._num_layers:
            raise ValueError(f"layer {layer_idx} is outside the {self._num_layers} layers")
        for part in range(len(self.parts) - 1):
            if self.parts[part] <= layer_idx < self.parts[part + 1]:
                return self.place_of(part)[0]
        raise RuntimeError(f"layer {layer_idx} is in no part of {self.parts}")

    # DeepSpeed names a layer's file by _local_start + its index among this
    # rank's layers; with virtual stages those are not contiguous, so hand it
    # the offset that gives the layer's number in the whole pipeline.
    def ckpt_layer_path(self, ckpt_dir: str, local_layer_idx: int) -> str:
        """DeepSpeed's file for a layer of this rank, by its number in the whole pipeline."""
        return super().ckpt_layer_path(ckpt_dir, self._layer_index[local_layer_idx] - self._local_start)

    def ckpt_layer_path_list(self, ckpt_dir: str, local_layer_idx: int) -> list[str]:
        return super().ckpt_layer_path_list(ckpt_dir, self._layer_index[local_layer_idx] - self._local_start)

    def global_layer_index(self, local_idx: int) -> int:
        """The number in the whole pipeline of this rank's `local_idx`-th layer."""
        return self._layer_index[local_idx]

    def _check_explicit_boundaries(self, bounds):
        bounds = list(bounds)
        n, s = self._num_layers, self.num_stages * self.virtual_stages
        if len(bounds) != s + 1 or any(isinstance(b, bool) or not isinstance(b, int) for b in bounds):
            raise ValueError(f"explicit partition must be {s + 1} ints (one boundary per stage plus the end), "
                             f"got {bounds!r}")
        if bounds[0] != 0 or bounds[-1] != n:
            raise ValueError(f"explicit partition must start at 0 and end at the number of layers ({n}), got {bounds}")
        for stage in range(s):
            if bounds[stage] >= bounds[stage + 1]:
                raise ValueError(f"explicit partition {bounds}: stage {stage} gets layers "
                                 f"[{bounds[stage]}, {bounds[stage + 1]}); boundaries must increase strictly")
        return bounds

    def _find_layer_type(self, layername):
        typeregex = re.compile(layername, re.IGNORECASE)
        idxs = [idx for idx, layer in enumerate(self._layer_specs)
                if _layer_name(layer) is not None and typeregex.search(_layer_name(layer))]
        if not idxs:
            names = sorted({_layer_name(layer) for layer in self._layer_specs if _layer_name(layer) is not None})
            raise RuntimeError(f"Partitioning 'type:{layername}' found no valid layers to partition: "
                               f"the regex matches none of the layer types {names}")
        return idxs

    def _count_layer_params_on_meta(self):
        """Trainable parameter count per layer, building LayerSpecs on the meta
        device (no memory, no RNG use); falls back to a real build."""
        counts = [0] * self._num_layers
        for idx, layer in enumerate(self._layer_specs):
            if isinstance(layer, ds_module.LayerSpec):
                try:
                    with torch.device('meta'):
                        module = layer.build()
                except Exception:  # a module whose constructor needs real tensors
                    with torch.random.fork_rng(devices=[]):
                        module = layer.build()
            elif isinstance(layer, nn.Module):
                module = layer
            else:
                continue
            counts[idx] = sum(p.numel() for p in module.parameters() if p.requires_grad)
        return counts

    def _profile_layer_costs(self):
        """Seconds of forward+backward per layer on `profile_inputs`, measured on
        rank 0 and broadcast so every rank solves the same partition."""
        if self.profile_inputs is None:
            raise ValueError("partition_method='profile' needs profile_inputs=<a sample micro-batch "
                             "(a tensor or tuple of tensors)> to time each layer's forward and backward on")
        costs = [None]
        if self.global_rank == 0:
            devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
            with torch.random.fork_rng(devices=devices):
                layers, _ = measure_layers(self._layer_specs, self.profile_inputs, device=self._device(),
                                           repeats=self.profile_repeats)
            costs[0] = [layer.forward + layer.backward_input + layer.backward_weight for layer in layers]
        dist.broadcast_object_list(costs, src=0)
        self.layer_costs = costs[0]
        return self.layer_costs

    def _make_plan(self, options):
        """partition_method='auto': the planner over this module's layers,
        measured on profile_inputs on rank 0 (every rank plans the same)."""
        from .planner import plan
        if self.profile_inputs is None:
            raise ValueError("partition_method='auto' needs profile_inputs=<a sample micro-batch, (inputs, labels) "
                             "as the data iterator yields it> to measure the layers on")
        options = dict(options or {})
        if "micro_batches" not in options:
            raise ValueError("partition_method='auto' needs planner={'micro_batches': N, ...}: the config's "
                             "gradient_accumulation_steps, which the schedule's bubble and memory depend on")
        for given in ("layers", "num_stages", "sample", "loss_fn", "cost_profile"):
            if given in options:
                raise ValueError(f"planner={{{given!r}: ...}}: the module gives the planner its {given}; remove it")
        options.setdefault("repeats", self.profile_repeats)
        return plan(self._layer_specs, self.num_stages, sample=self.profile_inputs, loss_fn=self.loss_fn, **options)

    def describe_partition(self) -> str:
        """A text table of the partition: each stage's layers (each chunk's, with
        virtual stages) and weight, and the bottleneck."""
        weights = self.partition_weights
        chunks = self.virtual_stages
        virtual = f" virtual_stages={chunks} virtual_layout={self.virtual_layout!r}" if chunks > 1 else ""
        lines = [f"partition_method={self.partition_method!r} stages={self.num_stages}{virtual} "
                 f"layers={self._num_layers}"]
        totals = [0.0] * self.num_stages if weights is not None else None
        for part in range(self.num_stages * chunks):
            start, stop = self.parts[part], self.parts[part + 1]
            total = sum(weights[start:stop]) if weights is not None else None
            stage, chunk = self.place_of(part)
            if totals is not None:
                totals[stage] += total  # type: ignore[operator]  # weights, so total, are not None here
            names = ", ".join(f"{i}:{_layer_name(self._layer_specs[i]) or type(self._layer_specs[i]).__name__}"
                              for i in range(start, stop))
            weight = "" if total is None else f" weight={total:g}"
            label = f"stage {part}" if chunks == 1 else f"stage {stage} chunk {chunk}"
            lines.append(f"  {label}: layers [{start}, {stop}){weight}  {names}")
        if totals is not None and any(t > 0 for t in totals):
            worst = max(range(self.num_stages), key=lambda s: totals[s])
            mean = sum(totals) / self.num_stages
            lines.append(f"  bottleneck: stage {worst} ({totals[worst] / mean:.3f}x the mean stage)")
        return "\n".join(lines)

    def forward(self, forward_input: Any, chunk: int | None = None) -> Any:
        """This stage's layers on `forward_input`; with virtual stages, those
        of model chunk `chunk` (this rank's part chunk * stages + stage)."""
        if self.virtual_stages > 1 or chunk not in (None, 0):
            return self._chunk_forward(forward_input, chunk)
        # DeepSpeed's forward sets self.curr_layer (an nn.Module __setattr__)
        # for every layer; without per-layer seeds or checkpointing nothing
        # reads it, so run the layers directly (same arithmetic).
        if self.activation_checkpoint_interval == 0 and not self.seed_layers:
            self.micro_offset += 1
            x = forward_input
            for layer in self.forward_funcs:
                x = layer(x)
            return x
        if self.activation_checkpoint_interval == 0:  # per-layer seeds only
            self.micro_offset += 1
            return self._group_forward(0, len(self.forward_funcs), self.micro_offset + 1)(forward_input)
        checkpoint = self._checkpoint_function()
        if checkpoint is None:  # a user's own activation_checkpoint_func: DeepSpeed's loop calls it
            return super().forward(forward_input)
        self.micro_offset += 1
        micro_offset = self.micro_offset + 1  # what DeepSpeed's per-layer seeds use
        interval = self.activation_checkpoint_interval
        if self.is_checkpointable_results_interval != interval:
            self._precompute_checkpointable_values()
        x = forward_input
        for start, checkpointable in zip(range(0, len(self.forward_funcs), interval), self.is_checkpointable_results):
            run_group = self._group_forward(start, min(start + interval, len(self.forward_funcs)), micro_offset)
            if not isinstance(x, tuple):
                x = (x, )
            x = checkpoint(run_group, *x) if checkpointable else run_group(*x)
        return x

    def _chunk_forward(self, forward_input, chunk):
        if chunk is None or not 0 <= chunk < self.virtual_stages:
            raise ValueError(f"stage {self.stage_id}: chunk {chunk!r} is not one of this rank's "
                             f"{self.virtual_stages} model chunks (0..{self.virtual_stages - 1})")
        begin, end = self._chunk_funcs[chunk]
        self.micro_offset += 1
        micro_offset = self.micro_offset + 1
        interval = self.activation_checkpoint_interval
        checkpoint = self._checkpoint_function() if interval > 0 else None
        if interval > 0 and checkpoint is None:
            raise ValueError("virtual stages checkpoint activations with deepspeed_pipe_ext's or DeepSpeed's "
                             "checkpoint functions only; another activation_checkpoint_func is not supported")
        x = forward_input
        for start in range(begin, end, interval or (end - begin)):
            stop = min(start + (interval or (end - begin)), end)
            run_group = self._group_forward(start, stop, micro_offset)
            if checkpoint is not None and self._is_checkpointable(self.forward_funcs[start:stop]):
                x = checkpoint(run_group, *(x if isinstance(x, tuple) else (x, )))
            else:
                x = run_group(*(x if isinstance(x, tuple) else (x, )))
        return x

    def _checkpoint_function(self):
        """Our C++ checkpoint in place of DeepSpeed's two (same rules for which
        groups qualify); None for any other function."""
        func = self.activation_checkpoint_func
        if func is checkpointing.checkpoint or func is activation_checkpointing.checkpoint:
            return activation_checkpointing.checkpoint
        if func is checkpointing.non_reentrant_checkpoint or func is activation_checkpointing.non_reentrant_checkpoint:
            # Every trainable parameter of the stage: those the group does not use get no gradient from it.
            params = [p for p in self.parameters() if p.requires_grad]
            return lambda run_group, *x: activation_checkpointing.non_reentrant_checkpoint(run_group, *x,
                                                                                             params=params)
        return None

    def _group_forward(self, start, end, micro_offset):
        """Layers [start, end) as one function of the group's inputs, seeding
        each layer as DeepSpeed does when seed_layers is set."""
        def run_group(*inputs):
            x = inputs[0] if len(inputs) == 1 else inputs
            for idx, layer in enumerate(self.forward_funcs[start:end]):
                # DeepSpeed numbers it idx + _local_start (not idx + start); with virtual stages: the layer's number
                self.curr_layer = (idx + self._local_start if self.virtual_stages == 1
                                   else self._layer_index[start + idx])
                if self.seed_layers:
                    seed = self.base_seed * micro_offset + self.curr_layer
                    (self.seed_fn or ds_utils.set_random_seed)(seed)
                x = layer(x)
            return x
        return run_group

    # ------------------------------------------------------------------ building
    def _build(self):
        self._layer_index = [i for start, stop in self._chunk_bounds for i in range(start, stop)]
        # Each chunk's slice of forward_funcs.
        self._chunk_funcs, begin = [], 0
        for start, stop in self._chunk_bounds:
            self._chunk_funcs.append((begin, begin + stop - start))
            begin += stop - start
        for layer_idx in self._layer_index:
            layer = self._layer_specs[layer_idx]
            if self.seed_layers:
                if self.seed_fn:
                    self.seed_fn(self.base_seed + layer_idx)
                else:
                    ds_utils.set_random_seed(self.base_seed + layer_idx)
            if isinstance(layer, nn.Module):
                name = str(layer_idx)
                self.forward_funcs.append(layer)
                self.fwd_map[name] = len(self.forward_funcs) - 1
                self.add_module(name, layer)
            elif isinstance(layer, ds_module.TiedLayerSpec):
                if layer.key not in self.tied_modules:
                    self.tied_modules[layer.key] = layer.build()
                    self.tied_weight_attrs[layer.key] = layer.tied_weight_attr
                module = self.tied_modules[layer.key]
                self.forward_funcs.append(module if layer.forward_fn is None else partial(layer.forward_fn, module))
            elif isinstance(layer, ds_module.LayerSpec):
                module = layer.build()
                name = str(layer_idx)
                self.forward_funcs.append(module)
                self.fwd_map[name] = len(self.forward_funcs) - 1
                self.add_module(name, module)
            else:
                self.forward_funcs.append(layer)
        # DeepSpeed's fp16 optimizer treats every pipeline parameter as model parallel.
        for p in self.parameters():
            p.ds_pipe_replicated = False

    def _index_tied_modules(self):
        """One process group per tied key and data/model-parallel replica,
        spanning the stages that hold a layer with that key."""
        tied_comms = {}
        if self._topo.get_dim('pipe') == 1:
            return tied_comms
        specs = self._layer_specs
        keys = sorted({s.key for s in specs if isinstance(s, ds_module.TiedLayerSpec)})
        mp_size = self._grid.get_slice_parallel_world_size()
        for key in keys:
            stages = sorted({self.stage_owner(i) for i, s in enumerate(specs)
                             if isinstance(s, ds_module.TiedLayerSpec) and s.key == key})
            for dp in range(self._grid.data_parallel_size):
                for mp in range(mp_size):
                    extra = {'data': dp, 'model': mp} if mp_size > 1 else {'data': dp}
                    ranks = [self._grid.stage_to_global(stage_id=s, **extra) for s in stages]
                    group = dist.new_group(ranks=ranks)
                    if self.global_rank in ranks:
                        tied_comms[key] = {
                            'ranks': ranks,
                            'group': group,
                            'weight_attr': self.tied_weight_attrs[key],
                            'module': self.tied_modules[key],
                        }
                        # Count a tied module once in the eyes of the fp16 optimizer.
                        if self.global_rank != ranks[0]:
                            for p in self.tied_modules[key].parameters():
                                p.ds_pipe_replicated = True
        return tied_comms

    def _synchronize_tied_weights(self):
        for comm in self.tied_comms.values():
            for attr_name in comm['weight_attr']:
                weight = self._recursive_getattr(comm['module'], attr_name)
                dist.broadcast(weight.data, src=min(comm['ranks']), group=comm['group'])

    def allreduce_tied_weight_gradients(self) -> None:
        """Sum the gradients of tied weights over the stages that share them."""
        for key, comm in self.tied_comms.items():
            for attr_name in comm['weight_attr']:
                weight = self._recursive_getattr(self.tied_modules[key], attr_name)
                dist.all_reduce(weight.grad, group=comm['group'])
