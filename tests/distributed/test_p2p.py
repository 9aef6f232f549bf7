"""C++ point-to-point transfers over c10d (gloo): tuples, dtypes, meta
caching, shape changes and timeouts. The transfers that complete share one
process group (distributed.py `shared_ranks`); the timeout and the abort
start their own ranks."""
from . import p2p_cases
from .distributed import on_ranks, run_ranks, shared_ranks


@shared_ranks(lambda: on_ranks(p2p_cases.transfer_tuples, 2))
def test_tuples_keep_dtypes_and_values(shared_results):
    assert all(shared_results)


@shared_ranks(lambda: on_ranks(p2p_cases.shape_change_is_refused, 2))
def test_shape_change(shared_results):
    (error, _), (_, shapes) = shared_results
    assert "activation changed from (Float[2, 3]) to (Float[2, 4])" in error
    assert "dynamic_shape=True" in error
    assert shapes == [(3, 2), (5, 2), (2, 2)]


def test_missing_send_times_out_with_a_clear_error():
    _, (message, waited) = run_ranks(p2p_cases.timeout_names_the_peer, 2)
    assert "stage 1: receiving RecvActivation(micro-batch 0) (meta) from rank 0 failed" in message
    assert waited < 30


@shared_ranks(lambda: on_ranks(p2p_cases.posted_receives_and_sends_in_flight, 2))
def test_posted_receives_own_their_buffers_and_one_send_per_channel_is_in_flight(shared_results):
    sender, receiver = shared_results
    assert sender["pending"] <= 3 and sender["pending_after_wait"] == 0
    assert receiver["posted_before_meta"] is False
    assert receiver["posted"] == [True] * 5
    assert receiver["values"] == [([float(s)] * 3, s) for s in range(6)]
    assert receiver["distinct_storages"] == 5


def test_abort_from_another_thread_ends_the_wait_in_progress_and_every_later_one():
    (messages, waited), _ = run_ranks(p2p_cases.abort_wakes_a_blocked_receive, 2)
    assert messages[0] == ("stage 0: stopped receiving RecvActivation(micro-batch 0) (meta) from stage 1: "
                           "global rank 1 failed: ValueError: boom"), messages[0]
    assert messages[1].startswith("stage 0: stopped receiving RecvActivation(micro-batch 1)"), messages[1]
    assert waited < 10  # the receive's own timeout is 30 s


def test_an_abort_keeps_every_transfer_not_yet_waited_for_owned():
    """An abort during a posted tuple receive, and during pending sends on two
    channels: the data that arrives later lands in buffers still owned (no
    crash, no message in the wrong buffer), plain and staged through host."""
    sender, receiver = run_ranks(p2p_cases.aborts_leave_no_transfer_unowned, 2)
    for staged in (False, True):
        tuple_case = receiver[("tuple receive", staged)]
        assert tuple_case["posted"] is True
        assert tuple_case["error"][0] == "P2PAborted", tuple_case
        assert "stopped receiving activation 1 from stage 0: global rank 0 failed" in tuple_case["error"][1]
        assert tuple_case["send_after_abort"][0] == "P2PAborted", tuple_case
        assert "stopped sending gradient 0 (meta) to stage 0" in tuple_case["send_after_abort"][1]
        assert tuple_case["pending_after_abort"] == 0
        assert sender[("tuple receive", staged)]["late_send_completed"]
        for waits_in in ("wait_sends", "a second send"):
            sent, received = sender[(waits_in, staged)], receiver[(waits_in, staged)]
            assert sent["pending"] == 5  # meta + 2 tensors, meta + 1 tensor
            first_waited = "gradient 0 (meta)" if waits_in == "wait_sends" else "activation 0 (meta)"
            assert sent["error"][0] == "P2PAborted", sent
            assert f"stopped sending {first_waited} to stage 1: global rank 1 failed" in sent["error"][1], sent
            assert sent["pending_after_abort"] == 4  # all but the one whose wait was aborted
            assert (received["first"], received["second"]) == received["expected"], received
