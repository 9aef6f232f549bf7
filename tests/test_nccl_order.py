"""Transfers under NCCL's rules: between two ranks, operations run in issue
order whatever their tag, and a send completes only with its receive.

The checker (csrc/core/comm_order) replays every rank's trace under those
rules. It confirms the hazard of the executor's old order, proves the order
the executor now plans, and checks what the real executor issued in
multi-process runs over gloo with every transfer on one tag."""
import pytest

import nccl_order_cases
from deepspeed_pipe_ext import _C
from distributed import run_ranks
from test_engine import assert_close


def test_posting_receives_ahead_of_sends_to_the_same_peer_hangs_on_nccl():
    # The executor's order before: stage 0 holds "receive gradient 0, then send
    # activation 1", stage 1 "receive activation 1, then send gradient 0".
    result = _C.check_schedule_transfers("1f1b", 4, 2, order="channel-free")
    assert not result["ok"]
    report = result["report"]
    assert "deadlock" in report and "rank 0: blocked" in report and "rank 1: blocked" in report
    assert "RecvGrad (micro-batch 0)" in report and "RecvActivation (micro-batch 1)" in report


def test_program_order_is_not_enough_for_zero_bubble():
    # zb-h1 lowers each pass with its sends right after it: both stages of a pair can send first.
    result = _C.check_schedule_transfers("zb-h1", 4, 2, order="program")
    assert not result["ok"] and "send to rank" in result["report"]
    assert _C.check_schedule_transfers("1f1b", 8, 4, order="program")["ok"]


@pytest.mark.parametrize("kind", ["1f1b", "gpipe", "zb-h1", "inference"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_every_runtime_schedule_passes_in_the_executors_order(kind, dynamic):
    # The full sweep (S <= 16, M <= 64) runs in the C++ core tests; a sample here through the bindings.
    for stages, micro_batches in [(2, 1), (2, 7), (3, 3), (4, 8), (8, 5), (16, 64)]:
        for one_stream in (False, True):
            result = _C.check_schedule_transfers(kind, micro_batches, stages, dynamic_shapes=dynamic,
                                                 one_stream_per_rank=one_stream)
            assert result["ok"], result["report"]
            assert result["operations"] > 0


def test_checker_reports_size_mismatches_and_unmatched_operations():
    sizes = _C.check_nccl_order([[("send", 1, 2048, "meta"), ("wait", 0, -1, "")],
                                 [("recv", 0, 64, "data"), ("wait", 0, -1, "")]])
    assert not sizes["ok"] and "different sizes" in sizes["report"] and "[meta]" in sizes["report"]
    lonely = _C.check_nccl_order([[("send", 1, -1, "lonely")], []])
    assert not lonely["ok"] and "never matched" in lonely["report"]
    with pytest.raises(ValueError, match="'send', 'recv' or 'wait'"):
        _C.check_nccl_order([[("bcast", 1, -1, "")]])


CASES = [("1f1b", "mlp", False), ("gpipe", "mlp", False), ("zb-h1", "mlp", False), ("1f1b", "transformer", True),
         ("zb-h1", "transformer", True)]


def _check_recorded(results, num_stages, cases, stream_models=(False, True)):
    """`stream_models`: per pair of ranks one queue (False), and all of a rank's operations on one (True)."""
    by_case = []
    for index, (schedule, model, dynamic) in enumerate(cases):
        pipes = {}
        for r in results:
            case = r["cases"][index]
            # Matching in issue order on one tag changes nothing: DeepSpeed's losses.
            assert_close(case["losses"], case["theirs"][0], f"{schedule}/{model} losses")
            assert_close(case["eval"], case["theirs"][1], f"{schedule}/{model} eval")
            pipes.setdefault(r["data"], {})[r["stage"]] = case["trace"]
        for data, traces in pipes.items():
            ordered = [traces[s] for s in range(num_stages)]
            assert all(len(t) > 0 for t in ordered)
            for one_stream in stream_models:
                result = _C.check_nccl_order(ordered, one_stream_per_rank=one_stream)
                assert result["ok"], f"{schedule}/{model} pipe {data}: {result['report']}"
                assert result["operations"] == sum(sum(1 for e in t if e[0] != "wait") for t in ordered)
        by_case.append(results[0]["cases"][index])
    return by_case


def test_what_the_executor_issued_passes_under_nccl_rules():
    results = run_ranks(nccl_order_cases.recorded_traces, 2, 2, CASES, timeout=400)
    cases = _check_recorded(results, 2, CASES)
    # With dynamic shapes zb-h1's stage 1 takes activations ahead of its gradient sends, each after its meta.
    stage1 = next(r for r in results if r["stage"] == 1)["cases"]
    assert stage1[CASES.index(("zb-h1", "transformer", True))]["after_meta"] > 0
    # With fixed shapes receives are still posted ahead of compute.
    assert cases[CASES.index(("1f1b", "mlp", False))]["posted"] > 0


VIRTUAL_CASES = [("interleaved-1f1b", "transformer", True), ("zb-v", "transformer", True), ("zb-v", "mlp", False)]


def test_virtual_stages_with_dynamic_shapes_match_deepspeed_and_pass_under_nccl_rules():
    """Two chunks per rank with dynamic shapes (sequence lengths change from
    micro-batch to micro-batch): receives that must go first take their meta
    first, and what was issued replays under NCCL's rules; at three stages
    too, where holding sends back used to deadlock interleaved programs
    (there with one queue per pair of ranks, as ProcessGroupNCCL runs
    point-to-point operations: with all of a rank's operations on one stream
    the blocking meta receives of the ring of three deadlock)."""
    results = run_ranks(nccl_order_cases.recorded_traces, 2, 2, VIRTUAL_CASES, timeout=400)
    _check_recorded(results, 2, VIRTUAL_CASES)
    assert any(case["after_meta"] > 0 for r in results for case in r["cases"])
    three = [("interleaved-1f1b", "mlp", True), ("zb-v", "mlp", True)]
    _check_recorded(run_ranks(nccl_order_cases.recorded_traces, 3, 3, three, timeout=400), 3, three, (False, ))


def test_what_the_executor_issued_passes_under_nccl_rules_with_data_parallelism():
    _check_recorded(run_ranks(nccl_order_cases.recorded_traces, 4, 2, CASES[:3], timeout=400), 2, CASES[:3])


def test_what_the_executor_issued_passes_under_nccl_rules_with_four_stages():
    # Middle stages talk to two peers: also checked with all of a rank's transfers on one stream.
    _check_recorded(run_ranks(nccl_order_cases.recorded_traces, 4, 4, CASES, timeout=400), 4, CASES)
