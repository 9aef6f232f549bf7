"""Activation checkpointing through the C++ implementation (csrc/runtime/recompute.cpp).

`checkpoint(function, *args)` runs `function(*args)` without keeping the
activations inside it and recomputes it during backward, with the CPU (and
accelerator) RNG state of the first forward restored, so dropout draws the
same masks. The two functions mirror DeepSpeed's
`deepspeed.checkpointing.checkpoint` (reentrant) and `non_reentrant_checkpoint`.
"""
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ._native import _C

__all__ = ["checkpoint", "non_reentrant_checkpoint"]


def _run(function, args, params, reentrant):
    tensor_positions = [i for i, a in enumerate(args) if torch.is_tensor(a)]
    returned_tensor = []

    def group_forward(*tensors):
        full = list(args)
        for i, t in zip(tensor_positions, tensors):
            full[i] = t
        out = function(*full)
        if torch.is_tensor(out):
            returned_tensor.append(True)
            return (out, )
        return out

    outputs = _C.recompute(group_forward, [args[i] for i in tensor_positions], list(params), reentrant)
    # The first forward ran before _C.recompute returned, so returned_tensor is set.
    return outputs[0] if returned_tensor else tuple(outputs)


def checkpoint(function: Callable[..., Any], *args: Any) -> Any:
    """Reentrant checkpoint (DeepSpeed's default): gradients reach the
    function's parameters through a nested backward, and reach the rest of the
    graph only through inputs that require grad."""
    return _run(function, args, (), reentrant=True)


def non_reentrant_checkpoint(function: Callable[..., Any], *args: Any, params: Iterable[torch.Tensor] = ()) -> Any:
    """Non-reentrant checkpoint: `params` (those of them that require grad)
    are inputs of the checkpoint node, so their gradients flow through the
    outer graph and no input needs to require grad. Gradients of parameters
    used by `function` but missing from `params` are lost, so pass them all."""
    return _run(function, args, params, reentrant=False)
