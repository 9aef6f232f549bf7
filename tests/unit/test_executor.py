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


def assert_detached_copies(returned, made):
    assert len(returned) == len(made)
    for back, loss in zip(returned, made):
        assert not back.requires_grad and back.grad_fn is None and torch.equal(back, loss.detach())


@pytest.mark.parametrize("kind", ["1f1b", "gpipe", "zb-h1"])
def test_labels_and_losses_travel_through_the_executor(kind):
    micro_batches = 5
    callbacks = Recorder(micro_batches, split_backward=kind == "zb-h1")
    program = _C.StageProgram(kind, micro_batches, 1, 0, False)
    result = _C.run_stage(program, None, callbacks)
    assert [id(x) for x in callbacks.labels_seen] == [id(x) for x in callbacks.labels_sent]
    # run_stage returns every loss forward_loss made, detached, in the order it made them.
    assert_detached_copies(result["losses"], callbacks.losses_made)
    assert sorted(id(x) for x in callbacks.losses_back) == sorted(id(x) for x in callbacks.losses_made)
    assert len(callbacks.losses_back) == micro_batches
    # d(sum over micro-batches of 2 * n * weight)/d weight = 2 * (0 + 1 + 2 + 3 + 4)
    assert callbacks.weight.grad.item() == pytest.approx(20.0)
    assert callbacks.calls == ["reduce_tied_grads", "reduce_grads", "optimizer_step"]


def test_eval_differentiates_nothing_and_returns_the_losses():
    """Eval: the losses come back to the caller, none is differentiated or
    kept in a buffer for a backward."""
    callbacks = Recorder(3)
    program = _C.StageProgram("inference", 3, 1, 0, False)
    assert program.traffic == _C.Traffic.Eval and program.holds_loss
    result = _C.run_stage(program, None, callbacks)
    assert len(callbacks.labels_seen) == 3 and callbacks.losses_back == [] and callbacks.calls == []
    assert_detached_copies(result["losses"], callbacks.losses_made)
    usage = result["buffer_usage"]
    assert usage["peak_live_buffers"] <= usage["buffers"]


def test_a_callbacks_object_missing_a_method_is_a_clear_error():
    callbacks = types.SimpleNamespace(load=lambda: (None, None), forward_loss=lambda inputs, labels: None,
                                      reduce_tied_grads=lambda: None, reduce_grads=lambda: None,
                                      optimizer_step=lambda: None)  # no backward_loss
    with pytest.raises(TypeError, match="no callable 'backward_loss'"):
        _C.run_stage(_C.StageProgram("1f1b", 2, 1, 0, False), None, callbacks)


def test_load_must_return_inputs_and_labels():
    callbacks = Recorder(2)
    callbacks.load = lambda: torch.zeros(2)  # the old convention: inputs only
    with pytest.raises(TypeError, match=r"load\(\) must return \(inputs, labels\)"):
        _C.run_stage(_C.StageProgram("1f1b", 2, 1, 0, False), None, callbacks)


def test_a_raising_callback_says_where_the_schedule_stood():
    callbacks = Recorder(3)

    def failing_forward_loss(inputs, labels):
        if labels["micro_batch"] == 1:
            raise KeyError("no such label")
        return Recorder.forward_loss(callbacks, inputs, labels)

    callbacks.forward_loss = failing_forward_loss
    with pytest.raises(KeyError) as raised:
        _C.run_stage(_C.StageProgram("1f1b", 3, 1, 0, False), None, callbacks)
    assert raised.value.pipeline_position == "stage 0 at step 2, ForwardPass (micro-batch 1)"


def test_schedule_facts_come_from_cpp():
    """Every kind and op says what it is; Python derives its sets from them."""
    from deepspeed_pipe_ext import _engine_checks, schedule
    zbv = _C.ScheduleKind.parse("zb-v")
    assert (zbv, zbv.config_name, zbv.layout, zbv.min_chunks, zbv.max_chunks, zbv.splits_backward, zbv.trains) == \
        (_C.ScheduleKind.ZeroBubbleV, "zb-v", _C.ChunkLayout.V, 2, 2, True, True)
    assert not _C.ScheduleKind.Inference.trains
    assert _engine_checks.RUNNABLE_SCHEDULES == {"1f1b", "gpipe", "zb-h1"}
    assert _engine_checks.VIRTUAL_STAGE_SCHEDULES == {"interleaved-1f1b": "interleaved", "zb-v": "v", "v-half": "v",
                                                      "v-min": "v"}
    assert _engine_checks.SPLIT_BACKWARD_SCHEDULES == {"zb-h1", "zb-v", "v-half", "v-min"}
    assert [op.letter for op in schedule.OPS if op.is_compute] == ["F", "B", "I", "W"]
    assert [op.name for op in schedule.OPS if op.is_transfer] == ["SendActivation", "RecvActivation", "SendGrad",
                                                                  "RecvGrad"]
    assert _C.parse_action_token("12I3", 1) == (12, "I", 3)
    with pytest.raises(ValueError, match="rank 1: action '0X3' has the pass 'X'"):
        _C.parse_action_token("0X3", 1)
    with pytest.raises(ValueError, match="unknown schedule kind 'zb'"):
        _C.StageProgram("zb", 2, 1, 0)
    # Both names of a kind or layout are accepted where C++ takes one.
    assert _C.StageProgram(_C.ScheduleKind.ZeroBubbleV, 4, 2, 0, False, 2, _C.ChunkLayout.V).layout == \
        _C.ChunkLayout.V


def test_a_failed_run_frees_what_it_held_before_the_error_reaches_python():
    """A batch that fails frees the executor's buffers where a batch that
    succeeds frees them (in the run, with the GIL released), so the losses it
    held for their backward are gone when Python sees the error."""
    import weakref
    callbacks = Recorder(3)
    held = []

    def forward_loss(inputs, labels):
        if labels["micro_batch"] == 2:
            raise KeyError("no such label")
        loss = (inputs * callbacks.weight).sum()
        held.append(weakref.ref(loss))
        return loss

    callbacks.forward_loss = forward_loss
    with pytest.raises(KeyError) as raised:
        _C.run_stage(_C.StageProgram("gpipe", 3, 1, 0, False), None, callbacks)
    assert raised.value.pipeline_position.endswith("ForwardPass (micro-batch 2)")
    assert len(held) == 2 and all(ref() is None for ref in held)  # gpipe holds both losses for the backward
