"""3D parallelism: pipeline x tensor (x data) parallel, against DeepSpeed's engine."""
import pytest
import torch

from . import tensor_parallel_cases
from .distributed import run_ranks


def assert_matches(ours, theirs, what, rtol=1e-6, atol=1e-7):
    """Losses, weights and eval loss of our engine against DeepSpeed's; and the loss fell."""
    assert torch.allclose(torch.tensor(ours["losses"]), torch.tensor(theirs["losses"]), rtol=rtol, atol=atol), \
        (what, ours["losses"], theirs["losses"])
    for k in theirs["weights"]:
        assert torch.allclose(ours["weights"][k], theirs["weights"][k], rtol=rtol, atol=atol), (what, k)
    assert abs(ours["eval"] - theirs["eval"]) <= rtol * abs(theirs["eval"]), what
    assert ours["losses"][-1] < ours["losses"][0], what

# {} is DeepSpeed's default with tensor parallelism: both on.
CONFIGS = [{}, {"pipe_partitioned": False, "grad_partitioned": False}]


@pytest.mark.parametrize("world_size,configs", [(4, CONFIGS + [{"schedule": "gpipe"}, {"schedule": "zb-h1"}]),
                                                (8, CONFIGS[:1])])  # 8: PP=2 x DP=2 x TP=2; DeepSpeed's runs 1F1B
def test_pipeline_by_tensor_parallel_matches_deepspeed(world_size, configs):
    results = run_ranks(tensor_parallel_cases.train, world_size, configs, timeout=600)
    for rank, per_config in enumerate(results):
        for pipeline, (theirs, ours) in zip(configs, per_config):
            what = (rank, pipeline)
            assert ours["flags"] == theirs["flags"], what
            assert_matches(ours, theirs, what)
            if ours["sent"] is not None:  # stage 0: a micro-batch's activation is 3 x 4 float32 = 48 bytes
                split = pipeline.get("pipe_partitioned", True)
                # Split: a share of 12 / 2 floats and the split's meta (5 int64), every micro-batch.
                assert ours["sent"] == ([24, 40] if split else [48]), (what, ours["sent"])


def test_uneven_shares_and_either_direction_alone_give_the_numbers_of_whole_transfers():
    """3 x 5 floats over 2 tensor-parallel ranks: DeepSpeed's engine fails in
    gloo's all-gather (shares of 7 and 8); ours pads the last share. Splitting
    only activations or only gradients (DeepSpeed's engine fails on the first
    in its meta check) works too. Gathering is exact, so every mode gives the
    numbers of sending the tensors whole, bitwise."""
    configs = [{"pipe_partitioned": False, "grad_partitioned": False},
               {"pipe_partitioned": True, "grad_partitioned": True},
               {"pipe_partitioned": True, "grad_partitioned": False},
               {"pipe_partitioned": False, "grad_partitioned": True}]
    results = run_ranks(tensor_parallel_cases.train, 4, configs, 5, 3, 10, 3, "ours", timeout=300)
    for rank, per_config in enumerate(results):
        (whole, ) = per_config[0]
        for pipeline, (mode, ) in zip(configs[1:], per_config[1:]):
            assert mode["losses"] == whole["losses"], (rank, pipeline)
            assert mode["eval"] == whole["eval"], (rank, pipeline)
            assert all(torch.equal(mode["weights"][k], whole["weights"][k]) for k in whole["weights"]), (rank, pipeline)
            if mode["sent"] is not None:
                assert mode["sent"] == ([32, 40] if pipeline["pipe_partitioned"] else [60]), (pipeline, mode["sent"])


def test_checkpoints_move_between_the_engines_with_tensor_parallel_names(tmp_path):
    results = run_ranks(tensor_parallel_cases.checkpoint_interop, 4, str(tmp_path), timeout=400)
    export = results[0].pop("export")
    assert export["shapes"]["1.w1"] == (4, 4) and export["shapes"]["0.weight"] == (4, 6), export  # a shard: 8 / 2
    assert export["differ"]  # each rank's own shard
    assert "pass model_rank (--model-rank)" in export["without_rank"], export
    for rank, by_way in enumerate(results):
        for way, (continued, resumed, files) in by_way.items():
            assert resumed == continued, (rank, way, continued, resumed)  # bitwise
            if files is not None:  # DeepSpeed's names: a file per layer and tensor-parallel rank
                assert {"layer_01-model_00-model_states.pt", "layer_01-model_01-model_states.pt",
                        "layer_02-model_00-model_states.pt", "layer_02-model_01-model_states.pt"} <= set(files), files
                assert {f"mp_rank_{r:02d}_model_states.pt" for r in range(4)} <= set(files), files


@pytest.mark.parametrize("world_size,modes", [(4, [None, "deepspeed", "ours"]), (8, [None])])
def test_a_megatron_style_gpt_matches_deepspeed_with_every_activation_checkpointing(world_size, modes):
    """Tied embedding and head across the first and last stage, tensor-parallel
    attention and MLP, (hidden states, bool mask) between stages,
    partition_method="type:TransformerBlock"; PP=2 x TP=2 (every activation
    checkpointing mode) and PP=2 x DP=2 x TP=2."""
    results = run_ranks(tensor_parallel_cases.train_gpt, world_size, modes, timeout=600)
    for rank, by_mode in enumerate(results):
        for mode in modes:
            theirs, ours = by_mode[str(mode)]
            what = (rank, mode)
            assert ours["layers"] == theirs["layers"], what
            assert_matches(ours, theirs, what, rtol=1e-6 if mode is None else 1e-5, atol=1e-6)
        assert by_mode["None"][1]["layers"].count("TransformerBlock") == 2, by_mode["None"][1]["layers"]


def test_split_transfers_pass_under_nccl_rules():
    """What the executor issues with pipe_partitioned and grad_partitioned on,
    recorded per pipeline (one per tensor-parallel rank) and replayed by the
    NCCL-order checker; the shares and their meta travel in that order."""
    from deepspeed_pipe_ext import _C
    schedules = ["1f1b", "gpipe", "zb-h1"]
    results = run_ranks(tensor_parallel_cases.recorded_traces, 4, schedules, timeout=400)
    for schedule in schedules:
        pipes = {}
        for by_schedule in results:
            case = by_schedule[schedule]
            assert torch.allclose(torch.tensor(case["ours"]), torch.tensor(case["theirs"]), rtol=1e-6, atol=1e-7), \
                (schedule, case["ours"], case["theirs"])
            pipes.setdefault(case["tp"], {})[case["stage"]] = case["trace"]
        assert len(pipes) == 2
        for tp, traces in pipes.items():
            ordered = [traces[0], traces[1]]
            assert all(any(e[0] == "send" for e in t) for t in ordered)
            for one_stream in (False, True):
                result = _C.check_nccl_order(ordered, one_stream_per_rank=one_stream)
                assert result["ok"], f"{schedule} pipe {tp}: {result['report']}"


def test_zero_stage_1_and_bf16_at_pipeline_by_tensor_parallel_match_deepspeed():
    """DeepSpeed's ZeRO-1 and bf16 optimizers over PP=2 x TP=2 (with gradient
    clipping, whose norm counts each tensor-parallel shard once)."""
    zero1 = {"zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True}
    extras = [zero1, {"bf16": {"enabled": True}}, {"bf16": {"enabled": True}, **zero1}]
    results = run_ranks(tensor_parallel_cases.train_optimizers, 4, extras, timeout=600)
    for rank, per_extra in enumerate(results):
        for extra, (theirs, ours) in zip(extras, per_extra):
            bf16 = "bf16" in extra
            assert_matches(ours, theirs, (rank, extra), rtol=1e-2 if bf16 else 1e-6, atol=1e-3 if bf16 else 1e-7)


def test_a_topology_that_does_not_match_the_world_size_is_refused_on_every_rank():
    errors = run_ranks(tensor_parallel_cases.topology_larger_than_the_job, 2, timeout=120)
    for error in errors:
        assert error is not None and "has 4 ranks but the job has 2" in error, errors
        assert "product of the topology dims must equal the world size" in error, errors
