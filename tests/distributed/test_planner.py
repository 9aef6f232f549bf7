"""The planner on real processes: a planned module ("partition_method":
"auto", "schedule": "auto") trains with DeepSpeed's numbers, under no cap and
under a cap that forces the leanest plan; what "auto" refuses, with the fix."""
import pytest
import torch

from . import planner_cases
from .distributed import on_ranks, shared_ranks


@pytest.mark.parametrize("tight", [False, True])
@shared_ranks(lambda tight: on_ranks(planner_cases.planned_training_matches_deepspeed, 2, tight, timeout=300))
def test_the_planned_module_trains_like_deepspeed(tight, shared_results):
    picks = set()
    for rank, out in enumerate(shared_results):
        assert torch.allclose(torch.tensor(out["ours"]), torch.tensor(out["theirs"]), rtol=1e-6, atol=1e-7), \
            (rank, out)
        assert out["ours"][-1] < out["ours"][0]
        schedule, chunks, interval = out["pick"]
        # The engine runs the pick: its schedule, chunks per rank and checkpoint interval, on its partition.
        assert out["engine"] == (schedule, chunks, interval), out
        assert out["parts"][0] == out["parts"][1], out
        assert out["fits"]
        if tight:
            assert out["peak"] <= out["cap"], out
        picks.add((out["pick"], tuple(out["parts"][0])))
    assert len(picks) == 1, picks  # every rank planned the same


@shared_ranks(lambda: on_ranks(planner_cases.auto_misuse, 2, timeout=300))
def test_auto_refuses_with_the_fix(shared_results):
    for out in shared_results:
        assert "runs the plan of a PipelineModule built with partition_method='auto'" in \
            out["schedule_auto_without_plan"], out
        assert "needs profile_inputs=" in out["no_sample"], out
        assert "needs planner={'micro_batches': N" in out["no_micro_batches"], out
        assert "the module's plan is for 8 micro-batches, the config's gradient_accumulation_steps is 4" in \
            out["other_micro_batches"], out
        assert "is not the cap the module was planned under" in out["other_cap"], out
        assert "no plan fits memory_per_rank=1000 B on all 2 stages" in out["cannot_fit"], out
        assert "on rank" in out["cannot_fit"] and "over the cap" in out["cannot_fit"], out
        assert "planner options are for partition_method='auto'" in out["planner_without_auto"], out
