"""Virtual pipeline stages (Megatron's interleaved 1F1B): several model
chunks per rank, against DeepSpeed's 1F1B on the same layers. (Their stage
programs alone, in one process: tests/unit/test_virtual_stages.py.) The
cases of one world size share a process group (distributed.py `shared_ranks`)."""
import pytest
import torch

from . import engine_cases
from .distributed import on_ranks, shared_ranks


def merged(results, which):
    """Every rank's weights in one dict (layer-numbered keys; data-parallel replicas agree)."""
    out = {}
    for per_rank in results:
        out.update(per_rank[which]["weights"])
    return out


def assert_trains_like_deepspeed(rank, theirs, ours):
    """Losses (falling) and eval loss within 1e-6 of DeepSpeed's."""
    assert torch.allclose(torch.tensor(ours["losses"]), torch.tensor(theirs["losses"]), rtol=1e-6, atol=1e-7), \
        (rank, ours["losses"], theirs["losses"])
    assert ours["losses"][-1] < ours["losses"][0]
    assert abs(ours["eval"] - theirs["eval"]) <= 1e-6 * abs(theirs["eval"]), (rank, ours["eval"], theirs["eval"])


@pytest.mark.parametrize("world_size,num_stages,chunks", [(2, 2, 2), (2, 2, 3), (4, 4, 2), (4, 2, 2)])
@shared_ranks(lambda world_size, num_stages, chunks: on_ranks(engine_cases.train_interleaved, world_size, num_stages,
                                                              chunks, timeout=600))
def test_interleaved_1f1b_matches_deepspeed(world_size, num_stages, chunks, shared_results):
    results = shared_results
    for rank, (theirs, ours) in enumerate(results):
        assert_trains_like_deepspeed(rank, theirs, ours)
        assert sorted({p.split(".")[1] for p in ours["passes"]}) == [str(c) for c in range(chunks)], ours["passes"]
    theirs, ours = merged(results, 0), merged(results, 1)
    assert theirs.keys() == ours.keys()
    for key in theirs:
        assert torch.allclose(ours[key], theirs[key], rtol=1e-6, atol=1e-7), key


def interleaved_model_case(model, checkpointing):
    both = {"seed_layers": True}
    if checkpointing:
        both.update(activation_checkpoint_interval=1, checkpointable_layers=["MaskedBlock"])
    return on_ranks(engine_cases.train_model_both, 2, model, 2, 20, 4, {"pipeline": {"schedule": "interleaved-1f1b"}},
                    both, {"virtual_stages": 2}, timeout=400)


@pytest.mark.parametrize("model,checkpointing", [("transformer", False), ("transformer", True), ("tied", False)])
@shared_ranks(interleaved_model_case)
def test_interleaved_1f1b_with_tuple_activations_tied_weights_and_checkpointing(model, checkpointing, shared_results):
    """(hidden, bool mask, int positions) between chunks; a weight tied
    between the first rank's first chunk and the last rank's last chunk;
    activation checkpointing inside the chunks. S=2, two chunks per rank."""
    results = shared_results
    weights = [{}, {}]
    for rank, (theirs, ours) in enumerate(results):
        for which, (losses, w, evals) in enumerate((theirs, ours)):
            weights[which].update(w)
        assert torch.allclose(torch.tensor(ours[0]), torch.tensor(theirs[0]), rtol=1e-6, atol=1e-7), rank
        assert abs(ours[2][0].item() - theirs[2][0].item()) <= 1e-6 * abs(theirs[2][0].item()), rank
    assert results[0][1][0][-1] < results[0][1][0][0]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.allclose(weights[1][key], weights[0][key], rtol=1e-6, atol=1e-7), key


def checkpoints_case(tmp_path, layout):
    from . import checkpoint_cases
    return on_ranks(checkpoint_cases.virtual_stage_checkpoints, 2, str(tmp_path), layout, timeout=400)


@pytest.mark.parametrize("layout", ["interleaved", "v"])
@shared_ranks(checkpoints_case)
def test_checkpoints_move_between_virtual_stages_one_chunk_and_deepspeed(layout, shared_results):
    results = shared_results
    for rank, out in enumerate(results):
        assert out["resumed"] == out["continued"], rank  # bitwise, optimizer and LR schedule included
        for key in ("eval_ours_from_v2", "eval_deepspeed_from_v2", "eval_v2_from_deepspeed",
                    "eval_other_layout_from_v2"):
            assert abs(out[key] - out["eval_v2"]) <= 1e-6 * abs(out["eval_v2"]), (rank, key, out[key], out["eval_v2"])
    # DeepSpeed's names, layers numbered in the whole pipeline.
    files = results[0]["files"]
    assert {f"layer_{i:02d}-model_states.pt" for i in (0, 2, 4, 5)} <= set(files), files
    assert {"mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"} <= set(files), files


@pytest.mark.parametrize("extra", [{"zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True},
                                   {"bf16": {"enabled": True}}])
@shared_ranks(lambda extra: on_ranks(engine_cases.train_interleaved, 2, 2, 2, 6, 4, 3, extra, timeout=400))
def test_interleaved_1f1b_with_zero_stage_1_and_bf16_matches_deepspeed(extra, shared_results):
    results = shared_results
    tolerance = 1e-2 if "bf16" in extra else 1e-6
    for rank, (theirs, ours) in enumerate(results):
        assert torch.allclose(torch.tensor(ours["losses"]), torch.tensor(theirs["losses"]), rtol=tolerance,
                              atol=tolerance / 10), (rank, ours["losses"], theirs["losses"])


@shared_ranks(lambda: on_ranks(engine_cases.virtual_stage_mismatches, 2, timeout=200))
def test_a_schedule_that_does_not_fit_the_module_is_refused_with_the_fix(shared_results):
    errors = shared_results
    for out in errors:
        assert "which the interleaved-1f1b schedule runs, not '1f1b'" in out["chunks_with_1f1b"], out
        assert "runs a PipelineModule built with virtual_stages=2 (or more), virtual_layout='interleaved'" in \
            out["interleaved_without_chunks"], out
        assert "virtual_layout='v' places two model chunks per rank" in out["v_layout_three_chunks"], out
        assert "schedule 'zb-v' runs a PipelineModule built with virtual_stages=2, virtual_layout='v'; this one is " \
            "built with virtual_stages=2, virtual_layout='interleaved'" in out["zb_v_on_interleaved"], out
        assert "virtual_layout='interleaved'; this one is built with virtual_stages=2, virtual_layout='v'" in \
            out["interleaved_on_v"], out
        assert "which the zb-v schedule runs, not 'gpipe'" in out["v_with_gpipe"], out
        assert "which the interleaved-1f1b schedule runs, not 'gpipe'" in out["set_schedule"], out
        assert "this one is built with virtual_stages=2, virtual_layout='v'" in out["v_set_interleaved"], out
        assert ("the compute order names 1 model chunk(s) per rank, but the PipelineModule is built with "
                "virtual_stages=2, virtual_layout='v'") in out["one_chunk_order_on_v"], out
        assert ("the compute order places 2 model chunks per rank in the 'v' layout, but the PipelineModule is "
                "built with virtual_stages=2, virtual_layout='interleaved'") in out["v_order_on_interleaved"], out
        assert "stage 0 chunk 1: layers" in out["partition"] or "stage 1 chunk 1: layers" in out["partition"], out
        # The V: rank 0 holds the first and the last part.
        lines = out["v_partition"].splitlines()
        assert "virtual_layout='v'" in lines[0], lines
        assert [line.split(":")[0].strip() for line in lines[1:5]] == \
            ["stage 0 chunk 0", "stage 1 chunk 0", "stage 1 chunk 1", "stage 0 chunk 1"], lines


@pytest.mark.parametrize("world_size,num_stages,micro_batches", [(2, 2, 4), (2, 2, 3), (4, 4, 8), (4, 2, 4)])
@shared_ranks(lambda world_size, num_stages, micro_batches: on_ranks(
    engine_cases.train_interleaved, world_size, num_stages, 2, 6, micro_batches, 3, None, False, "zb-v", timeout=600))
def test_zb_v_matches_deepspeed(world_size, num_stages, micro_batches, shared_results):
    """ZB-V: two chunks per rank in a V (rank r holds parts r and 2S-1-r, the
    loss on rank 0, the last rank's turn handed over in memory), backward
    split into B and W; DeepSpeed's 1F1B on the same layers. S=2 x DP=2 too."""
    results = shared_results
    for rank, (theirs, ours) in enumerate(results):
        assert_trains_like_deepspeed(rank, theirs, ours)
        kinds = {p[0] for p in ours["passes"]}
        assert kinds == {"F", "I", "W"}, ours["passes"]
        assert sorted({p.split(".")[1] for p in ours["passes"]}) == ["0", "1"], ours["passes"]
    theirs, ours = merged(results, 0), merged(results, 1)
    assert theirs.keys() == ours.keys()
    for key in theirs:
        assert torch.allclose(ours[key], theirs[key], rtol=1e-6, atol=1e-7), key


@pytest.mark.parametrize("schedule,world_size,num_stages,micro_batches", [("v-half", 2, 2, 6), ("v-min", 4, 4, 8)])
@shared_ranks(lambda schedule, world_size, num_stages, micro_batches: on_ranks(
    engine_cases.train_interleaved, world_size, num_stages, 2, 6, micro_batches, 3, None, False, schedule,
    timeout=600))
def test_v_half_and_v_min_match_deepspeed_within_their_activation_bound(schedule, world_size, num_stages,
                                                                         micro_batches, shared_results):
    """V-Half and V-Min: zb-v's V under a lower bound on the chunk
    micro-batches a rank holds between F and W; DeepSpeed's 1F1B numbers, and
    each rank's passes as they ran never hold more than the bound."""
    from deepspeed_pipe_ext._native import _C
    limit = _C.v_activation_limit(schedule, num_stages)
    assert limit < 2 * num_stages  # less than zb-v's (1F1B's first stage)
    results = shared_results
    for rank, (theirs, ours) in enumerate(results):
        assert_trains_like_deepspeed(rank, theirs, ours)
        held = peak = 0
        for p in ours["passes"]:
            held += {"F": 1, "W": -1}.get(p[0], 0)
            peak = max(peak, held)
        assert held == 0 and 2 <= peak <= limit, (peak, limit, ours["passes"])
    assert len(results) == world_size


ZB_V_MODELS = (("transformer", True), ("tied", False))  # (model, activation checkpointing)


def zb_v_model_cases():
    cases = {}
    for model, checkpointing in ZB_V_MODELS:
        both = {"seed_layers": True}
        if checkpointing:
            both.update(activation_checkpoint_interval=1, checkpointable_layers=["MaskedBlock"])
        cases[model] = on_ranks(engine_cases.train_model_both, 2, model, 2, 20, 4, {"pipeline": {"schedule": "zb-v"}},
                                both, {"virtual_stages": 2, "virtual_layout": "v"}, timeout=400)
    return cases


@shared_ranks(zb_v_model_cases)
def test_zb_v_with_tuple_activations_tied_weights_and_checkpointing(shared_results):
    """(hidden, bool mask, int positions) through the V, handed over in memory
    at the turn; a weight tied between rank 0's two chunks (the first and the
    last part); activation checkpointing inside the chunks."""
    for model, _ in ZB_V_MODELS:
        results = shared_results[model]
        weights = [{}, {}]
        for rank, (theirs, ours) in enumerate(results):
            for which, (losses, w, evals) in enumerate((theirs, ours)):
                weights[which].update(w)
            assert torch.allclose(torch.tensor(ours[0]), torch.tensor(theirs[0]), rtol=1e-6, atol=1e-7), (model, rank)
            assert abs(ours[2][0].item() - theirs[2][0].item()) <= 1e-6 * abs(theirs[2][0].item()), (model, rank)
        assert weights[0].keys() == weights[1].keys()
        for key in weights[0]:
            assert torch.allclose(weights[1][key], weights[0][key], rtol=1e-6, atol=1e-7), (model, key)


@shared_ranks(lambda: on_ranks(engine_cases.train_interleaved, 4, 4, 2, 2, 8, 3, None, True, "zb-v", timeout=400))
def test_zb_v_transfers_recorded_by_the_executor_pass_under_nccl_rules(shared_results):
    """Every transfer on one tag: the recorded operations replay under NCCL's
    rules, and no rank ever sends to itself (the turn stays in memory)."""
    from deepspeed_pipe_ext._native import _C
    results = shared_results
    ordered = [None] * 4
    for theirs, ours in results:
        assert torch.allclose(torch.tensor(ours["losses"]), torch.tensor(theirs["losses"]), rtol=1e-6, atol=1e-7)
        ordered[ours["pipe"][1]] = ours["trace"]
    for stage, trace in enumerate(ordered):
        assert trace and all(op[0] == "wait" or op[1] != stage for op in trace), stage
    for one_stream in (False, True):
        result = _C.check_nccl_order(ordered, one_stream_per_rank=one_stream)
        assert result["ok"], result["report"]


def compute_order(source):
    """The compute order for `source` and the module layout it runs on."""
    from deepspeed_pipe_ext import schedule as ours

    from ..schedule_helpers import torch_zbv_rows
    if source == "torch-zbv":
        return ours.ComputeOrder(torch_zbv_rows(2, 4), 4), "v"
    return ours.ComputeOrder.builtin("interleaved-1f1b", 4, 2, 2), "interleaved"


def compute_order_case(tmp_path, source):
    order, layout = compute_order(source)
    path = tmp_path / "order.csv"
    path.write_text(order.to_csv())
    return on_ranks(engine_cases.train_interleaved, 2, 2, 2, 4, 4, 3, None, False, str(path), layout, timeout=400)


@pytest.mark.parametrize("source", ["torch-zbv", "interleaved"])
@shared_ranks(compute_order_case)
def test_a_compute_order_over_several_chunks_runs_from_a_csv_file(source, shared_results):
    """A compute order with two chunks per rank, in a CSV file as
    `"pipeline": {"schedule": path}`: torch.distributed.pipelining's ZBV order
    on a V-layout module, and our interleaved-1f1b order exported and read
    back on an interleaved one. DeepSpeed's losses either way."""
    from deepspeed_pipe_ext._native import _C
    order, layout = compute_order(source)  # the order the case wrote to its file
    results = shared_results
    for rank, (theirs, ours_out) in enumerate(results):
        assert torch.allclose(torch.tensor(ours_out["losses"]), torch.tensor(theirs["losses"]), rtol=1e-6,
                              atol=1e-7), (rank, ours_out["losses"], theirs["losses"])
        stage = ours_out["pipe"][1]  # the passes ran in the file's order
        ran = [f"{_C.virtual_stage_of(stage, int(p.split('.')[1]), 2, layout)}{p[0]}{p[1:].split('.')[0]}"
               for p in ours_out["passes"]]
        assert ran == order.rows[stage], (ran, order.rows[stage])


def tensor_parallel_case(layout):
    from . import tensor_parallel_cases
    return on_ranks(tensor_parallel_cases.train_virtual, 4, 6, {"gradient_clipping": 0.0}, None, layout, timeout=400)


@pytest.mark.parametrize("layout", ["interleaved", "v"])
@shared_ranks(tensor_parallel_case)
def test_virtual_stages_with_tensor_parallel_split_transfers_match_deepspeed(layout, shared_results):
    """PP=2 x TP=2 with two chunks per rank (one tensor-parallel layer each on
    the middle chunks), pipe_partitioned and grad_partitioned on. Without
    gradient clipping: DeepSpeed's grid counts parameters that are not
    tensor-parallel in the clipping norm on the first stage only, so with
    clipping the numbers depend on which layers the first stage holds."""
    results = shared_results
    merged_weights = [{}, {}]
    for rank, (theirs, ours) in enumerate(results):
        assert torch.allclose(torch.tensor(ours["losses"]), torch.tensor(theirs["losses"]), rtol=1e-6, atol=1e-7), \
            (rank, ours["losses"], theirs["losses"])
        assert abs(ours["eval"] - theirs["eval"]) <= 1e-6 * abs(theirs["eval"]), rank
    tp_rank = lambda rank: rank % 2  # PipeModelDataParallelTopology: the model axis is the fastest
    for rank, (theirs, ours) in enumerate(results):
        if tp_rank(rank) == 0:  # compare one tensor-parallel rank's shards
            merged_weights[0].update(theirs["weights"])
            merged_weights[1].update(ours["weights"])
    assert merged_weights[0].keys() == merged_weights[1].keys()
    for key in merged_weights[0]:
        assert torch.allclose(merged_weights[1][key], merged_weights[0][key], rtol=1e-6, atol=1e-7), key


@pytest.mark.parametrize("world_size,num_stages,chunks", [(2, 2, 2), (4, 4, 2), (2, 2, 3)])
@shared_ranks(lambda world_size, num_stages, chunks: on_ranks(engine_cases.train_interleaved, world_size, num_stages,
                                                              chunks, 3, 4, 3, None, True, timeout=400))
def test_what_the_executor_issues_for_virtual_stages_passes_under_nccl_rules(world_size, num_stages, chunks,
                                                                             shared_results):
    """Every transfer on one tag (gloo then matches in issue order, as NCCL
    does): DeepSpeed's numbers still, and the recorded operations of train and
    eval batches replay under NCCL's rules (one in-order queue per pair)."""
    from deepspeed_pipe_ext._native import _C
    results = shared_results
    traces = {}
    for theirs, ours in results:
        assert torch.allclose(torch.tensor(ours["losses"]), torch.tensor(theirs["losses"]), rtol=1e-6, atol=1e-7)
        data, stage = ours["pipe"]
        traces.setdefault(data, {})[stage] = ours["trace"]
    for data, by_stage in traces.items():
        ordered = [by_stage[s] for s in range(num_stages)]
        assert all(len(t) > 0 for t in ordered)
        for one_stream in (False, True):
            result = _C.check_nccl_order(ordered, one_stream_per_rank=one_stream)
            assert result["ok"], result["report"]
