"""DeepSpeed's data conventions give DeepSpeed's results on our engine."""
import pytest
import torch

from . import convention_cases
from .distributed import run_ranks


def _assert_same(theirs, ours, what):
    t_losses, t_weights, t_extras, t_engine = theirs
    o_losses, o_weights, o_extras, o_engine = ours
    assert t_engine.startswith("deepspeed.") and o_engine.startswith("deepspeed_pipe_ext."), (t_engine, o_engine)
    assert torch.allclose(torch.tensor(o_losses), torch.tensor(t_losses), rtol=1e-6, atol=1e-7), (what, o_losses,
                                                                                                    t_losses)
    for k in t_weights:
        assert torch.allclose(o_weights[k], t_weights[k], rtol=1e-6, atol=1e-7), (what, k)
    assert (o_extras[-1] is None) == (t_extras[-1] is None), (what, o_extras[-1], t_extras[-1])
    for o, t in zip(o_extras, t_extras):
        if t is not None:
            assert o.keys() == t.keys(), what
            assert all(abs(o[k] - t[k]) <= 1e-6 * max(1.0, abs(t[k])) for k in t), (what, o, t)
    assert o_losses[-1] < o_losses[0], what  # it trained


@pytest.mark.parametrize("world_size,cases", [(2, ["int", "dict", "none", "list", "aux", "batch_fn"]),
                                              (4, ["aux", "dict"])])  # 2 stages, then 2 stages x 2 data-parallel
def test_labels_additional_losses_and_batch_fn_match_deepspeed(world_size, cases):
    for rank, by_case in enumerate(run_ranks(convention_cases.run, world_size, cases)):
        for case in cases:
            theirs, ours = by_case[case]
            _assert_same(theirs, ours, (case, rank))
