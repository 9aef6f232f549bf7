"""The split backward of zero-bubble schedules (csrc/runtime/split_backward):
B (input gradients) then W (weight gradients) give a full backward's
gradients, B leaves the weights alone, and W does not run the activation
path again."""
import weakref

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from deepspeed_pipe_ext import activation_checkpointing
from deepspeed_pipe_ext._native import _C


def run_backward(model, x, split, input_requires_grad=True, after_b=None):
    """Gradients of the input and of every parameter, from one backward."""
    x = x.clone().requires_grad_(input_requires_grad)
    out = model(x)
    outs = list(out) if isinstance(out, tuple) else [out]
    seeds = [torch.full_like(o, 0.5) + 0.1 * torch.arange(o.numel()).reshape(o.shape) for o in outs]
    if split:
        deferred = _C.backward_input(outs, seeds, [x] if input_requires_grad else [])
        if after_b:
            after_b(model)
        del out, outs
        deferred.run()
    else:
        torch.autograd.backward(outs, seeds)
    return x.grad, [p.grad for p in model.parameters()]


def assert_same_gradients(make, x, exact=True, **kw):
    torch.manual_seed(1)
    full = run_backward(make(), x, split=False, **kw)
    torch.manual_seed(1)
    split = run_backward(make(), x, split=True, **kw)
    compare = torch.equal if exact else (lambda a, b: torch.allclose(a, b, rtol=1e-6, atol=1e-7))
    assert (full[0] is None) == (split[0] is None)
    if full[0] is not None:
        assert compare(full[0], split[0])
    for a, b in zip(full[1], split[1]):
        assert (a is None) == (b is None)
        if a is not None:
            assert compare(a, b), (a - b).abs().max()


class Branches(nn.Module):
    """Two outputs, the second computed from the first."""

    def __init__(self, width):
        super().__init__()
        self.first, self.second = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        h = torch.tanh(self.first(x))
        return h, self.second(h) * 2


class TiedInside(nn.Module):
    """One weight used at two depths of the stage (W must not count the lower use twice)."""

    def __init__(self, width):
        super().__init__()
        self.shared, self.middle = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        return self.shared(torch.relu(self.middle(self.shared(x))))


class Unused(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.used, self.unused = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        return self.used(x)


class ReturnsWeight(nn.Module):
    """An output that is a weight itself, and the same weight used inside."""

    def __init__(self, width, use_inside):
        super().__init__()
        self.layer, self.scale = nn.Linear(width, width), nn.Parameter(torch.rand(width))
        self.use_inside = use_inside

    def forward(self, x):
        h = self.layer(x)
        return (h * self.scale if self.use_inside else h), self.scale


class Checkpointed(nn.Module):
    def __init__(self, width, reentrant):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
        self.outer = nn.Linear(width, width)
        self.reentrant = reentrant

    def forward(self, x):
        if self.reentrant:
            h = activation_checkpointing.checkpoint(self.inner, x)
        else:
            h = activation_checkpointing.non_reentrant_checkpoint(self.inner, x, params=list(self.inner.parameters()))
        return self.outer(h)


@settings(max_examples=40, deadline=None)
@given(depth=st.integers(1, 5), width=st.integers(1, 9), batch=st.integers(1, 4), bias=st.booleans(),
       activation=st.sampled_from([nn.ReLU, nn.Tanh, nn.GELU]), input_requires_grad=st.booleans(),
       seed=st.integers(0, 2**16))
def test_split_mlp_gradients_equal_a_full_backward(depth, width, batch, bias, activation, input_requires_grad, seed):
    def make():
        layers = []
        for _ in range(depth):
            layers += [nn.Linear(width, width, bias=bias), activation()]
        return nn.Sequential(*layers)
    x = torch.randn(batch, width, generator=torch.Generator().manual_seed(seed))
    assert_same_gradients(make, x, input_requires_grad=input_requires_grad)


@pytest.mark.parametrize("make,exact", [(lambda: Branches(6), True), (lambda: TiedInside(6), False),
                                        (lambda: Unused(6), True), (lambda: ReturnsWeight(6, False), True),
                                        (lambda: ReturnsWeight(6, True), False),
                                        (lambda: Checkpointed(6, True), True), (lambda: Checkpointed(6, False), True)],
                         ids=["two-outputs", "tied-inside", "unused-layer", "weight-as-output",
                              "weight-as-output-and-inside", "reentrant-checkpoint", "non-reentrant-checkpoint"])
@pytest.mark.parametrize("input_requires_grad", [True, False])
def test_split_gradients_of_other_graphs_equal_a_full_backward(make, exact, input_requires_grad):
    assert_same_gradients(make, torch.randn(3, 6), exact=exact, input_requires_grad=input_requires_grad)


def test_b_computes_no_weight_gradient_and_w_no_activation_gradient():
    model = nn.Sequential(nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 5))
    x = torch.randn(2, 5, requires_grad=True)
    out = model(x)
    # Count the runs of a node on the activation path (ReLU's backward) and of a weight's (its addmm).
    runs = {"relu": 0, "addmm": 0}
    out.grad_fn.register_prehook(lambda grads: runs.__setitem__("addmm", runs["addmm"] + 1))
    relu = next(fn for fn, _ in out.grad_fn.next_functions if fn is not None and "Relu" in fn.name())
    relu.register_prehook(lambda grads: runs.__setitem__("relu", runs["relu"] + 1))

    deferred = _C.backward_input([out], [torch.ones_like(out)], [x])
    assert x.grad is not None and not deferred.empty
    assert all(p.grad is None for p in model.parameters()), "B must not compute weight gradients"
    assert runs == {"relu": 1, "addmm": 1}
    deferred.run()
    assert all(p.grad is not None for p in model.parameters())
    # W restarted at the addmm (towards its weight) and ran nothing on the activation path.
    assert runs == {"relu": 1, "addmm": 2}
    assert deferred.empty


def test_the_graph_is_released_after_w():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    x = torch.randn(3, 4, requires_grad=True)
    hidden = model[1](model[0](x))
    kept = weakref.ref(hidden)  # saved by tanh's and the second layer's backward
    out = model[2](hidden)
    del hidden
    deferred = _C.backward_input([out], [torch.ones_like(out)], [x])
    del out
    assert kept() is not None, "W still needs the graph after B"
    deferred.run()
    del deferred
    assert kept() is None, "the micro-batch's activations outlive its W"


def test_outputs_without_grad_give_nothing_to_do():
    deferred = _C.backward_input([torch.ones(2)], [torch.ones(2)], [])
    assert deferred.empty
    with pytest.raises(RuntimeError, match="2 outputs but 1 gradients"):
        _C.backward_input([torch.ones(2), torch.ones(2)], [torch.ones(2)], [])
