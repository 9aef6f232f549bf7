"""Every public name of DeepSpeed's PipelineEngine, and the private helpers
DeepSpeed's own unit tests call on one, exists on ours; what is left out is
listed here with the reason. (The engine classes alone, in one process:
tests/unit/test_engine_surface.py.)"""
import pytest

from . import surface_cases
from .distributed import run_ranks


@pytest.fixture(scope="module")
def engines():
    (result, ) = run_ranks(surface_cases.engine_names, 1)
    return result

# Private names DeepSpeed's unit tests call on a pipeline engine.
PRIVATE_NAMES_USED_BY_DEEPSPEED_TESTS = {"_reentrant_activation_checkpointing", "_loss_stage_global_rank",
                                         "_train_schedule", "_inference_schedule"}

# Public names of DeepSpeed's PipelineEngine that ours does not have, and why.
_BUFFERS = ("DeepSpeed's Python-side transfer buffers and meta caches; ours live in the C++ executor and P2P "
            "(engine.last_buffer_usage reports them)")
EXCLUDED = {
    "DTYPE_TO_ID": "DeepSpeed's dtype codes for its Python meta messages; ours are encoded in C++ "
                   "(csrc/runtime/p2p.cpp) and carry every dtype",
    "ID_TO_DTYPE": "the inverse of DTYPE_TO_ID, for the same reason",
    "batch_timer": "DeepSpeed's per-batch ThroughputTimer; ours times the batch itself (the same steps_per_print line) "
                   "and every pass (engine.last_timeline)",
    "first_gradient_send": _BUFFERS,
    "first_output_send": _BUFFERS,
    "grad_layer": _BUFFERS,
    "grad_partition_grad_layer_meta_cache": _BUFFERS,
    "meta_buffer": _BUFFERS,
    "num_pipe_buffers": _BUFFERS,
    "pipe_buffers": _BUFFERS,
    "pipe_partition_grad_meta_cache": _BUFFERS,
    "pipe_partition_input_meta_cache": _BUFFERS,
    "pipe_partition_output_meta_cache": _BUFFERS,
    "pipe_recv_buf": _BUFFERS,
}


def test_every_deepspeed_pipeline_engine_name_exists_on_ours_or_is_excluded_with_a_reason(engines):
    result = engines
    theirs, ours = set(result["deepspeed"]["names"]), set(result["ours"]["names"])
    wanted = {n for n in theirs if not n.startswith("_")} | PRIVATE_NAMES_USED_BY_DEEPSPEED_TESTS
    missing = sorted(n for n in wanted - ours if n not in EXCLUDED)
    assert not missing, f"DeepSpeed's PipelineEngine has these and ours does not: {missing}"
    assert all(reason.strip() for reason in EXCLUDED.values())
    stale = sorted(n for n in EXCLUDED if n in ours or n not in theirs)
    assert not stale, f"excluded but present on ours, or gone from DeepSpeed's: {stale}"


def test_deepspeed_accessors_behave_the_same(engines):
    result = engines
    theirs, ours = result["deepspeed"]["behaviour"], result["ours"]["behaviour"]
    assert theirs.pop("class").startswith("deepspeed.") and ours.pop("class").startswith("deepspeed_pipe_ext.")
    assert ours == theirs
    assert ours["micro_batches"] == (4, 4)  # set_train_batch_size changes the number of micro-batches


def test_both_engines_are_deepspeed_pipeline_engines_to_every_type_check(engines):
    # Megatron-DeepSpeed's training loop asks isinstance(model, deepspeed.PipelineEngine) to choose its pipeline
    # path; DeepSpeed's own samplers ask the same of deepspeed.runtime.pipe.engine.PipelineEngine.
    for name in ("deepspeed", "ours"):
        checks = engines[name]["behaviour"]["type_checks"]
        assert all(checks.values()), (name, checks)


def test_the_private_deepspeed_attributes_our_engine_relies_on_still_exist(engines):
    assert engines["missing_private"] == [], engines["missing_private"]


def test_megatron_deepspeeds_training_loop_in_small_matches_deepspeed():
    import torch
    for rank, result in enumerate(run_ranks(surface_cases.megatron_loop, 2, timeout=300)):
        theirs, ours = result["deepspeed"], result["ours"]
        assert theirs["engine"].startswith("deepspeed.") and ours["engine"].startswith("deepspeed_pipe_ext."), rank
        assert ours["has_attention_mask"] is theirs["has_attention_mask"] is True
        assert ours["is_pipe_parallel"] is theirs["is_pipe_parallel"] is True
        for (o_loss, o_extra, o_norm), (t_loss, t_extra, t_norm) in zip(ours["steps"], theirs["steps"]):
            assert o_loss == pytest.approx(t_loss, rel=1e-6) and o_extra == t_extra
            assert o_norm == (t_norm if t_norm is None else pytest.approx(t_norm, rel=1e-5))
        assert ours["eval"] == pytest.approx(theirs["eval"], rel=1e-6)
        for k, v in theirs["weights"].items():
            assert torch.allclose(ours["weights"][k], v, rtol=1e-6, atol=1e-7), (rank, k)
