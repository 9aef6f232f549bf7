"""PipelineModule on real processes (gloo): parity with DeepSpeed's, new
partition methods, and clear errors for bad input. The checks of one world
size share a process group (distributed.py `shared_ranks`)."""
import pytest

from . import module_cases
from .distributed import on_ranks, shared_ranks


@pytest.mark.parametrize("world_size,cases", [(2, 40), (4, 30)])
@shared_ranks(lambda world_size, cases: on_ranks(module_cases.check_parity_with_deepspeed, world_size, cases,
                                                 17 + world_size))
def test_module_matches_deepspeed(world_size, cases, shared_results):
    checked = shared_results
    assert min(checked) >= cases // 2, "too few cases ran to mean anything"


@pytest.mark.parametrize("world_size", [2, 4])
@shared_ranks(lambda world_size: {"grid": on_ranks(module_cases.check_grid_matches_deepspeed, world_size),
                                  "constructor": on_ranks(module_cases.check_constructor_variants_match_deepspeed,
                                                          world_size)})
def test_grid_and_constructor_variants_match_deepspeed(world_size, shared_results):
    assert all(shared_results["grid"])
    assert shared_results["constructor"] == [3 if world_size == 2 else 5] * world_size


@shared_ranks(lambda: on_ranks(module_cases.collect_bad_input_errors, 2))
def test_bad_input_errors(shared_results):
    per_rank = shared_results
    assert per_rank[0].keys() == per_rank[1].keys()
    errors = per_rank[0]
    expected = {
        "stages_not_dividing": "num_stages (3) must divide distributed world size (2)",
        "unknown_method": "unknown partition_method 'magic'",
        "regex_no_match": "found no valid layers",
        "bad_layer": "layer 1 is a int",
        "more_stages_than_layers": "stage 1 gets no layers",
        "explicit_wrong_length": "must be 3 ints",
        "explicit_empty_stage": "stage 0 gets layers [0, 0)",
        "explicit_wrong_end": "end at the number of layers (4)",
        "profile_without_inputs": "needs profile_inputs",
        "spec_of_non_module": "needs a torch.nn.Module subclass, got <class 'dict'>",
        "no_stages": "must provide num_stages or topology",
        "zero_stages": "num_stages must be a positive int",
        "nested": "nested pipelines are not supported",
    }
    for name, fragment in expected.items():
        assert errors[name] is not None, f"{name}: no error raised"
        assert fragment in errors[name], f"{name}: {errors[name]}"
    assert per_rank[1] == per_rank[0]


@shared_ranks(lambda: on_ranks(module_cases.check_new_partition_methods, 2))
def test_new_partition_methods(shared_results):
    out = shared_results[0]
    assert out["minmax_parts"] == out["minmax_expected"]
    assert out["minmax_weights"]
    assert out["explicit_parts"] == [0, 3, 8]
    assert out["profile_same_on_all_ranks"]
    assert out["profile_parts"] == out["profile_expected"]
    costs = out["profile_costs"]
    assert len(costs) == 8 and all(c >= 0 for c in costs)
    # The two wide blocks dominate the measured cost and land on different stages.
    assert min(costs[1], costs[6]) > max(costs[i] for i in (0, 2, 3, 4, 5, 7))
    assert out["profile_parts"][1] in range(2, 7)
    assert "bottleneck: stage" in out["describe"]


@shared_ranks(lambda: on_ranks(module_cases.check_virtual_stage_partitions, 2))
def test_every_partition_method_splits_virtual_stages_in_both_layouts(shared_results):
    """stages x 2 parts by each method (DeepSpeed's own partition_uniform and
    partition_balanced for its methods), rank r building parts r and r + S
    (interleaved) or r and 2S-1-r (v), and nothing else."""
    for rank, out in enumerate(shared_results):
        for (layout, method), case in out.items():
            assert case["parts"] == case["expected"], (layout, method, case)
            assert case["my_parts"] == ([rank, rank + 2] if layout == "interleaved" else [rank, 3 - rank])
            assert case["chunks"] == case["expected_chunks"], (layout, method, case)
            assert case["local_layers"] == sum(stop - start for start, stop in case["chunks"])
            assert f"stage {rank} chunk 1: layers [{case['chunks'][1][0]}, {case['chunks'][1][1]})" in case["describe"]
