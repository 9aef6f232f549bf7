"""The C++ activation checkpoint (deepspeed_pipe_ext.activation_checkpointing)
against no checkpointing and against DeepSpeed's two checkpoint functions,
in one process. In the pipeline engine:
tests/distributed/test_activation_checkpointing.py."""
import pytest
import torch
import torch.nn as nn
from deepspeed.runtime.activation_checkpointing import checkpointing as ds_checkpointing
from hypothesis import given, settings
from hypothesis import strategies as st

from deepspeed_pipe_ext import activation_checkpointing as ac


def mlp(depth, width, p, seed):
    torch.manual_seed(seed)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Dropout(p), nn.Tanh()]
    return nn.Sequential(*layers)


def gradients(net, x, run, rng_seed):
    """Parameter and input gradients of sum(out^2), and the next random number
    (checkpointing must leave the caller's RNG stream where it would be)."""
    net.zero_grad()
    x = x.detach().requires_grad_(True)
    torch.manual_seed(rng_seed)
    run(net, x).pow(2).sum().backward()
    return [p.grad.clone() for p in net.parameters()] + [x.grad.clone(), torch.rand(1)]


RUNS = {
    "ours_reentrant": lambda net, x: ac.checkpoint(net, x),
    "ours_non_reentrant": lambda net, x: ac.non_reentrant_checkpoint(net, x, params=list(net.parameters())),
    "deepspeed_reentrant": lambda net, x: ds_checkpointing.checkpoint(net, x),
    "deepspeed_non_reentrant": lambda net, x: ds_checkpointing.non_reentrant_checkpoint(net, x),
}


@settings(max_examples=25, deadline=None)
@given(depth=st.integers(1, 4), width=st.integers(1, 12), p=st.sampled_from([0.0, 0.2, 0.5]),
       batch=st.integers(1, 5), seed=st.integers(0, 10**6))
def test_gradients_equal_without_checkpointing_and_deepspeeds(depth, width, p, batch, seed):
    net = mlp(depth, width, p, seed)
    x = torch.randn(batch, width)
    plain = gradients(net, x, lambda n, x: n(x), seed)
    for name, run in RUNS.items():
        got = gradients(net, x, run, seed)
        assert all(torch.equal(a, b) for a, b in zip(plain, got)), name


def test_tuple_activations_keep_dtypes_and_integer_outputs_need_no_grad():
    lin = nn.Linear(4, 4)

    def block(hidden, mask, positions):
        return torch.tanh(lin(hidden)) * mask.unsqueeze(-1), mask, positions + 1

    hidden = torch.randn(3, 4, requires_grad=True)
    mask, positions = torch.tensor([True, False, True]), torch.arange(3)
    for checkpoint in (ac.checkpoint, lambda f, *a: ac.non_reentrant_checkpoint(f, *a, params=[lin.weight, lin.bias])):
        out = checkpoint(block, hidden, mask, positions)
        assert isinstance(out, tuple) and [t.dtype for t in out] == [torch.float32, torch.bool, torch.int64]
        assert out[0].requires_grad and not out[1].requires_grad and not out[2].requires_grad
        assert torch.equal(out[2], positions + 1)
        lin.zero_grad()
        hidden.grad = None
        out[0].sum().backward()
        got = (hidden.grad.clone(), lin.weight.grad.clone())
        lin.zero_grad()
        hidden.grad = None
        block(hidden, mask, positions)[0].sum().backward()
        assert torch.equal(got[0], hidden.grad) and torch.equal(got[1], lin.weight.grad)


def test_non_tensor_arguments_pass_through():
    lin = nn.Linear(3, 3)
    x = torch.randn(2, 3, requires_grad=True)
    out = ac.checkpoint(lambda t, scale, name: lin(t) * scale, x, 2.0, "unused")
    out.sum().backward()
    assert torch.allclose(x.grad, 2.0 * lin.weight.sum(0).expand(2, 3))


def saved_bytes(run):
    """Bytes autograd keeps for backward while `run()` builds its graph."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return total[0], out


def test_checkpointing_keeps_only_the_group_inputs():
    net = mlp(6, 64, 0.1, 0)
    x = torch.randn(32, 64, requires_grad=True)
    plain, _ = saved_bytes(lambda: net(x))
    for name, run in (("reentrant", lambda: ac.checkpoint(net, x)),
                      ("non-reentrant", lambda: ac.non_reentrant_checkpoint(net, x, params=list(net.parameters())))):
        kept, out = saved_bytes(run)
        assert kept == x.numel() * x.element_size(), name
        assert plain > 10 * kept
        out.sum().backward()  # the graph still works after the hooks are gone


def test_non_reentrant_refuses_a_parameter_missing_from_params():
    net = mlp(2, 4, 0.0, 0)
    out = ac.non_reentrant_checkpoint(net, torch.randn(2, 4), params=list(net[0].parameters()))
    with pytest.raises(RuntimeError,
                       match=r"uses a tensor that requires grad \(shape \[4, 4\]\).*pass every parameter"):
        out.sum().backward()


def test_non_reentrant_trains_parameters_when_no_input_requires_grad():
    emb = nn.Embedding(10, 4)
    out = ac.non_reentrant_checkpoint(emb, torch.tensor([1, 2, 3]), params=list(emb.parameters()))
    out.sum().backward()
    assert emb.weight.grad is not None and emb.weight.grad[1:4].eq(1).all() and emb.weight.grad[0].eq(0).all()


def test_bad_group_outputs_are_reported():
    x = torch.randn(2, requires_grad=True)
    with pytest.raises(TypeError, match="checkpointed group's output must be a tensor or a tuple of tensors, got dict"):
        ac.checkpoint(lambda t: {"out": t}, x)
    out = ac.checkpoint(lambda t: t.detach() * 2, x)  # nothing differentiable inside
    with pytest.raises(RuntimeError, match="none of the checkpointed group's outputs requires grad"):
        out.sum().backward()
