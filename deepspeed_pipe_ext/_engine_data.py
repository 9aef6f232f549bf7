"""How the pipeline engine takes its data, as DeepSpeed's does: each batch a
pair (inputs, labels) from the data iterator (or made by batch_fn); the first
stage uses the inputs, the stage with the loss (the last; the first in the V
layout) the labels."""
import torch


class MicroBatchLoader:
    """A part of PipelineEngine: its data iterator and batch_fn, and what
    one micro-batch becomes on this stage (`placement`, on `device`)."""

    def __init__(self, placement, device, stage_name):
        self.placement = placement
        self.device = device
        self.stage_name = stage_name  # "stage 1", in errors
        self.data_iterator = None
        self.batch_fn = None
        # The module recomputes activations with the reentrant function: the first stage's float inputs must
        # require grad (set by the engine).
        self.inputs_require_grad = False

    @property
    def loads_data(self):
        """The first stage reads the inputs, the stage with the loss the labels."""
        return self.placement.is_first or self.placement.holds_loss

    def require_data(self):
        # Checked before the schedule starts, so the stages that load data fail
        # at once instead of leaving their peers waiting for the p2p timeout.
        # A batch_fn may make the batch itself (3D parallelism: one rank of a
        # tensor-parallel group reads, batch_fn broadcasts), as in DeepSpeed.
        if self.loads_data and self.data_iterator is None and not self.batch_fn:
            raise RuntimeError(f"{self.stage_name} needs data: pass data_iter to train_batch()/eval_batch(), "
                               "call set_dataiterator(), give training_data to deepspeed.initialize, or set a "
                               "batch_fn that makes the batch")

    def load(self):
        """The next micro-batch as (inputs, labels) for the executor to hold:
        the inputs on the first stage, the labels on the loss stage (None elsewhere)."""
        batch = next(self.data_iterator) if self.data_iterator is not None else None
        if self.batch_fn:
            batch = self.batch_fn(batch)
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            found = f"a {type(batch).__name__} of length {len(batch)}" if isinstance(batch, (tuple, list)) else \
                type(batch).__name__
            raise TypeError(f"{self.stage_name}: each batch must be a pair (inputs, labels), got {found}")
        labels = self._labels_to_device(batch[1]) if self.placement.holds_loss else None
        inputs = None
        if self.placement.is_first:
            inputs = self._inputs_to_device(batch[0])
            if self.inputs_require_grad:
                for t in (inputs if isinstance(inputs, tuple) else (inputs, )):
                    t.requires_grad_(t.is_floating_point())
        return inputs, labels

    def _inputs_to_device(self, inputs):
        """The first stage's inputs, as DeepSpeed takes them: a tensor, or a
        tuple or list of tensors; copied to the device, detached."""
        if torch.is_tensor(inputs):
            return inputs.clone().detach().to(self.device)
        if isinstance(inputs, (tuple, list)) and inputs:
            for i, x in enumerate(inputs):
                if not torch.is_tensor(x):
                    raise TypeError(f"{self.stage_name}: element {i} of the batch's inputs is a "
                                    f"{type(x).__name__}; the inputs must be a tensor or a tuple of tensors (put "
                                    "other values in the labels, or make them tensors)")
            return tuple(x.clone().detach().to(self.device) for x in inputs)
        raise TypeError(f"{self.stage_name}: the batch's inputs must be a tensor or a tuple of tensors, "
                        f"got {type(inputs).__name__}")

    def _labels_to_device(self, labels):
        """Labels reach the loss as DeepSpeed passes them: a tensor moved to
        the device, a tuple or list of tensors as a tuple of them moved, and
        anything else (an int, a dict, None) untouched."""
        if torch.is_tensor(labels):
            return labels.to(self.device)
        if isinstance(labels, (tuple, list)):
            for i, x in enumerate(labels):
                if not torch.is_tensor(x):
                    raise TypeError(f"{self.stage_name}: element {i} of the batch's labels is a "
                                    f"{type(x).__name__}; a tuple or list of labels must hold tensors only (as in "
                                    "DeepSpeed); pass other values on their own or in a dict")
            return tuple(x.to(self.device).detach() for x in labels)
        return labels
