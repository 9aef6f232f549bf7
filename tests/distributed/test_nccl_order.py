"""What the real executor issued, recorded in multi-process runs over gloo with
every transfer on one tag (gloo then matches in issue order, as NCCL does):
DeepSpeed's numbers still, and every rank's trace replays under NCCL's rules
in the checker (csrc/core/comm_order; the checker itself:
tests/unit/test_nccl_order.py)."""
from deepspeed_pipe_ext import _C

from . import nccl_order_cases
from .distributed import run_ranks
from .test_engine import assert_close

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
