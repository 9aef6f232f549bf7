"""Our PipelineEngine (C++ executor) against DeepSpeed's PipelineEngine:
losses, weights and eval outputs on the same seeds and data.

The tests marked `shared_ranks` run their cases in one process group per world
size (distributed.py); the tests about failures start their own ranks."""
import pytest
import torch

from . import engine_cases
from .distributed import on_ranks, run_ranks, shared_ranks


def assert_close(a, b, what):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    scale = torch.clamp(b.abs(), min=1e-12)
    assert torch.all((a - b).abs() / scale <= 1e-6), f"{what}: {a} != {b}"


def check_parity(results):
    for rank, (theirs, ours) in enumerate(results):
        (t_losses, t_weights, t_eval), (o_losses, o_weights, o_eval) = theirs, ours
        assert len(o_losses) == len(t_losses) == 20
        assert_close(o_losses, t_losses, f"rank {rank} losses")
        assert o_weights.keys() == t_weights.keys()
        for k in t_weights:
            assert torch.allclose(o_weights[k], t_weights[k], rtol=1e-6, atol=1e-7), f"rank {rank} weight {k}"
        assert_close(o_eval[0], t_eval[0], f"rank {rank} eval loss")
        if t_eval[1] is not None:
            assert torch.allclose(o_eval[1], t_eval[1], rtol=1e-6, atol=1e-7), f"rank {rank} logits"
        else:
            assert o_eval[1] is None
    # The loss falls, so the comparison is not of two idle runs.
    assert results[0][1][0][-1] < results[0][1][0][0]


@pytest.mark.parametrize("world_size,num_stages", [(2, 1), (2, 2), (4, 4), (4, 2)])
@shared_ranks(lambda world_size, num_stages: on_ranks(engine_cases.train_both, world_size, num_stages, timeout=400))
def test_training_matches_deepspeed(world_size, num_stages, shared_results):
    check_parity(shared_results)


ZERO1_CLIPPING_LR_SCHEDULE = {"zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True,
                              "gradient_clipping": 0.5,
                              "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 0.05,
                                                                           "warmup_num_steps": 5}}}


@shared_ranks(lambda: on_ranks(engine_cases.train_both, 4, 2, 20, 4, 3, ZERO1_CLIPPING_LR_SCHEDULE, timeout=400))
def test_zero1_gradient_clipping_and_lr_schedule_match_deepspeed(shared_results):
    check_parity(shared_results)


@pytest.mark.parametrize("world_size,num_stages", [(2, 2), (4, 4)])
@shared_ranks(lambda world_size, num_stages: on_ranks(engine_cases.train_both, world_size, num_stages, 20, 4, 3,
                                                      {"pipeline": {"schedule": "gpipe"}}, True, timeout=400))
def test_gpipe_schedule_matches_deepspeed(world_size, num_stages, shared_results):
    """GPipe runs every forward before any backward: the same arithmetic as
    DeepSpeed's 1F1B (gradients accumulate in the same micro-batch order)."""
    results = shared_results
    check_parity([r[:2] for r in results])
    for rank, (_, _, timeline, usage) in enumerate(results):
        assert timeline == "F" * 4 + "B" * 4, (rank, timeline)
        # Every micro-batch is live between the forwards and the backwards.
        assert usage["buffers"] == usage["peak_live_buffers"] == 4, (rank, usage)


def expected_passes(kind, micro_batches, num_stages, stage_id):
    """The compute passes of the generated stream, as letters."""
    from deepspeed_pipe_ext._native import _C
    program = _C.StageProgram(kind, micro_batches, num_stages, stage_id)
    ops = [_C.Op(code) for step in program.steps for code, _, _, _ in step]
    return "".join(op.letter for op in ops if op.is_compute)


@pytest.mark.parametrize("world_size,num_stages", [(2, 2), (4, 4), (4, 2)])
@shared_ranks(lambda world_size, num_stages: on_ranks(engine_cases.train_both, world_size, num_stages, 20, 4, 3,
                                                      {"pipeline": {"schedule": "zb-h1"}}, True, timeout=400))
def test_zero_bubble_schedule_matches_deepspeed(world_size, num_stages, shared_results):
    """ZB-H1 splits each backward into B (input gradients, sent at once) and W
    (weight gradients, deferred into bubbles): the same gradients as
    DeepSpeed's 1F1B, summed in the same micro-batch order."""
    results = shared_results
    check_parity([r[:2] for r in results])
    for rank, (_, _, passes, usage) in enumerate(results):
        stage = rank // (world_size // num_stages)  # DeepSpeed's topology: the pipe axis outermost
        assert passes == expected_passes("zb-h1", 4, num_stages, stage), (rank, passes)
        assert passes.count("W") == 4, (rank, passes)
        # A buffer stays in use until its W: at most S - stage micro-batches before B, S - 1 more waiting for W.
        assert usage["peak_live_buffers"] == usage["buffers"] <= min(4, 2 * num_stages - stage - 1), (rank, usage)


@pytest.mark.parametrize("model,world_size,num_stages", [("transformer", 2, 2), ("transformer", 4, 4), ("tied", 2, 2)])
@shared_ranks(lambda model, world_size, num_stages: on_ranks(engine_cases.train_model_both, world_size, model,
                                                             num_stages, 20, 4, {"pipeline": {"schedule": "zb-h1"}},
                                                             timeout=400))
def test_zero_bubble_schedule_on_tuple_activations_and_tied_weights(model, world_size, num_stages, shared_results):
    check_parity(shared_results)


def bf16_case(world_size, num_stages, zero_stage):
    extra = {"bf16": {"enabled": True}, "zero_optimization": {"stage": zero_stage},
             "zero_allow_untested_optimizer": True}
    return on_ranks(engine_cases.train_both, world_size, num_stages, 20, 4, 3, extra, timeout=400)


@pytest.mark.parametrize("world_size,num_stages,zero_stage", [(2, 2, 0), (4, 2, 1)])
@shared_ranks(bf16_case)
def test_bf16_matches_deepspeed(world_size, num_stages, zero_stage, shared_results):
    """bf16 weights and activations, DeepSpeed's BF16_Optimizer (fp32 master
    weights and gradients) on both engines."""
    check_parity(shared_results)


@shared_ranks(lambda: on_ranks(engine_cases.gradient_accumulation, 2))
def test_gradient_accumulation_scaling_matches_deepspeed(shared_results):
    for theirs, ours in shared_results:
        assert ours[0] == pytest.approx(theirs[0], rel=1e-7)
        assert ours[1] == pytest.approx(theirs[1], rel=1e-7)


@pytest.mark.parametrize("model,world_size,num_stages", [("transformer", 2, 2), ("transformer", 4, 4),
                                                         ("tied", 2, 2), ("tied", 4, 2), ("tied_unused", 2, 2)])
@shared_ranks(lambda model, world_size, num_stages: on_ranks(engine_cases.train_model_both, world_size, model,
                                                             num_stages, timeout=400))
def test_models_match_deepspeed(model, world_size, num_stages, shared_results):
    check_parity(shared_results)


@pytest.mark.parametrize("die", [False, True])
def test_unresponsive_peer_fails_within_the_timeout(die):
    results = run_ranks(engine_cases.peer_never_answers, 2, die, allow_exit={1} if die else set())
    message, waited = results[0]
    # Silent peer: the first gradient never comes. Dead peer: whichever transfer
    # notices first (a send may already find the connection closed).
    assert message.startswith("stage 0 (global rank 0): "), message
    assert "step " in message and " stage 1 failed" in message, message
    if not die:
        assert "receiving step 3, RecvGrad (micro-batch 0) (meta) from stage 1 failed" in message, message
        assert "(timeout 3 s)" in message, message
    else:  # a dead peer is named as such, not as a timeout
        assert "the peer closed the connection" in message and "timeout" not in message, message
    assert waited < 30


def test_bad_configurations_and_calls():
    per_rank = run_ranks(engine_cases.engine_errors, 2)
    out = per_rank[0]
    assert "ZeRO stage 2 partitions gradients" in out["zero2"]
    assert "Type fp16 is not supported on your device" in out["fp16"]  # DeepSpeed's own check, on this CPU
    assert ("schedule 'interleaved-1f1b' runs a PipelineModule built with virtual_stages=2 (or more), "
            "virtual_layout='interleaved'; this one is built with virtual_stages=1: build it so") in out["schedule"]
    assert ("schedule 'zb-h1' splits the backward pass, which runs with fp32 and ZeRO stage 0 without DeepSpeed's "
            "backward wrappers; this config has: a ZeRO optimizer. Remove those or use the 1f1b "
            "schedule") in out["zb_zero1"]
    assert "this config has: bf16." in out["zb_bf16"]
    assert "train_batch_size" in out["batch_size"]
    for name in ("forward", "backward", "step"):
        assert out[name] == "PipelineError: Only train_batch() is accessible in pipeline mode."
    # Its own error, or (when the other rank, which lacks data too, was quicker) the other's, naming it.
    assert "needs data: pass data_iter" in out["no_data"], out["no_data"]
    assert "an earlier batch failed here" in out["after_no_data"], out["after_no_data"]
    # Only the first and last stages load data: with 2 stages each loads every micro-batch once.
    assert [r["batch_fn_calls"] for r in per_rank] == [2, 2]
    assert [r["user_hook_calls"] for r in per_rank] == [2, 2]
    assert [r["engine_children"] for r in per_rank] == ["module"] * 2  # the stage's forward is not a child module
    # The executor's measured compute passes follow DeepSpeed's 1F1B order for 2 micro-batches.
    assert per_rank[0]["timeline"] == "ForwardPass:0,ForwardPass:1,BackwardPass:0,BackwardPass:1"
    assert per_rank[1]["timeline"] == "ForwardPass:0,BackwardPass:0,ForwardPass:1,BackwardPass:1"
    # DeepSpeed's buffer counts (at least two), of which 1F1B keeps S - stage in use.
    assert [(r["buffer_usage"]["buffers"], r["buffer_usage"]["peak_live_buffers"])
            for r in per_rank] == [(2, 2), (2, 1)]
    # Stage 0 holds two micro-batches' inputs (2 x 8 floats) and outputs; stage 1 one input, no output (the loss).
    assert per_rank[0]["buffer_usage"]["peak_activation_bytes"] >= 2 * 2 * 8 * 4
    assert per_rank[1]["buffer_usage"]["peak_activation_bytes"] > 0
    assert "steps: 1 loss: " in per_rank[0]["progress"] and "samples/sec: " in per_rank[0]["progress"]
    assert per_rank[1]["progress"] == ""


@shared_ranks(lambda: on_ranks(engine_cases.engine_selection, 2))
def test_deepspeed_initialize_picks_the_engine(shared_results):
    for rank_result in shared_results:
        assert rank_result == {k: True for k in rank_result}, rank_result


@shared_ranks(lambda: on_ranks(engine_cases.released_outputs, 2))
def test_sent_outputs_release_their_storage(shared_results):
    stage0, stage1 = shared_results
    for rank in (stage0, stage1):
        assert rank[True][0] == rank[False][0]  # bitwise the same losses
        assert all(torch.equal(a, b) for a, b in zip(rank[True][1], rank[False][1]))
        theirs, ours = rank["saved_output"]
        assert_close(ours, theirs, "losses with an output its own graph saves")
    # Stage 0 holds its sent outputs until their backward (1F1B: two in flight); released, their bytes go.
    # Each output is a 2 x 4 float32 micro-batch (the MLP's last layer on stage 0 is 16 wide): see below.
    kept, released = stage0[False][2], stage0[True][2]
    assert released < kept
    assert stage1[True][2] == stage1[False][2]  # the last stage sends no outputs


FP16_CONFIGS = [  # (DeepSpeed's fp16 config, label scale)
    ({"enabled": True, "loss_scale": 1.0}, 1.0),  # static, no scaling
    ({"enabled": True, "loss_scale": 64}, 1.0),  # static
    ({"enabled": True, "loss_scale_window": 2, "hysteresis": 1}, 30.0),  # dynamic, large gradients
]


@pytest.mark.parametrize("world_size,num_stages", [(2, 2), (4, 2)])
@shared_ranks(lambda world_size, num_stages: on_ranks(engine_cases.fp16_both, world_size, num_stages, FP16_CONFIGS))
def test_fp16_loss_scaling_matches_deepspeed(world_size, num_stages, shared_results):
    """Ours takes DeepSpeed's fp16 path (its loss scaler and fp16 optimizer wrapper): the same losses,
    weights, skipped steps and loss scale as DeepSpeed's PipelineEngine. On this CPU DeepSpeed's fp16
    wrapper of a torch optimizer moves the weights by less than fp16 resolves once the scale is large,
    so overflow handling and training progress are checked on a GPU (benchmarks/gpu_check.py)."""
    for rank, per_config in enumerate(shared_results):
        for (fp16, _), (theirs, ours) in zip(FP16_CONFIGS, per_config):
            assert ours[0] == "deepspeed_pipe_ext.engine" and theirs[0] == "deepspeed.runtime.pipe.engine"
            assert_close(ours[1], theirs[1], f"rank {rank} fp16 {fp16} losses")
            for k in theirs[2]:
                assert torch.equal(ours[2][k], theirs[2][k]), f"rank {rank} fp16 {fp16} weight {k}"
            assert ours[3] == theirs[3] and ours[4] == theirs[4], (fp16, ours[3:], theirs[3:])
        unscaled = per_config[0][1]
        assert unscaled[1][-1] < unscaled[1][0]  # fp16 training makes progress


@shared_ranks(lambda: on_ranks(engine_cases.profiled_pass_names, 2))
def test_torch_profiler_names_every_pass_and_transfer(shared_results):
    stage0, stage1 = shared_results
    assert {"pipe stage 0 forward mb 0", "pipe stage 0 forward mb 1", "pipe stage 0 send activation mb 1",
            "pipe stage 0 recv grad mb 0", "pipe stage 0 backward mb 1", "pipe stage 0 load mb 0",
            "pipe stage 0 optimizer step"} <= set(stage0), stage0
    assert {"pipe stage 1 recv activation mb 0", "pipe stage 1 forward mb 1", "pipe stage 1 backward mb 0",
            "pipe stage 1 send grad mb 1", "pipe stage 1 reduce grads"} <= set(stage1), stage1


def test_failed_batches_never_step_and_later_batches_refuse():
    stage0, stage1 = run_ranks(engine_cases.failed_batches, 2, timeout=200)
    for value, message in stage0["timeouts"].items():
        assert "p2p_timeout" in message and "must be a number of seconds" in message, (value, message)
    for case in ("exhausted", "detached", "none", "stalled"):
        for stage, rank in ((0, stage0), (1, stage1)):
            result = rank[case]
            assert result["error"] is not None, (case, stage)
            if case != "stalled":  # the stalled batch failed after its optimizer step
                assert result["weights_unchanged"], (case, stage)  # no optimizer step for a failed batch
            kind, message = result["next"]
            assert (kind == "PipelineError"
                    and f"stage {stage} (global rank {stage}): an earlier batch failed" in message)
            assert "load the last checkpoint" in message
    # The stage that ran out of data says so, with where the schedule stood.
    kind, _, notes = stage0["exhausted"]["error"]
    assert kind == "StopIteration"
    assert any("raised on stage 0 at step" in n and "LoadMicroBatch (micro-batch 3)" in n for n in notes), notes
    # Outputs that would silently freeze earlier stages, or that the next stage cannot take, are refused by name.
    kind, message, _ = stage0["detached"]["error"]
    assert kind == "PipelineError" and "stage 0: no output of its last layer (layer 1, Detach) requires grad" in message
    kind, message, _ = stage0["none"]["error"]
    assert kind == "PipelineError" and "stage 0: its last layer (layer 1, ReturnsNone) returned NoneType" in message
    # Their peer stops at once (well within the 3 s timeout), naming the failure and where it started.
    for case, cause in (("detached", "no output of its last layer"), ("none", "returned NoneType")):
        kind, message, _ = stage1[case]["error"]
        assert kind == "RemoteFailure", (case, kind)  # a PipelineError
        assert message.startswith("stage 1 (global rank 1): stopped because the batch failed on global rank 0 "
                                  "(stage 0) at step 0, ForwardPass (micro-batch 0): PipelineError: "), message
        assert cause in message and "No rank takes an optimizer step" in message, message
        assert stage1[case]["seconds"] < 2.5, stage1[case]["seconds"]
    # A collective of the batch is bounded by p2p_timeout too: the loss broadcast the last stage never joined.
    kind, message, _ = stage0["stalled"]["error"]
    assert (kind == "CollectiveTimeout"
            and "the loss broadcast over global ranks [0, 1] did not complete within" in message)
    assert stage0["stalled"]["seconds"] < 3 + 5
    assert stage1["stalled"]["error"][1] == "stalled before the loss broadcast"


def hand_written_schedule_case(tmp_path):
    path = tmp_path / "warm.csv"
    path.write_text("0F0,0F1,0F2,0B0,0F3,0B1,0B2,0B3\n1F0,1B0,1F1,1B1,1F2,1B2,1F3,1B3\n")
    return on_ranks(engine_cases.train_both, 2, 2, 20, 4, 3, {"pipeline": {"schedule": str(path)}}, True, timeout=400)


@shared_ranks(hand_written_schedule_case)
def test_a_hand_written_schedule_from_a_csv_file_matches_deepspeed(shared_results):
    """1F1B with two more warm-up forwards on stage 0 than any built-in
    schedule runs, written as a torch.distributed.pipelining-style CSV."""
    results = shared_results
    check_parity([r[:2] for r in results])
    assert results[0][2] == "FFFBFBBB" and results[1][2] == "FBFBFBFB", [r[2] for r in results]


@shared_ranks(lambda: on_ranks(engine_cases.set_schedule_cases, 2, timeout=300))
def test_set_schedule_runs_a_compute_order_and_refuses_one_that_does_not_fit(shared_results):
    for out in shared_results:
        assert out["losses_equal"], out
        assert "written for 2 ranks and 3 micro-batches" in out["wrong_size"], out
        assert "cannot run" in out["unknown"], out
        assert "ScheduleError" in out["deadlock"], out  # its own, or the quicker rank's (the same check)


@shared_ranks(lambda: on_ranks(engine_cases.train_with_a_pipe_schedule_class, 2, 2, timeout=400))
def test_a_pipe_schedule_subclass_written_with_deepspeed_instructions_runs_and_matches_deepspeed(shared_results):
    results = shared_results
    check_parity([r[:2] for r in results])
    assert [r[2] for r in results] == ["FFFFBBBB"] * 2, [r[2] for r in results]
