"""The C++ executor holds each micro-batch's state: a single-stage program
(no transfers) run with a plain callbacks object, no engine. What load()
returns as labels reaches forward_loss() as the same object, and the loss
forward_loss() returns reaches backward_loss() (or loss_to_differentiate())
as the same object, whatever the schedule interleaves."""
import types

import pytest
import torch

from deepspeed_pipe_ext._native import _C


class Recorder:
    """Callbacks that hand out fresh objects and record what comes back."""

    def __init__(self, micro_batches, split_backward=False):
        self.weight = torch.nn.Parameter(torch.tensor(2.0))
        self.loaded = iter(range(micro_batches))
        self.labels_sent, self.labels_seen = [], []
        self.losses_made, self.losses_back = [], []
        self.calls = []
        if split_backward:
            self.loss_to_differentiate = self._loss_to_differentiate

    def load(self):
        n = next(self.loaded)
        labels = {"micro_batch": n, "not a tensor": [n]}  # any Python value, as DeepSpeed passes labels
        self.labels_sent.append(labels)
        return torch.full((2, ), float(n)), labels

    def forward_loss(self, inputs, labels):
        self.labels_seen.append(labels)
        loss = (inputs * self.weight).sum() + labels["micro_batch"]
        self.losses_made.append(loss)
        return loss

    def backward_loss(self, loss):
        self.losses_back.append(loss)
        loss.backward()

    def _loss_to_differentiate(self, loss):
        self.losses_back.append(loss)
        return loss * 1.0

    def reduce_tied_grads(self):
        self.calls.append("reduce_tied_grads")

    def reduce_grads(self):
        self.calls.append("reduce_grads")

    def optimizer_step(self):
        self.calls.append("optimizer_step")


@pytest.mark.parametrize("kind", ["1f1b", "gpipe", "zb-h1"])
def test_labels_and_losses_travel_through_the_executor(kind):
    micro_batches = 5
    callbacks = Recorder(micro_batches, split_backward=kind == "zb-h1")
    program = _C.StageProgram(kind, micro_batches, 1, 0, False)
    _C.run_stage(None, program, 1, 0, 0, callbacks)
    assert [id(x) for x in callbacks.labels_seen] == [id(x) for x in callbacks.labels_sent]
    assert sorted(id(x) for x in callbacks.losses_back) == sorted(id(x) for x in callbacks.losses_made)
    assert len(callbacks.losses_back) == micro_batches
    # d(sum over micro-batches of 2 * n * weight)/d weight = 2 * (0 + 1 + 2 + 3 + 4)
    assert callbacks.weight.grad.item() == pytest.approx(20.0)
    assert callbacks.calls == ["reduce_tied_grads", "reduce_grads", "optimizer_step"]


def test_eval_keeps_no_loss():
    """A forward_loss that returns None (eval): nothing is kept, nothing is differentiated."""
    callbacks = Recorder(3)
    forward_loss = callbacks.forward_loss
    callbacks.forward_loss = lambda inputs, labels: forward_loss(inputs, labels) and None
    program = _C.StageProgram("inference", 3, 1, 0, False)
    _, usage = _C.run_stage(None, program, 1, 0, 0, callbacks)
    assert len(callbacks.labels_seen) == 3 and callbacks.losses_back == [] and callbacks.calls == []
    assert usage["peak_live_buffers"] <= usage["buffers"]


def test_a_callbacks_object_missing_a_method_is_a_clear_error():
    callbacks = types.SimpleNamespace(load=lambda: (None, None), forward_loss=lambda i, l: None,
                                      reduce_tied_grads=lambda: None, reduce_grads=lambda: None,
                                      optimizer_step=lambda: None)  # no backward_loss
    with pytest.raises(TypeError, match="no callable 'backward_loss'"):
        _C.run_stage(None, _C.StageProgram("1f1b", 2, 1, 0, False), 1, 0, 0, callbacks)


def test_load_must_return_inputs_and_labels():
    callbacks = Recorder(2)
    callbacks.load = lambda: torch.zeros(2)  # the old convention: inputs only
    with pytest.raises(TypeError, match=r"load\(\) must return \(inputs, labels\)"):
        _C.run_stage(None, _C.StageProgram("1f1b", 2, 1, 0, False), 1, 0, 0, callbacks)
