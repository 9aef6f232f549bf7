"""Transfers under NCCL's rules: between two ranks, operations run in issue
order whatever their tag, and a send completes only with its receive.

The checker (csrc/core/comm_order) replays every rank's trace under those
rules. Through the bindings, in one process: it confirms the hazard of the
executor's old order and proves the order the executor now plans. (What the
real executor issued: tests/distributed/test_nccl_order.py.)"""
import pytest

from deepspeed_pipe_ext import _C


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
