"""The C++ activation checkpoint in the pipeline engine, on real processes:
DeepSpeed's numbers, and the same numbers as without checkpointing (the
checkpoint functions alone: tests/unit/test_activation_checkpointing.py).
The cases of one world size share a process group (distributed.py
`shared_ranks`)."""
import pytest

from . import engine_cases
from .distributed import on_ranks, shared_ranks
from .test_engine import check_parity


@pytest.mark.parametrize("model,world_size,num_stages,interval,reentrant,schedule", [
    ("dropout_mlp", 2, 2, 2, True, "1f1b"),
    ("dropout_mlp", 2, 2, 1, False, "1f1b"),
    ("dropout_transformer", 2, 2, 1, True, "1f1b"),
    ("dropout_transformer", 4, 4, 1, False, "1f1b"),
    # Split backward: a reentrant group's weights get their gradients in B,
    # a non-reentrant group is recomputed in W too.
    ("dropout_mlp", 2, 2, 1, True, "zb-h1"),
    ("dropout_transformer", 2, 2, 1, False, "zb-h1"),
])
@shared_ranks(lambda model, world_size, num_stages, interval, reentrant, schedule: on_ranks(
    engine_cases.train_checkpointed, world_size, model, num_stages, interval, reentrant, schedule, timeout=400))
def test_engine_checkpointing_matches_deepspeed_and_no_checkpointing(model, world_size, num_stages, interval,
                                                                    reentrant, schedule, shared_results):
    results = shared_results
    check_parity([(theirs, ours) for theirs, ours, _ in results])
    # Checkpointing changes memory, not arithmetic: the same run without it gives the same numbers.
    check_parity([(plain, ours) for _, ours, plain in results])


@shared_ranks(lambda: on_ranks(engine_cases.eval_with_contiguous_checkpointing, 2, timeout=300))
def test_eval_resets_deepspeeds_contiguous_checkpoint_buffers_after_each_forward(shared_results):
    # DeepSpeed's TestPipeModuleSequential configures partitioned, contiguous checkpoint buffers and evaluates:
    # with more eval forwards than buffers, an engine that does not reset them overruns (IndexError).
    results = shared_results
    for (theirs_engine, theirs), (ours_engine, ours) in results:
        assert theirs_engine.startswith("deepspeed.") and ours_engine.startswith("deepspeed_pipe_ext."), \
            (theirs_engine, ours_engine)
        assert ours == pytest.approx(theirs, rel=1e-6) and len(ours) == 2
