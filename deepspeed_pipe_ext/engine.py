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
import functools
import time
import types
import weakref
from collections import OrderedDict

import torch
import torch.distributed as dist
from deepspeed.runtime.activation_checkpointing import checkpointing as ds_checkpointing
from deepspeed.runtime.base_optimizer import ZeROOptimizer
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from deepspeed.runtime.config import DeepSpeedConfig
from deepspeed.runtime.engine import MEMORY_OPT_ALLREDUCE_SIZE, DeepSpeedEngine
from deepspeed.runtime.pipe import schedule as _ds_schedule
from deepspeed.runtime.pipe.engine import PipelineEngine as DSPipelineEngine
from deepspeed.runtime.pipe.module import PipelineError, PipelineModule as DSPipelineModule

from . import _deepspeed_compat
from ._native import _C
from .schedule import ComputeOrder, load_schedule
from .engine_checks import (RUNNABLE_SCHEDULES, SPLIT_BACKWARD_SCHEDULES, VIRTUAL_STAGE_SCHEDULES, check_layout,
                            check_supported, p2p_timeout)
from .engine_data import MicroBatchLoading
from .engine_failures import FailureHandling
from .engine_losses import LossReporting
from .failures import FailureBoard

__all__ = ["PipelineEngine", "initialize", "run_deepspeed_pipelines_on_this_engine", "engine_class_for"]

_TRAIN_TAGS, _EVAL_TAGS = 0, 2  # separate p2p channels: eval tensors differ (no grad, other shapes)


class PipelineEngine(MicroBatchLoading, LossReporting, FailureHandling, DSPipelineEngine):
    """DeepSpeed's pipeline engine interface over the C++ executor.

    A subclass of DeepSpeed's PipelineEngine, so that every type check of
    DeepSpeed's and its users' (`isinstance(engine, deepspeed.PipelineEngine)`
    in Megatron-DeepSpeed's training loop, DeepSpeed's own data samplers) sees
    a pipeline engine. None of DeepSpeed's pipeline machinery runs: __init__
    goes straight to DeepSpeedEngine's, and every method of DeepSpeed's
    PipelineEngine a caller reaches is overridden here or in the mixins
    (tests/test_engine_surface.py checks that), so the DeepSpeedEngine methods
    ours build on are called by name, never through super()."""

    def __init__(self, has_bool_tensors=False, *super_args, **super_kwargs):
        # Refuse what this engine cannot run before DeepSpeedEngine builds anything.
        if not isinstance(super_kwargs.get("model"), DSPipelineModule):
            raise TypeError("PipelineEngine needs a PipelineModule (deepspeed_pipe_ext's or DeepSpeed's)")
        if super_kwargs.get("config_class") is not None:
            check_supported(super_kwargs["config_class"], super_kwargs["model"])
        DeepSpeedEngine.__init__(self, *super_args, **super_kwargs)
        config = _deepspeed_compat.engine_config(self)
        check_supported(config, self.module)
        self._chunks = getattr(self.module, "virtual_stages", 1)  # model chunks (virtual stages) per rank
        self._layout = getattr(self.module, "virtual_layout", "interleaved")  # where the chunks sit
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

        self.data_iterator = None
        self.batch_fn = None
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
        self.total_loss = None
        self.agg_train_loss = None
        self.loss = torch.tensor(0.0).to(self.device)  # DeepSpeed's names: the last micro-batch's loss
        self.agg_loss = torch.tensor(0.0, requires_grad=False).to(self.device)
        self.dynamic_shape = self.module.dynamic_shape
        self.total_additional_losses = None  # a module's get_additional_losses(), summed over micro-batches
        self.agg_additional_losses = None
        self._failed_batch = None  # what made a batch fail: later batches refuse to run
        self._train_batches = 0  # the same count on every rank: names a batch's barrier on the store
        self._agreed = False
        # Failures travel: a batch that fails on any rank stops every rank, and none steps on it.
        self._failures = None
        if dist.get_world_size() > 1:
            self._failures = FailureBoard(f"stage {self.stage_id} (global rank {self.global_rank})", timeout)
            if self.p2p is not None:
                self._failures.on_failure(self.p2p.abort)
            weakref.finalize(self, self._failures.close)
            self._bound_collectives(timeout)
        self._programs = {}
        self.last_timeline = []
        # The last batch's activation buffers: count allocated, most in use at
        # once, and the bytes of activation tensors they held at their fullest.
        self.last_buffer_usage = {}
        self.eval_return_logits = False
        self.outputs = None
        if self._failures is not None:  # no rank starts a batch before every rank can hear its failure
            self._failures.agree_built()

    # ------------------------------------------------------------------ DeepSpeed's pipeline API
    def train_batch(self, data_iter=None):
        """Train on the next `gradient_accumulation_steps` micro-batches; returns
        the loss averaged over micro-batches and data-parallel ranks."""
        if not torch.is_grad_enabled():
            raise RuntimeError('train_batch() requires gradients enabled. Use eval_batch() instead.')
        if data_iter is not None:
            self.set_dataiterator(data_iter)
        self.module.train()
        self.total_loss = None
        self.total_additional_losses = None
        self._compute_loss = True
        start = time.perf_counter()
        self._train_batches += 1
        with self._batch_guard():  # a stage without data fails there, and every other rank stops at once
            self._require_data()
            self._run(self.schedule_kind, self.micro_batches, _TRAIN_TAGS)
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

    def eval_batch(self, data_iter, return_logits=False, compute_loss=True, reduce_output='avg', bcast_loss=True,
                   num_micro_batches=None):
        """Forward `num_micro_batches` (default: gradient_accumulation_steps)
        micro-batches without gradients; returns the reduced loss (and the
        last micro-batch's outputs with return_logits)."""
        self.eval_return_logits = return_logits
        self.module.eval()
        self._compute_loss = compute_loss
        train_iterator = self.data_iterator
        self.set_dataiterator(data_iter)
        micro_batches = self.micro_batches if num_micro_batches is None else num_micro_batches
        self.total_loss = None
        eval_output = None
        with self._batch_guard():
            self._require_data()
            with torch.no_grad():
                self._run("inference", micro_batches, _EVAL_TAGS)
            if self._is_loss_stage():
                eval_output = self._reduce_outputs(self.fwd_outputs, reduce=reduce_output, micro_batches=micro_batches)
            if compute_loss and bcast_loss:
                eval_output = self._bcast_pipe_scalar(eval_output)
        self.set_dataiterator(train_iterator)
        self.eval_return_logits = False
        if return_logits:
            outputs, self.outputs = self.outputs, None
            return eval_output, outputs
        return eval_output

    def is_first_stage(self):
        return self.stage_id == 0

    def is_last_stage(self):
        return self.stage_id == self.num_stages - 1

    def _loss_stage_id(self):
        """The stage holding the last virtual stage, where the loss is computed:
        the last stage, or stage 0 when the module's chunks sit in a V."""
        module = self.module
        if getattr(module, "virtual_stages", 1) == 1:
            return self.num_stages - 1
        return module.place_of(self.num_stages * module.virtual_stages - 1)[0]

    def _is_loss_stage(self):
        return self.stage_id == self._loss_stage_id()

    def get_pipeline_parallel_rank(self):
        return self.stage_id

    def reset_activation_shape(self):
        """Forget the cached activation shapes: the next transfers send their meta again."""
        if self.p2p is not None:
            self.p2p.reset()

    def is_gradient_accumulation_boundary(self):
        return self._force_grad_boundary

    def set_train_batch_size(self, train_batch_size):
        """Changes the global batch size by changing the number of micro-batches
        (gradient accumulation steps); the micro-batch size stays."""
        DeepSpeedEngine.set_train_batch_size(self, train_batch_size)
        self.micro_batches = self.gradient_accumulation_steps()

    def set_has_attention_mask(self, value):
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
        if getattr(self, "_loss_backward_running", False):
            return DeepSpeedEngine._backward_prologue_per_tensor(self, grad)
        return grad

    # ------------------------------------------------------------------ checkpoints (DeepSpeed's pipeline layout)
    def module_state_dict(self, exclude_frozen_parameters=False):
        """Called by DeepSpeedEngine.save_checkpoint: the weights go to per-layer files."""
        from . import pipeline_checkpoints
        return pipeline_checkpoints.save_module_layers(self, exclude_frozen_parameters)

    def load_module_state_dict(self, checkpoint, strict=True, custom_load_fn=None, fetch_z3_params=False,
                               z3_params_to_fetch=None, allowed_missing_keys=None):
        """Called by DeepSpeedEngine.load_checkpoint: the weights come from per-layer files."""
        from . import pipeline_checkpoints
        return pipeline_checkpoints.load_module_layers(self, checkpoint, strict=strict, custom_load_fn=custom_load_fn)

    def load_checkpoint(self, load_dir, tag=None, load_module_strict=True, load_optimizer_states=True,
                        load_lr_scheduler_states=True, load_module_only=False, custom_load_fn=None):
        """DeepSpeedEngine.load_checkpoint, after checking the files this engine will read."""
        from . import pipeline_checkpoints
        pipeline_checkpoints.check_before_load(self, load_dir, tag, load_optimizer_states=load_optimizer_states,
                                        load_module_only=load_module_only, load_module_strict=load_module_strict)
        return DeepSpeedEngine.load_checkpoint(self, load_dir, tag=tag, load_module_strict=load_module_strict,
                                       load_optimizer_states=load_optimizer_states,
                                       load_lr_scheduler_states=load_lr_scheduler_states,
                                       load_module_only=load_module_only, custom_load_fn=custom_load_fn)

    # ------------------------------------------------------------------ executor callbacks
    def _run(self, kind, micro_batches, tag_base):
        self._plain_path = self._plain_engine_path()
        # A stage that trains something (or passes gradients on) must send outputs that carry gradients.
        # (With several chunks per rank every rank has a chunk that passes its outputs on.)
        self._needs_grad_outputs = (self.module.training and torch.is_grad_enabled()
                                    and (self._chunks > 1 or not self._is_loss_stage())
                                    and (self.stage_id > 0 or any(p.requires_grad for p in self.module.parameters())))
        # A bound method either way: an nn.Module assigned here would become a child module of the engine.
        self._stage_forward = self.module.forward if self._only_engine_hooks() else self.module.__call__
        self.fwd_outputs = []
        with _deepspeed_compat.engine_backward_running(self):
            # (start, end, op code, micro_batch, chunk) per compute pass, monotonic seconds: see timeline.py.
            # self.p2p's group is the pipe-parallel group, where stage s is rank s.
            self.last_timeline, self.last_buffer_usage = _C.run_stage(
                self.p2p, self._program(kind, micro_batches), self.num_stages, self.stage_id,
                tag_base, self._executor_callbacks(), release_sent_outputs=self.deallocate_outputs,
                split=self._tp_split, split_activations=self.is_pipe_partitioned,
                split_grads=self.is_grad_partitioned, chunks=self._chunks, layout=self._layout)

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

    def _only_engine_hooks(self):
        """On the plain path, DeepSpeedEngine's own forward pre/post hooks on
        the module only start and stop timers it does not use there; when they
        are the module's only hooks, the callbacks call module.forward directly.
        Anyone else's hook (a user's, a profiler's) keeps the full module call."""
        module = self.module
        if not self._plain_path or self.flops_profiler_enabled() or self.random_ltd_enabled():
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
        is_class = isinstance(schedule, type) and issubclass(schedule, _ds_schedule.PipeSchedule)
        if is_class and self._chunks > 1:
            raise ValueError(f"stage {self.stage_id}: this module has {self._chunks} model chunks per rank, and a "
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
        """This stage's instruction stream, generated once per configuration."""
        if isinstance(kind, ComputeOrder):
            return self._custom_program(kind, micro_batches)
        key = (kind, micro_batches)
        if key not in self._programs:  # dynamic shapes as the P2P channels were built
            self._programs[key] = _C.StageProgram(kind, micro_batches, self.num_stages, self.stage_id,
                                                  dynamic_shapes=self._dynamic_shapes, chunks=self._chunks,
                                                  layout=self._layout)
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

    def _stage_outputs(self, inputs, chunk=None):
        if chunk is None:  # the loss stage: the module's last chunk
            chunk = self._chunks - 1
        forward = self._stage_forward if self._plain_path else functools.partial(DeepSpeedEngine.forward, self)
        # Virtual stages: one model chunk at a time.
        outputs = forward(inputs, chunk=chunk) if self._chunks > 1 else forward(inputs)
        if not self.module.training:
            # DeepSpeed's checkpointing with contiguous buffers fills one per checkpoint and empties them in the
            # backward; evaluation has none, so (as DeepSpeed's engine does) they are reset after each forward.
            ds_checkpointing.reset()
        return outputs

    def _forward(self, inputs, chunk=0):
        """Stages other than the last (or chunks other than the last): the outputs to send on."""
        outputs = self._stage_outputs(inputs, chunk)
        self._check_stage_output(outputs, chunk)
        return outputs

    def _forward_loss(self, inputs, labels):
        """The last stage: outputs, then the loss, recorded as DeepSpeed's
        engine records it; returns the loss for the executor to keep for the
        backward (None when there is no backward)."""
        outputs = self._stage_outputs(inputs)
        loss = self.module.loss_fn(outputs, labels) if self._compute_loss and self.module.loss_fn is not None \
            else outputs
        if self.eval_return_logits:
            self.outputs = outputs
        detached = loss.detach() if torch.is_tensor(loss) else [l.detach() for l in loss]
        self.fwd_outputs.append(detached)
        if torch.is_tensor(loss):
            self.total_loss = detached.clone() if self.total_loss is None else self.total_loss + detached
        additional = self.module.get_additional_losses()
        if additional is not None:  # summed over micro-batches as DeepSpeed does
            if self.total_additional_losses is None:
                self.total_additional_losses = OrderedDict()
            for name, value in additional.items():
                value = value.detach()
                total = self.total_additional_losses.get(name)
                self.total_additional_losses[name] = value.clone() if total is None else total + value
        self.loss = loss  # DeepSpeed's engine keeps the last micro-batch's loss here
        return loss if self.module.training else None

    def _check_stage_output(self, outputs, chunk=0):
        """Refuse what the next stage cannot take, and outputs that would
        silently stop this stage and every earlier one from learning."""
        tensors = [outputs] if torch.is_tensor(outputs) else outputs
        if not isinstance(tensors, (tuple, list)) or not all(torch.is_tensor(t) for t in tensors) or not tensors:
            found = type(outputs).__name__ if not isinstance(outputs, (tuple, list)) else \
                "a tuple with " + ", ".join(type(t).__name__ for t in outputs)
            raise PipelineError(f"stage {self.stage_id}: its last layer ({self._last_layer(chunk)}) returned {found}; a "
                                "stage other than the last must return a tensor or a tuple of tensors for the next stage")
        if self._needs_grad_outputs and not any(t.requires_grad for t in tensors if t.is_floating_point()):
            raise PipelineError(
                f"stage {self.stage_id}: no output of its last layer ({self._last_layer(chunk)}) requires grad, so no "
                f"gradient could flow back and stage {self.stage_id} and every earlier stage would silently stop "
                "learning; do not detach the outputs (or compute them under torch.no_grad) in a stage's layers")

    def _last_layer(self, chunk=0):
        """The last layer this stage (with virtual stages: this chunk) runs."""
        specs, _, stop = _deepspeed_compat.module_layers(self.module)
        index = (self.module.chunk_bounds(chunk)[1] if self._chunks > 1 else (stop or len(specs))) - 1
        layer = specs[index]
        name = getattr(getattr(layer, "typename", None), "__name__", None) or type(layer).__name__
        if name == "function":
            name = getattr(layer, "__name__", name)
        return f"layer {index}, {name}"

    def _backward_loss(self, loss):
        if self._plain_path:
            (loss / self.gradient_accumulation_steps()).backward()
            return
        self._loss_backward_running = True
        try:
            DeepSpeedEngine.backward(self, loss)
        finally:
            self._loss_backward_running = False

    def _loss_to_differentiate(self, loss):
        """Split backward (zero-bubble schedules) on the loss stage: the executor
        differentiates this, as the plain path's _backward_loss would."""
        if not torch.is_tensor(loss):
            raise TypeError(f"stage {self.stage_id}: schedule {self.schedule_kind!r} needs the loss to be one tensor, "
                            f"got {type(loss).__name__}; give the PipelineModule a loss_fn")
        return loss / self.gradient_accumulation_steps()

    def _executor_callbacks(self):
        """What the C++ executor calls back, by name (see _C.run_stage)."""
        before, after = self._stage_backward_callbacks()
        return types.SimpleNamespace(load=self._load, forward=self._forward, forward_loss=self._forward_loss,
                                     backward_loss=self._backward_loss,
                                     loss_to_differentiate=self._loss_to_differentiate,
                                     reduce_tied_grads=self._reduce_tied_grads, reduce_grads=self._reduce_grads,
                                     optimizer_step=self._optimizer_step, before_backward=before,
                                     after_backward=after)

    def _stage_backward_callbacks(self):
        """Around the executor's backward on stages without the loss: the bf16
        optimizer's gradient bookkeeping, which DeepSpeedEngine.backward does
        for the loss stage."""
        if not self.using_bf16_optimizer or self._is_loss_stage():
            return None, None
        after = None
        if not _deepspeed_compat.engine_config(self).bfloat16_config.immediate_grad_update:
            after = lambda: self.optimizer.update_hp_grads(clear_lp_grads=False)
        return self.optimizer.clear_lp_grads, after

    def _reduce_tied_grads(self):
        self._agree_before_step()
        for weight, group in self.module.get_tied_weights_and_groups():
            grad = _deepspeed_compat.high_precision_grad(weight) if self.using_bf16_optimizer else weight.grad
            if grad is not None:
                self._bounded(dist.all_reduce(grad, group=group, async_op=True), "the tied-weight all-reduce", group)

    def _reduce_grads(self):
        self._agree_before_step()
        if self._plain_path and self.dp_world_size == 1 and not self.has_moe_layers:
            # An all-reduce over one rank (and a division by 1) changes no value, so it is skipped; but
            # DeepSpeed's gives each trainable weight without a gradient a zero one, which the optimizer then
            # steps (weight decay moves the weight, Adam counts the step): keep that side effect.
            if self.pipeline_enable_backward_allreduce:
                self._zero_missing_grads()
            return
        self._force_grad_boundary = True
        try:
            with self._deepspeed_collectives("the data-parallel gradient all-reduce",
                                             self.grid.get_data_parallel_group()):
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
        self._agree_before_step()
        self._force_grad_boundary = True
        try:
            with self._deepspeed_collectives("a collective of the optimizer step (gradient clipping's norm, ZeRO's "
                                             "gathers)", self.grid.get_model_parallel_group(),
                                             self.grid.get_data_parallel_group()):
                _deepspeed_compat.take_model_step(self)
        finally:
            self._force_grad_boundary = False



def initialize(args=None, model=None, optimizer=None, model_parameters=None, training_data=None, lr_scheduler=None,
               dist_init_required=None, collate_fn=None, config=None, config_params=None):
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


# ---------------------------------------------------------------------- deepspeed.initialize integration
_ADOPT_DEEPSPEED_MODULES = False


def engine_class_for(model, config_class=None):
    """The engine deepspeed.initialize builds for `model`: ours for our
    PipelineModule (or any PipelineModule once adopted), DeepSpeed's for
    anything else."""
    from .module import PipelineModule as OurPipelineModule
    if isinstance(model, OurPipelineModule) or (_ADOPT_DEEPSPEED_MODULES and isinstance(model, DSPipelineModule)):
        return PipelineEngine
    return DSPipelineEngine


class _BuildsTheEngineForTheModel(type):
    """The metaclass of PipelineEngineRouter: calling the router builds the
    engine engine_class_for picks; type checks against it answer as they would
    against DeepSpeed's PipelineEngine (which ours subclasses). Subclasses of
    the router are ordinary classes."""

    def __call__(cls, *args, **kwargs):
        if cls is PipelineEngineRouter:
            return engine_class_for(kwargs.get("model"), kwargs.get("config_class"))(*args, **kwargs)
        return super().__call__(*args, **kwargs)

    def __instancecheck__(cls, instance):
        if cls is PipelineEngineRouter:
            return isinstance(instance, DSPipelineEngine)
        return super().__instancecheck__(instance)

    def __subclasscheck__(cls, subclass):
        if cls is PipelineEngineRouter:
            return issubclass(subclass, DSPipelineEngine)
        return super().__subclasscheck__(subclass)


class PipelineEngineRouter(DSPipelineEngine, metaclass=_BuildsTheEngineForTheModel):
    """What stands at `deepspeed.PipelineEngine` once deepspeed_pipe_ext is
    imported. deepspeed.initialize calls that name to build a pipeline
    engine: the router builds ours or DeepSpeed's (engine_class_for). It stays
    a class, so `isinstance(engine, deepspeed.PipelineEngine)` holds for both
    engines, as Megatron-DeepSpeed's training loop and DeepSpeed's own code
    expect; DeepSpeed's class stays at deepspeed.runtime.pipe.engine."""


def install():
    """Route deepspeed.initialize's pipeline engine through engine_class_for.

    deepspeed.initialize looks up `PipelineEngine` in the deepspeed module when
    it runs, so replacing that name with the router is enough."""
    import deepspeed
    deepspeed.PipelineEngine = PipelineEngineRouter


def run_deepspeed_pipelines_on_this_engine(enabled=True):
    """Also build our engine for DeepSpeed's own deepspeed.pipe.PipelineModule models."""
    global _ADOPT_DEEPSPEED_MODULES
    install()
    _ADOPT_DEEPSPEED_MODULES = bool(enabled)
