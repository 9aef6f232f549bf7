"""One batch on one stage: the callback contract between the C++ executor and
Python, and the batch's own state.

The executor (csrc/runtime/executor.h, StageCallbacks) holds every
micro-batch's inputs, labels, outputs and loss, and calls back into Python
only through an object of the StageCallbacks contract below; run_stage checks
once, before the run, that the methods this stage needs are there. The engine
builds one StageRun per train_batch / eval_batch, so what lives for one batch
(whether the plain path runs, whether outputs must carry gradients, the
module's additional losses summed over micro-batches, the outputs eval_batch
returns) lives here and dies with it; run_stage returns the per-micro-batch
losses.
"""
import abc
import functools
from collections import OrderedDict

import torch
from deepspeed.runtime.activation_checkpointing import checkpointing as ds_checkpointing
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.pipe.module import PipelineError

from . import _deepspeed_compat
from ._native import _C


class StageCallbacks(abc.ABC):
    """What the executor calls back (executor.h's StageCallbacks). The
    optional ones are None where a stage does not need them."""

    @abc.abstractmethod
    def load(self):
        """The next micro-batch as (inputs, labels): the inputs on the first
        stage, the labels on the loss stage, None elsewhere."""

    @abc.abstractmethod
    def forward(self, inputs, chunk):
        """A model chunk that passes its outputs on: those outputs."""

    @abc.abstractmethod
    def forward_loss(self, inputs, labels):
        """The loss stage's last chunk: the loss (kept by the executor for the
        backward while training, and returned by run_stage)."""

    @abc.abstractmethod
    def backward_loss(self, loss):
        """The backward of one micro-batch's loss."""

    @abc.abstractmethod
    def reduce_tied_grads(self):
        pass

    @abc.abstractmethod
    def reduce_grads(self):
        pass

    @abc.abstractmethod
    def optimizer_step(self):
        pass

    # loss -> the scalar the executor differentiates itself (split backward passes).
    loss_to_differentiate = None
    # Around the executor's own backward of a micro-batch on the other stages.
    before_backward = None
    after_backward = None


class StageRun(StageCallbacks):
    """One train_batch or eval_batch of `engine` (a PipelineEngine) on this
    stage: the callbacks and the batch's state."""

    def __init__(self, engine, program, compute_loss=True, return_logits=False):
        self.engine = engine
        self.program = program
        self.place = engine.placement
        self.training = engine.module.training
        self.compute_loss = compute_loss
        self.return_logits = return_logits
        self.plain_path = engine._plain_engine_path()
        # A stage that trains something (or passes gradients on) must send outputs that carry gradients.
        # (With several chunks per rank every rank has a chunk that passes its outputs on.)
        self.needs_grad_outputs = (self.training and torch.is_grad_enabled()
                                   and (self.place.chunks > 1 or not self.place.holds_loss)
                                   and (self.place.stage > 0
                                        or any(p.requires_grad for p in engine.module.parameters())))
        # A bound method either way: an nn.Module held here would become a child module of something.
        self.stage_forward = engine.module.forward if engine._only_engine_hooks(self.plain_path) \
            else engine.module.__call__
        self.loss_backward_running = False  # DeepSpeed's gradient hook scales only the loss's own backward
        self.additional_losses = None  # the module's get_additional_losses(), summed over micro-batches
        self.logits = None  # the last micro-batch's outputs, for eval_batch(return_logits=True)
        self.losses = []  # per micro-batch, detached, in the order the loss stage ran them: from run_stage
        if engine._splits_backward():
            self.loss_to_differentiate = self._loss_to_differentiate
        self.before_backward, self.after_backward = engine._stage_backward_callbacks(self.place)

    def run(self, p2p, options):
        """Runs the program; returns run_stage's result (timeline, buffer usage, losses)."""
        result = _C.run_stage(self.program, p2p, self, options)
        self.losses = result["losses"]
        return result

    # ---------------------------------------------------------------- the contract
    def load(self):
        return self.engine._loader.load()

    def forward(self, inputs, chunk):
        outputs = self._stage_outputs(inputs, chunk)
        self._check_stage_output(outputs, chunk)
        return outputs

    def forward_loss(self, inputs, labels):
        """The outputs, then the loss, as DeepSpeed's engine computes it."""
        module = self.engine.module
        outputs = self._stage_outputs(inputs, self.place.loss_chunk)
        loss = module.loss_fn(outputs, labels) if self.compute_loss and module.loss_fn is not None else outputs
        if self.return_logits:
            self.logits = outputs
        additional = module.get_additional_losses()
        if additional is not None:  # summed over micro-batches as DeepSpeed does
            if self.additional_losses is None:
                self.additional_losses = OrderedDict()
            for name, value in additional.items():
                value = value.detach()
                total = self.additional_losses.get(name)
                self.additional_losses[name] = value.clone() if total is None else total + value
        return loss

    def backward_loss(self, loss):
        engine = self.engine
        if self.plain_path:
            (loss / engine.gradient_accumulation_steps()).backward()
            return
        self.loss_backward_running = True
        try:
            DeepSpeedEngine.backward(engine, loss)
        finally:
            self.loss_backward_running = False

    def _loss_to_differentiate(self, loss):
        """Split backward (zero-bubble schedules) on the loss stage: the executor
        differentiates this, as the plain path's backward_loss would."""
        if not torch.is_tensor(loss):
            raise TypeError(f"stage {self.place.stage}: schedule {self.engine.schedule_kind!r} needs the loss to be "
                            f"one tensor, got {type(loss).__name__}; give the PipelineModule a loss_fn")
        return loss / self.engine.gradient_accumulation_steps()

    def reduce_tied_grads(self):
        self.engine._reduce_tied_grads()

    def reduce_grads(self):
        self.engine._reduce_grads(self.plain_path)

    def optimizer_step(self):
        self.engine._optimizer_step()

    # ---------------------------------------------------------------- the batch's results
    def total_loss(self):
        """The losses summed over micro-batches in the order they ran (None
        when the loss is not one tensor)."""
        total = None
        for loss in self.losses:
            if torch.is_tensor(loss):
                total = loss.clone() if total is None else total + loss
        return total

    # ---------------------------------------------------------------- helpers
    def _stage_outputs(self, inputs, chunk):
        engine = self.engine
        forward = self.stage_forward if self.plain_path else functools.partial(DeepSpeedEngine.forward, engine)
        # Virtual stages: one model chunk at a time.
        outputs = forward(inputs, chunk=chunk) if self.place.chunks > 1 else forward(inputs)
        if not self.training:
            # DeepSpeed's checkpointing with contiguous buffers fills one per checkpoint and empties them in the
            # backward; evaluation has none, so (as DeepSpeed's engine does) they are reset after each forward.
            ds_checkpointing.reset()
        return outputs

    def _check_stage_output(self, outputs, chunk):
        """Refuse what the next stage cannot take, and outputs that would
        silently stop this stage and every earlier one from learning."""
        stage = self.place.stage
        tensors = [outputs] if torch.is_tensor(outputs) else outputs
        if not isinstance(tensors, (tuple, list)) or not all(torch.is_tensor(t) for t in tensors) or not tensors:
            found = type(outputs).__name__ if not isinstance(outputs, (tuple, list)) else \
                "a tuple with " + ", ".join(type(t).__name__ for t in outputs)
            raise PipelineError(f"stage {stage}: its last layer ({self._last_layer(chunk)}) returned {found}; a "
                                "stage other than the last must return a tensor or a tuple of tensors for the next "
                                "stage")
        if self.needs_grad_outputs and not any(t.requires_grad for t in tensors if t.is_floating_point()):
            raise PipelineError(
                f"stage {stage}: no output of its last layer ({self._last_layer(chunk)}) requires grad, so no "
                f"gradient could flow back and stage {stage} and every earlier stage would silently stop "
                "learning; do not detach the outputs (or compute them under torch.no_grad) in a stage's layers")

    def _last_layer(self, chunk):
        """The last layer this stage (with virtual stages: this chunk) runs."""
        module = self.engine.module
        specs, _, stop = _deepspeed_compat.module_layers(module)
        index = (module.chunk_bounds(chunk)[1] if self.place.chunks > 1 else (stop or len(specs))) - 1
        layer = specs[index]
        name = getattr(getattr(layer, "typename", None), "__name__", None) or type(layer).__name__
        if name == "function":
            name = getattr(layer, "__name__", name)
        return f"layer {index}, {name}"
