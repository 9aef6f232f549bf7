"""PipelineEngine: a DeepSpeedEngine whose pipeline schedule runs in C++.

The C++ executor (csrc/runtime) runs a whole train_batch / eval_batch
instruction stream: buffers, p2p over the pipe-parallel c10d group, the
backward of non-last stages. It calls back here only for what must be
Python: loading a micro-batch, the stage's forward and loss, the loss
backward (DeepSpeed's scaling), and the reductions and optimizer step that
DeepSpeedEngine implements.

Status: fp32, bf16 and fp16 (DeepSpeed's loss scaler: static or dynamic,
overflowing steps skipped) with the 1F1B, GPipe or (several model chunks per
rank) interleaved 1F1B schedule; the ZB-H1 and ZB-V zero-bubble schedules
(split backward) with fp32 and ZeRO stage 0; compute orders from a file. Importing
deepspeed_pipe_ext makes `deepspeed.initialize` build this engine for
deepspeed_pipe_ext's PipelineModule (and, after
`run_deepspeed_pipelines_on_this_engine()`, for DeepSpeed's own
PipelineModule too).
`deepspeed_pipe_ext.engine.initialize(...)` always builds this engine.
"""
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from deepspeed.runtime.activation_checkpointing import checkpointing as ds_checkpointing
from deepspeed.runtime.base_optimizer import ZeROOptimizer
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from deepspeed.runtime.config import DeepSpeedConfig
from deepspeed.runtime.engine import MEMORY_OPT_ALLREDUCE_SIZE, DeepSpeedEngine
from deepspeed.runtime.pipe import schedule as _ds_schedule
from deepspeed.runtime.pipe.engine import PipelineEngine as DSPipelineEngine
from deepspeed.runtime.pipe.module import PipelineError
from deepspeed.runtime.pipe.module import PipelineModule as DSPipelineModule
from deepspeed.utils import RepeatingLoader

from . import _deepspeed_compat
from ._engine_checks import (
    RUNNABLE_SCHEDULES,
    SPLIT_BACKWARD_SCHEDULES,
    VIRTUAL_STAGE_SCHEDULES,
    check_layout,
    check_supported,
    p2p_timeout,
)
from ._engine_data import MicroBatchLoader
from ._engine_failures import BatchGuard, bound_collectives
from ._engine_losses import LossReporter
from ._failures import FailureBoard
from ._native import _C
from ._placement import Placement
from ._router import engine_class_for, install, run_deepspeed_pipelines_on_this_engine  # noqa: F401
from ._stage_run import StageRun
from .schedule import ComputeOrder, load_schedule

__all__ = ["PipelineEngine", "initialize", "run_deepspeed_pipelines_on_this_engine", "engine_class_for"]


class PipelineEngine(DSPipelineEngine):
    """DeepSpeed's pipeline engine interface over the C++ executor.

    A subclass of DeepSpeed's PipelineEngine, so that every type check of
    DeepSpeed's and its users' (`isinstance(engine, deepspeed.PipelineEngine)`
    in Megatron-DeepSpeed's training loop, DeepSpeed's own data samplers) sees
    a pipeline engine. None of DeepSpeed's pipeline machinery runs: __init__
    goes straight to DeepSpeedEngine's, and every method of DeepSpeed's
    PipelineEngine a caller reaches is overridden here
    (tests/*/test_engine_surface.py check that), so the DeepSpeedEngine methods
    ours build on are called by name, never through super().

    The engine keeps DeepSpeed's API and configuration and composes its parts:
    `placement` (where this rank's chunks sit, computed once), a
    MicroBatchLoader (data), a LossReporter (loss collectives), a BatchGuard
    (failures and bounded waits), and per batch a StageRun, the callbacks the
    C++ executor calls, holding that batch's state."""

    def __init__(self, has_bool_tensors=False, *super_args, **super_kwargs):
        # Refuse what this engine cannot run before DeepSpeedEngine builds anything.
        if not isinstance(super_kwargs.get("model"), DSPipelineModule):
            raise TypeError("PipelineEngine needs a PipelineModule (deepspeed_pipe_ext's or DeepSpeed's)")
        if super_kwargs.get("config_class") is not None:
            check_supported(super_kwargs["config_class"], super_kwargs["model"])
        DeepSpeedEngine.__init__(self, *super_args, **super_kwargs)
        config = _deepspeed_compat.engine_config(self)
        check_supported(config, self.module)
        pipeline = config.pipeline
        self.schedule_kind = pipeline.get("schedule", "1f1b")
        # A hand-written schedule (a ComputeOrder, or the path of its CSV file) runs as its ComputeOrder.
        self.schedule_kind = load_schedule(self.schedule_kind) or self.schedule_kind
        self._schedule_class = None  # a PipeSchedule subclass given to set_schedule
        # The engine schedules the gradient all-reduce itself.
        self.enable_backward_allreduce = False
        self.pipeline_enable_backward_allreduce = True
        self._force_grad_boundary = False

        # DeepSpeed's bf16 optimizer keeps fp32 gradients beside the model's bf16 ones.
        self.using_bf16_optimizer = type(self.optimizer) is BF16_Optimizer
        self._refuse_split_backward_blockers()
        self.micro_batch_size = self.train_micro_batch_size_per_gpu()
        self.micro_batches = self.gradient_accumulation_steps()
        self.grid = _deepspeed_compat.module_grid(self.module)
        self.global_rank = self.grid.get_global_rank()
        self.num_stages = self.grid.pipe_parallel_size
        self.stage_id = self.grid.get_stage_id()
        self.prev_stage, self.next_stage = self.stage_id - 1, self.stage_id + 1
        self.placement = Placement.of(self.module, self.num_stages, self.stage_id)
        dp = self.grid.data_parallel_size
        if self.train_batch_size() != self.micro_batch_size * self.micro_batches * dp:
            raise ValueError(f"train_batch_size ({self.train_batch_size()}) must equal "
                             f"train_micro_batch_size_per_gpu ({self.micro_batch_size}) x "
                             f"gradient_accumulation_steps ({self.micro_batches}) x data-parallel size ({dp})")
        self.is_pipe_parallel = self.num_stages > 1
        self.is_data_parallel = dp > 1
        self.is_model_parallel = self.grid.model_parallel_size > 1
        self.is_pipe_partitioned = self.is_model_parallel and pipeline["pipe_partitioned"]
        self.is_grad_partitioned = self.is_model_parallel and pipeline["grad_partitioned"]
        # DeepSpeed's engine needs these to send bool tensors; ours carries every dtype as it is.
        self.has_bool_tensors = has_bool_tensors
        self.has_attention_mask = self.module.__class__.__name__ == "GPT2ModelPipe"
        self.log_batch_step_id = -1

        self._loader = MicroBatchLoader(self.placement, self.device, f"stage {self.stage_id}")
        if self.training_data:
            self._build_data_iter(self.training_data)

        if pipeline.get("use_reentrant") is None:
            pipeline["use_reentrant"] = True
        if pipeline["use_reentrant"] is False:
            self.module.activation_checkpoint_func = ds_checkpointing.non_reentrant_checkpoint
        if pipeline["activation_checkpoint_interval"] > 0:
            self.module.activation_checkpoint_interval = pipeline["activation_checkpoint_interval"]
        if self.module.activation_checkpoint_interval > 0:
            _deepspeed_compat.precompute_checkpointable_values(self.module)
        self._loader.inputs_require_grad = self._reentrant_activation_checkpointing()
        self.module.checkpoint_parallel_write_pipeline = config.checkpoint_parallel_write_pipeline

        # A sent stage output keeps its autograd graph but not its storage (Megatron's deallocate_output_tensor).
        self.deallocate_outputs = bool(pipeline.get("deallocate_outputs", True))
        timeout = self.p2p_timeout = p2p_timeout(pipeline.get("p2p_timeout", 300))
        self.p2p = None
        self._dynamic_shapes = bool(self.module.dynamic_shape)
        # 3D parallelism: the tensor-parallel ranks of a stage send 1/TP of the first tensor each.
        self._tp_split = None
        if self.is_pipe_parallel and (self.is_pipe_partitioned or self.is_grad_partitioned):
            self._tp_split = _C.TensorParallelSplit(self.grid.get_slice_parallel_group(), timeout,
                                                    f"stage {self.stage_id} (global rank {self.global_rank})")
        if self.is_pipe_parallel:
            self.p2p = _C.P2P(self.grid.get_pipe_parallel_group(), timeout,
                              f"stage {self.stage_id} (global rank {self.global_rank})",
                              dynamic_shapes=self._dynamic_shapes, device=str(self.device),
                              peer_label="stage")
        # DeepSpeed's names for the last batch's results: its losses summed over micro-batches, their mean
        # over micro-batches and data-parallel ranks, the last micro-batch's loss, the additional losses.
        self.total_loss = None
        self.agg_train_loss = None
        self.loss = torch.tensor(0.0).to(self.device)
        self.agg_loss = torch.tensor(0.0, requires_grad=False).to(self.device)
        self.dynamic_shape = self.module.dynamic_shape
        self.total_additional_losses = None
        self.agg_additional_losses = None
        # DeepSpeed's names for the last batch's per-micro-batch losses (or outputs), and for eval_batch's
        # return_logits state, which it keeps only while the batch runs.
        self.fwd_outputs = []
        self.eval_return_logits = False
        self.outputs = None
        # Failures travel: a batch that fails on any rank stops every rank, and none steps on it.
        board = None
        if dist.get_world_size() > 1:
            board = FailureBoard(f"stage {self.stage_id} (global rank {self.global_rank})", timeout)
            if self.p2p is not None:
                board.on_failure(self.p2p.abort)
            weakref.finalize(self, board.close)
            bound_collectives(self.grid, self.module, self.global_rank, timeout)
        who = f"global rank {self.global_rank} (stage {self.stage_id}" + (
            f", data-parallel rank {self.grid.get_data_parallel_rank()})" if self.is_data_parallel else ")")
        self._guard = BatchGuard(board, who, self.stage_id, self.global_rank, timeout)
        self._losses = LossReporter(self.grid, self.placement, self.device, self.global_rank,
                                    self._loss_stage_global_rank(),
                                    lambda value, **kw: _deepspeed_compat.scale_loss_by_gas(self, value, **kw),
                                    self._guard.bounded)
        self._programs = {}
        self._stage_run = None  # the batch running now
        self.last_timeline = []
        # The last batch's activation buffers: count allocated, most in use at
        # once, and the bytes of activation tensors they held at their fullest.
        self.last_buffer_usage = {}
        if board is not None:  # no rank starts a batch before every rank can hear its failure
            board.agree_built()

    # ------------------------------------------------------------------ DeepSpeed's pipeline API
    def train_batch(self, data_iter: Iterator[Any] | None = None) -> torch.Tensor:
        """Train on the next `gradient_accumulation_steps` micro-batches; returns
        the loss averaged over micro-batches and data-parallel ranks."""
        if not torch.is_grad_enabled():
            raise RuntimeError('train_batch() requires gradients enabled. Use eval_batch() instead.')
        if data_iter is not None:
            self.set_dataiterator(data_iter)
        self.module.train()
        start = time.perf_counter()
        with self._guard.batch(training=True):  # a stage without data fails there, and every other rank stops
            self._loader.require_data()
            run = self._run(self.schedule_kind, self.micro_batches)
            self.total_loss, self.total_additional_losses = run.total_loss(), run.additional_losses
            if run.losses:
                self.loss = run.losses[-1]
            with torch.no_grad():
                self.agg_train_loss = self._aggregate_total_loss()
        self._log_progress(time.perf_counter() - start)
        return self.agg_train_loss

    def _log_progress(self, elapsed):
        """DeepSpeed's steps_per_print line: loss, iteration time, samples/s."""
        self._elapsed_since_print = getattr(self, "_elapsed_since_print", 0.0) + elapsed
        every = self.steps_per_print()
        if every is None or self.global_steps % every != 0:
            return
        if self.global_rank == 0:
            iter_time = self._elapsed_since_print / every
            line = f"steps: {self.global_steps} loss: {self.agg_train_loss:0.4f} "
            for name, value in (self.agg_additional_losses or {}).items():
                line += f"{name}: {value.item():0.4f} "
            print(f"{line}iter time (s): {iter_time:0.3f} samples/sec: {self.train_batch_size() / iter_time:0.3f}",
                  flush=True)
        self._elapsed_since_print = 0.0

    def eval_batch(self,
                   data_iter: Iterator[Any] | None,
                   return_logits: bool = False,
                   compute_loss: bool = True,
                   reduce_output: str | None = 'avg',
                   bcast_loss: bool = True,
                   num_micro_batches: int | None = None) -> Any:
        """Forward `num_micro_batches` (default: gradient_accumulation_steps)
        micro-batches without gradients; returns the reduced loss (and the
        last micro-batch's outputs with return_logits)."""
        self.module.eval()
        train_iterator = self.data_iterator
        self.set_dataiterator(data_iter)
        micro_batches = self.micro_batches if num_micro_batches is None else num_micro_batches
        eval_output = run = None
        with self._guard.batch(training=False):
            self._loader.require_data()
            with torch.no_grad():
                run = self._run("inference", micro_batches, compute_loss=compute_loss, return_logits=return_logits)
            self.total_loss = run.total_loss()
            if self._is_loss_stage():
                eval_output = self._reduce_outputs(run.losses, reduce=reduce_output, micro_batches=micro_batches)
            if compute_loss and bcast_loss:
                eval_output = self._bcast_pipe_scalar(eval_output)
        self.set_dataiterator(train_iterator)
        if return_logits:
            return eval_output, run.logits
        return eval_output

    def is_first_stage(self) -> bool:
        return self.stage_id == 0

    def is_last_stage(self) -> bool:
        return self.stage_id == self.num_stages - 1

    def _loss_stage_id(self):
        """The stage holding the last virtual stage, where the loss is computed:
        the last stage, or stage 0 when the module's chunks sit in a V."""
        return self.placement.loss_stage

    def _is_loss_stage(self):
        return self.placement.holds_loss

    def get_pipeline_parallel_rank(self):
        return self.stage_id

    def reset_activation_shape(self):
        """Forget the cached activation shapes: the next transfers send their meta again."""
        if self.p2p is not None:
            self.p2p.reset()

    def is_gradient_accumulation_boundary(self):
        return self._force_grad_boundary

    def set_train_batch_size(self, train_batch_size: int) -> None:
        """Changes the global batch size by changing the number of micro-batches
        (gradient accumulation steps); the micro-batch size stays."""
        DeepSpeedEngine.set_train_batch_size(self, train_batch_size)
        self.micro_batches = self.gradient_accumulation_steps()

    def set_has_attention_mask(self, value: bool) -> None:
        """DeepSpeed's engine needs to know that a bool attention mask travels
        between stages; ours carries every dtype as it is and only records it."""
        if not isinstance(value, bool):
            raise TypeError(f"set_has_attention_mask takes True or False, got {type(value).__name__}")
        self.has_attention_mask = value

    def log_for_device(self, *msg):
        """DeepSpeed's per-device debug print, gated by the same module-level
        switches (deepspeed.runtime.pipe.engine.LOG_STAGE / DATA_PARALLEL_ID,
        -1 for all, off by default)."""
        from deepspeed.runtime.pipe import engine as ds_engine
        if ds_engine.LOG_STAGE in (self.stage_id, -1) and \
                ds_engine.DATA_PARALLEL_ID in (self.grid.data_parallel_id, -1):
            print(f"RANK={dist.get_rank()} PIPE-ID={self.stage_id} DATA-ID={self.grid.data_parallel_id} "
                  f"STEP-ID={self.log_batch_step_id} ::", *msg, flush=True)

    def tput_log(self, *msg):
        """Prints on global rank 0 every steps_per_print steps."""
        if self.global_rank == 0 and self.global_steps % self.steps_per_print() == 0:
            print(*msg)

    def _loss_stage_global_rank(self):
        return self.grid.stage_to_global(stage_id=self._loss_stage_id())

    def _train_schedule(self):
        """This stage's training instructions as DeepSpeed's schedule objects."""
        from . import schedule
        return schedule.TrainSchedule(micro_batches=self.micro_batches, stages=self.num_stages,
                                      stage_id=self.stage_id)

    def _inference_schedule(self, micro_batches):
        from . import schedule
        return schedule.InferenceSchedule(micro_batches=micro_batches, stages=self.num_stages,
                                          stage_id=self.stage_id)

    def forward(self, *args, **kwargs):
        raise PipelineError("Only train_batch() is accessible in pipeline mode.")

    def backward(self, *args, **kwargs):
        raise PipelineError("Only train_batch() is accessible in pipeline mode.")

    def step(self, *args, **kwargs):
        raise PipelineError("Only train_batch() is accessible in pipeline mode.")

    def _backward_prologue_per_tensor(self, grad):
        # DeepSpeedEngine.forward hooks every output to scale its gradient for
        # gradient accumulation. Only the loss's own backward scales: not the
        # executor's backward of other stages, nor of the last rank's other
        # model chunks (virtual stages), whose incoming gradients are scaled.
        run = getattr(self, "_stage_run", None)
        if run is not None and run.loss_backward_running:
            return DeepSpeedEngine._backward_prologue_per_tensor(self, grad)
        return grad

    # ------------------------------------------------------------------ checkpoints (DeepSpeed's pipeline layout)
    def module_state_dict(self, exclude_frozen_parameters: bool = False) -> None:
        """Called by DeepSpeedEngine.save_checkpoint: the weights go to per-layer files."""
        from . import _checkpoint_files
        return _checkpoint_files.save_module_layers(self, exclude_frozen_parameters)

    def load_module_state_dict(self, checkpoint: dict[str, Any], strict: bool = True,
                               custom_load_fn: Callable[..., Any] | None = None, fetch_z3_params: bool = False,
                               z3_params_to_fetch: Any = None, allowed_missing_keys: Any = None) -> None:
        """Called by DeepSpeedEngine.load_checkpoint: the weights come from per-layer files."""
        from . import _checkpoint_files
        return _checkpoint_files.load_module_layers(self, checkpoint, strict=strict, custom_load_fn=custom_load_fn)

    def load_checkpoint(self, load_dir: str, tag: str | None = None, load_module_strict: bool = True,
                        load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                        load_module_only: bool = False,
                        custom_load_fn: Callable[..., Any] | None = None) -> tuple[str | None, dict[str, Any] | None]:
        """DeepSpeedEngine.load_checkpoint, after checking the files this engine will read."""
        from . import _checkpoint_files
        _checkpoint_files.check_before_load(self, load_dir, tag, load_optimizer_states=load_optimizer_states,
                                        load_module_only=load_module_only, load_module_strict=load_module_strict)
        return DeepSpeedEngine.load_checkpoint(self, load_dir, tag=tag, load_module_strict=load_module_strict,
                                       load_optimizer_states=load_optimizer_states,
                                       load_lr_scheduler_states=load_lr_scheduler_states,
                                       load_module_only=load_module_only, custom_load_fn=custom_load_fn)

    # ------------------------------------------------------------------ DeepSpeed's data API
    # DeepSpeed's attribute names for what the MicroBatchLoader owns.
    data_iterator = property(lambda self: self._loader.data_iterator,
                             lambda self, iterator: setattr(self._loader, "data_iterator", iterator))
    batch_fn = property(lambda self: self._loader.batch_fn, lambda self, fn: setattr(self._loader, "batch_fn", fn))

    def set_dataloader(self, loader: Iterable[Any]) -> None:
        if self._loader.loads_data:
            self.training_dataloader: Iterable[Any] | None = loader
            self.data_iterator = iter(self.training_dataloader)

    def set_dataiterator(self, iterator: Iterator[Any] | None) -> None:
        """Micro-batches come from `iterator` (only the first and the loss stages read it)."""
        if self._loader.loads_data:
            self.training_dataloader = None
            self.data_iterator = iterator

    def set_batch_fn(self, fn: Callable[[Any], Any] | None) -> None:
        """Post-process each loaded batch with `fn`."""
        self.batch_fn = fn

    def _build_data_iter(self, dataset):
        sampler = torch.utils.data.distributed.DistributedSampler(dataset, num_replicas=self.dp_world_size,
                                                                  rank=self.mpu.get_data_parallel_rank(),
                                                                  shuffle=False)
        self.set_dataloader(RepeatingLoader(self.deepspeed_io(dataset, data_sampler=sampler)))

    # ------------------------------------------------------------------ DeepSpeed's loss API
    def get_additional_losses(self) -> dict[str, torch.Tensor] | None:
        """The module's auxiliary losses (get_additional_losses(), e.g. MoE's)
        of the last batch: averaged over micro-batches and data-parallel ranks,
        on every stage; None when the module has none."""
        return self.agg_additional_losses

    def _aggregate_total_loss(self):
        """Mean loss over micro-batches, averaged over data-parallel ranks, sent
        to every stage; with the module's additional losses, as DeepSpeed does."""
        names = [] if self._is_loss_stage() else list((self.module.get_additional_losses() or {}).keys())
        self.dp_group_loss, agg_loss, self.agg_additional_losses = self._losses.aggregate(
            self.total_loss, self.total_additional_losses, names)
        return agg_loss

    def _reduce_outputs(self, outputs, reduce='avg', micro_batches=None):
        return self._losses.reduce_outputs(outputs, reduce=reduce, micro_batches=micro_batches)

    def _bcast_pipe_scalar(self, data, dtype=torch.float32):
        return self._losses.bcast_pipe_scalar(data, dtype=dtype)

    # ------------------------------------------------------------------ running a batch
    def _run(self, kind, micro_batches, compute_loss=True, return_logits=False):
        """Runs this stage's program for one batch; returns its StageRun."""
        run = StageRun(self, self._program(kind, micro_batches), compute_loss=compute_loss,
                       return_logits=return_logits)
        options = _C.RunOptions(release_sent_outputs=self.deallocate_outputs, split=self._tp_split,
                                split_activations=self.is_pipe_partitioned, split_grads=self.is_grad_partitioned,
                                failure_wait_s=self.p2p_timeout)
        self._stage_run = run
        try:
            with _deepspeed_compat.engine_backward_running(self):
                result = run.run(self.p2p, options)
        finally:
            self._stage_run = None
        # (start, end, op code, micro_batch, chunk) per compute pass, monotonic seconds: see timeline.py.
        self.last_timeline, self.last_buffer_usage = result["timeline"], result["buffer_usage"]
        self.fwd_outputs = run.losses
        return run

    def _plain_engine_path(self):
        """True when DeepSpeedEngine's forward and backward wrappers would add
        only bookkeeping (no ZeRO or bf16 optimizer, autocast, compilation,
        timers or memory reports): the callbacks then call the module and
        autograd directly, with the same arithmetic (the loss divided by the
        gradient accumulation steps, as DeepSpeedEngine.backward does)."""
        return not self._plain_path_blockers()

    def _plain_path_blockers(self):
        """What in the config needs DeepSpeedEngine's forward/backward wrappers."""
        checks = (("a ZeRO optimizer", isinstance(self.optimizer, ZeROOptimizer) and not self.using_bf16_optimizer),
                  ("bf16", self.using_bf16_optimizer),
                  ("fp16", self.fp16_enabled()),
                  ("torch_autocast", self.torch_autocast_enabled() or self.torch_autocast_z0_gradscaler is not None),
                  ("compile", self.is_deepcompile_enabled() or self.is_compiled
                              or _deepspeed_compat.compiled_autograd_enabled(self)),
                  ("wall_clock_breakdown", self.wall_clock_breakdown()),
                  ("memory_breakdown", self.memory_breakdown()),
                  ("autotuning", self.autotuning_profile_model_info()))
        return [name for name, present in checks if present]

    def _only_engine_hooks(self, plain_path):
        """On the plain path, DeepSpeedEngine's own forward pre/post hooks on
        the module only start and stop timers it does not use there; when they
        are the module's only hooks, the callbacks call module.forward directly.
        Anyone else's hook (a user's, a profiler's) keeps the full module call."""
        module = self.module
        if not plain_path or self.flops_profiler_enabled() or self.random_ltd_enabled():
            return False
        handles = (getattr(self, "module_forward_pre_hook", None), getattr(self, "module_forward_post_hook", None))
        if None in handles:
            return False
        global_hooks = _deepspeed_compat.global_module_hooks()
        pre, post, backward, backward_pre = _deepspeed_compat.module_hook_ids(module)
        return (pre == [handles[0].id] and post == [handles[1].id] and not backward and not backward_pre
                and not any(global_hooks))

    def _splits_backward(self):
        if isinstance(self.schedule_kind, ComputeOrder):
            return self.schedule_kind.splits_backward
        return self.schedule_kind in SPLIT_BACKWARD_SCHEDULES

    def _refuse_split_backward_blockers(self):
        blockers = self._plain_path_blockers() if self._splits_backward() else []
        if blockers:
            raise ValueError(f"schedule {self.schedule_kind!r} splits the backward pass, which runs with fp32 and ZeRO "
                             f"stage 0 without DeepSpeed's backward wrappers; this config has: "
                             f"{', '.join(blockers)}. Remove those or use the 1f1b schedule")

    def set_schedule(self, schedule):
        """Runs later train batches with `schedule`: a built-in kind name
        ("1f1b", "gpipe", "zb-h1"), a deepspeed_pipe_ext.schedule.ComputeOrder
        or the path of its CSV file, or a subclass of DeepSpeed's PipeSchedule
        (its compute passes, built for this pipeline's stages and
        micro-batches). Every rank must set the same one; it is proven by the
        simulator before its first step."""
        order = load_schedule(schedule)
        chunks = self.placement.chunks
        is_class = isinstance(schedule, type) and issubclass(schedule, _ds_schedule.PipeSchedule)
        if is_class and chunks > 1:
            raise ValueError(f"stage {self.stage_id}: this module has {chunks} model chunks per rank, and a "
                             "PipeSchedule subclass runs one; give set_schedule a compute order for its chunks or "
                             f"one of {sorted(VIRTUAL_STAGE_SCHEDULES)}")
        if not is_class:
            check_layout(order if order is not None else schedule, self.module)
        if order is None and not is_class and schedule not in RUNNABLE_SCHEDULES | set(VIRTUAL_STAGE_SCHEDULES):
            raise ValueError(f"stage {self.stage_id}: schedule {schedule!r} cannot run: choose one of "
                             f"{sorted(RUNNABLE_SCHEDULES)}, a ComputeOrder or the path of its CSV file, or a "
                             "subclass of DeepSpeed's PipeSchedule")
        if is_class:
            order = ComputeOrder.from_pipe_schedule(schedule, self.micro_batches, self.num_stages)
        previous = (self.schedule_kind, self._schedule_class)
        self.schedule_kind = schedule if order is None else order
        self._schedule_class = schedule if is_class else None  # rebuilt if the micro-batch count changes
        try:
            self._refuse_split_backward_blockers()
        except ValueError:
            self.schedule_kind, self._schedule_class = previous
            raise

    def _program(self, kind, micro_batches):
        """This stage's program, built once per configuration."""
        if isinstance(kind, ComputeOrder):
            return self._custom_program(kind, micro_batches)
        key = (kind, micro_batches)
        if key not in self._programs:  # dynamic shapes as the P2P channels were built
            place = self.placement
            self._programs[key] = _C.StageProgram(kind, micro_batches, place.stages, place.stage,
                                                  dynamic_shapes=self._dynamic_shapes, chunks=place.chunks,
                                                  layout=place.layout)
        return self._programs[key]

    def _custom_program(self, order, micro_batches):
        if self._schedule_class is not None and order.micro_batches != micro_batches:
            order = ComputeOrder.from_pipe_schedule(self._schedule_class, micro_batches, self.num_stages)
            self.schedule_kind = order
        if order.stages != self.num_stages or order.micro_batches != micro_batches:
            raise ValueError(f"stage {self.stage_id}: the compute order is written for {order.stages} ranks and "
                             f"{order.micro_batches} micro-batches, but this pipeline has {self.num_stages} stages "
                             f"and {micro_batches} micro-batches per batch (gradient_accumulation_steps): write one "
                             "row per stage and every micro-batch's passes")
        key = (tuple(map(tuple, order.rows)), micro_batches)  # by content: an id can be reused
        if key not in self._programs:
            self._programs[key] = _C.StageProgram.from_compute_order(order.rows, micro_batches, self.stage_id,
                                                                     dynamic_shapes=self._dynamic_shapes,
                                                                     chunks=order.chunks, layout=order.layout)
        return self._programs[key]

    def _reentrant_activation_checkpointing(self):
        """The module checkpoints activations with the reentrant function, so
        the first stage's float inputs must require grad."""
        return (self.module.activation_checkpoint_interval > 0
                and self.module.activation_checkpoint_func is not ds_checkpointing.non_reentrant_checkpoint)

    def _stage_backward_callbacks(self, placement):
        """Around the executor's backward on stages without the loss: the bf16
        optimizer's gradient bookkeeping, which DeepSpeedEngine.backward does
        for the loss stage."""
        if not self.using_bf16_optimizer or placement.holds_loss:
            return None, None
        after = None
        if not _deepspeed_compat.engine_config(self).bfloat16_config.immediate_grad_update:
            after = lambda: self.optimizer.update_hp_grads(clear_lp_grads=False)
        return self.optimizer.clear_lp_grads, after

    # ------------------------------------------------------------------ the reductions and the step
    def _reduce_tied_grads(self):
        self._guard.agree_before_step()
        for weight, group in self.module.get_tied_weights_and_groups():
            grad = _deepspeed_compat.high_precision_grad(weight) if self.using_bf16_optimizer else weight.grad
            if grad is not None:
                self._guard.bounded(dist.all_reduce(grad, group=group, async_op=True), "the tied-weight all-reduce",
                                    group)

    def _reduce_grads(self, plain_path):
        self._guard.agree_before_step()
        if plain_path and self.dp_world_size == 1 and not self.has_moe_layers:
            # An all-reduce over one rank (and a division by 1) changes no value, so it is skipped; but
            # DeepSpeed's gives each trainable weight without a gradient a zero one, which the optimizer then
            # steps (weight decay moves the weight, Adam counts the step): keep that side effect.
            if self.pipeline_enable_backward_allreduce:
                self._zero_missing_grads()
            return
        self._force_grad_boundary = True
        try:
            with self._guard.collectives("the data-parallel gradient all-reduce", self.grid.get_data_parallel_group()):
                if self.pipeline_enable_backward_allreduce and self.using_bf16_optimizer:
                    self.buffered_allreduce_fallback(grads=None, elements_per_buffer=MEMORY_OPT_ALLREDUCE_SIZE)
                elif self.pipeline_enable_backward_allreduce:
                    self.allreduce_gradients(bucket_size=MEMORY_OPT_ALLREDUCE_SIZE)
        finally:
            self._force_grad_boundary = False

    def _zero_missing_grads(self):
        """What DeepSpeedEngine's gradient all-reduce does to a trainable weight
        that got no gradient (one a stage holds but never uses, as the last
        stage's copy of a tied embedding's position weights): a zero gradient."""
        for param in self.module.parameters():
            if param.requires_grad and param.grad is None and param.numel() > 0:
                param.grad = torch.zeros(param.size(), dtype=param.dtype, device=param.device)

    def _optimizer_step(self):
        self._guard.agree_before_step()
        self._force_grad_boundary = True
        try:
            with self._guard.collectives("a collective of the optimizer step (gradient clipping's norm, ZeRO's "
                                         "gathers)", self.grid.get_model_parallel_group(),
                                         self.grid.get_data_parallel_group()):
                _deepspeed_compat.take_model_step(self)
        finally:
            self._force_grad_boundary = False


def initialize(args: Any = None,
               model: DSPipelineModule | None = None,
               optimizer: torch.optim.Optimizer | Callable[..., Any] | None = None,
               model_parameters: Iterable[Any] | None = None,
               training_data: torch.utils.data.Dataset | None = None,
               lr_scheduler: Any = None,
               dist_init_required: bool | None = None,
               collate_fn: Callable[..., Any] | None = None,
               config: str | dict[str, Any] | None = None,
               config_params: str | dict[str, Any] | None = None) -> tuple[PipelineEngine, Any, Any, Any]:
    """deepspeed.initialize for a PipelineModule, returning our PipelineEngine:
    (engine, optimizer, training_dataloader, lr_scheduler)."""
    if not isinstance(model, DSPipelineModule):
        raise TypeError("deepspeed_pipe_ext.engine.initialize needs a PipelineModule")
    config = config if config is not None else config_params
    mpu = model.mpu()
    config_class = DeepSpeedConfig(config, mpu)
    engine = PipelineEngine(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
                            training_data=training_data, lr_scheduler=lr_scheduler, mpu=mpu,
                            dist_init_required=dist_init_required, collate_fn=collate_fn, config=config,
                            config_class=config_class)
    return engine, engine.optimizer, engine.training_dataloader, engine.lr_scheduler
