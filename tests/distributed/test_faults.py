"""Fault injection over real processes (S=2 and PP=2 x DP=2, gloo): when one
rank fails, every rank raises within p2p_timeout + 5 s, naming where the
failure started; nobody steps on the failed batch; later batches refuse."""
import pytest

from . import fault_cases
from .distributed import run_ranks

# victim: (stage, data-parallel rank). In PP=2 x DP=2 it is a rank of the
# second replica, so the first replica only learns through the failure board.
TOPOLOGIES = {2: 0, 4: 1}  # world size -> the victim's data-parallel rank
CALLBACKS = {  # case -> (victim's stage, what its error says, where the schedule stood)
    "load": (0, "OSError: the data source went away", "LoadMicroBatch (micro-batch 2)"),
    "exhausted": (0, "StopIteration", "LoadMicroBatch (micro-batch 3)"),
    "batch_fn": (0, "KeyError: 'no such field in the batch'", "LoadMicroBatch (micro-batch 1)"),
    "forward": (0, "ValueError: boom in forward call", "ForwardPass (micro-batch 2)"),
    "loss": (1, "ValueError: boom in loss call", "ForwardPass (micro-batch 1)"),
}


def _text(error):
    kind, message, notes = error
    return "\n".join([f"{kind}: {message}", *notes])


@pytest.mark.parametrize("world_size", sorted(TOPOLOGIES))
def test_callback_failures_stop_every_rank_at_once_and_nobody_steps(world_size):
    dp = TOPOLOGIES[world_size]
    victims = {case: (stage, dp) for case, (stage, _, _) in CALLBACKS.items()}
    # With two replicas, global rank 0 (the other replica's first stage) ends each good batch only after the
    # victim's replica ran ahead and failed in the next one: that failure must not cut rank 0's good batch short.
    hold_back = (0, 0) if world_size == 4 else None
    results = run_ranks(fault_cases.callback_failures, world_size, victims, False, hold_back, timeout=300)
    for case, (stage, says, where) in CALLBACKS.items():
        victim_rank = stage * (world_size // 2) + dp
        for rank, by_case in enumerate(results):
            result = by_case[case]
            assert result["held_back_until_told"] is (True if hold_back and rank == 0 else None), (case, rank, result)
            assert result["error"] is not None, (case, rank)
            text = _text(result["error"])
            # p2p_timeout is 30 s: a survivor that took more than 5 s waited for a timeout, not the news.
            assert result["seconds"] < 5, (case, rank, result["seconds"], text)
            assert result["weights_unchanged"], (case, rank)  # no optimizer step for a failed batch
            if result["victim"]:
                # The victim's own exception, same type, with where it stood and that the others were told.
                assert rank == victim_rank
                assert text.startswith(says.split(":")[0] + ":"), (case, text)
                assert f"raised on stage {stage} at step" in text and where in text, (case, text)
                assert "every other rank was told" in text, (case, text)
            else:
                kind, message, _ = result["error"]
                assert kind == "RemoteFailure", (case, rank, text)
                assert f"stopped because the batch failed on global rank {victim_rank} (stage {stage}" in message
                assert where in message and says in message, (case, rank, message)
                assert "No rank takes an optimizer step" in message and "load the last checkpoint" in message
            kind, message, _ = result["next"]
            assert kind == "PipelineError" and "an earlier batch failed here" in message, (case, rank, message)


def test_a_failure_in_an_earlier_batch_stops_its_ranks_though_another_replica_failed_in_a_later_one():
    """Replica 1 fails in batch 2 (global rank 1) while global rank 2, still
    in batch 1 after its step, fails before its loss broadcast: rank 0, waiting
    for that broadcast, stops within seconds naming rank 2; replica 1's ranks
    stop on rank 1's failure; every rank's next batch refuses."""
    results = run_ranks(fault_cases.failures_in_two_batches, 4, timeout=240)
    first, second = ([r[b]["error"] for r in results] for b in (0, 1))
    assert first[1] is None and first[3] is None, first  # replica 1's first batch succeeded
    assert first[2][0] == "ValueError" and "the other failure arrived: True" in first[2][1], first[2]
    assert "every other rank was told" in _text(first[2]), first[2]
    assert first[0][0] == "RemoteFailure" and "failed on global rank 2 (stage 1" in first[0][1], first[0]
    # Rank 2 failed after the batch's barrier: every rank may have stepped, and the message must not say otherwise.
    assert "some ranks may have taken their optimizer step" in first[0][1], first[0]
    assert "No rank takes an optimizer step" not in first[0][1], first[0]
    # p2p_timeout is 30 s: rank 0 heard of rank 2's failure, rather than timing out on its broadcast.
    assert results[0][0]["ended_at"] - results[2][0]["ended_at"] < 5, (results[0][0], results[2][0])
    assert second[1][0] == "ValueError" and "boom in forward call" in second[1][1], second[1]
    # Rank 3 holds whichever failure reached it first: rank 1's (its own pipeline's), or rank 2's if its push
    # overtook rank 1's to rank 3's inbox.
    assert second[3][0] == "RemoteFailure" and any(f"failed on global rank {r} (stage" in second[3][1]
                                                   for r in (1, 2)), second[3]
    for rank in (0, 2):
        assert second[rank][0] == "PipelineError" and "an earlier batch failed here" in second[rank][1], second[rank]


def test_callback_failures_under_zb_v_stop_every_rank_at_once_and_nobody_steps():
    """Two chunks per rank in a V with dynamic shapes (receives that take
    their meta first, the turn of the V in memory): a failure on either rank
    stops the other within seconds, nobody steps, the next batch refuses."""
    cases = {"forward": (1, "ValueError: boom in forward call"), "loss": (0, "ValueError: boom in loss call"),
             "load": (0, "OSError: the data source went away")}
    results = run_ranks(fault_cases.callback_failures, 2, {c: (stage, 0) for c, (stage, _) in cases.items()}, True,
                        timeout=300)
    for case, (stage, says) in cases.items():
        for rank, by_case in enumerate(results):
            result = by_case[case]
            text = _text(result["error"])
            assert result["seconds"] < 5, (case, rank, result["seconds"], text)
            assert result["weights_unchanged"], (case, rank)
            if rank == stage:
                assert text.startswith(says.split(":")[0] + ":") and "every other rank was told" in text, (case, text)
            else:
                assert result["error"][0] == "RemoteFailure" and says in text, (case, rank, text)
            kind, message, _ = result["next"]
            assert kind == "PipelineError" and "an earlier batch failed here" in message, (case, rank, message)


@pytest.mark.parametrize("world_size", sorted(TOPOLOGIES))
def test_a_rank_that_stops_or_stalls_fails_every_other_rank_within_the_timeout(world_size):
    timeout = 3
    victim = (1, TOPOLOGIES[world_size])  # a last stage: it holds the loss broadcast
    results = run_ranks(fault_cases.stops_and_stalls, world_size, victim, timeout, timeout=300)
    for case in ("stops", "stalls"):
        for rank, by_case in enumerate(results):
            result = by_case[case]
            if case == "stops" and result["victim"]:
                continue
            assert result["error"] is not None, (case, rank)
            assert result["seconds"] < timeout + 5 + (timeout + 3 if result["victim"] else 0), (case, rank, result)
            text = _text(result["error"])
            if result["victim"]:  # after its stall it learns what the others saw
                assert result["error"][0] == "RemoteFailure", text
            else:
                assert any(s in text for s in (f"within p2p_timeout ({timeout} s)", f"(timeout {timeout} s)",
                                               "stopped because the batch failed on")), (case, rank, text)


@pytest.mark.parametrize("world_size,victim", [(2, (0, 0)), (2, (1, 0)), (4, (0, 0)), (4, (1, 1))])
def test_a_killed_rank_fails_every_survivor_within_the_timeout(world_size, victim, tmp_path):
    timeout = 5
    victim_rank = victim[0] * (world_size // 2) + victim[1]
    seed = world_size * 10 + victim_rank
    results = run_ranks(fault_cases.killed, world_size, victim, timeout, seed, str(tmp_path / "killed_at"),
                        allow_exit={victim_rank}, timeout=240)
    for rank, result in enumerate(results):
        if rank == victim_rank:
            continue
        assert result["error"] is not None, rank
        text = _text(result["error"])
        assert result["seconds"] < timeout + 5, (rank, result["seconds"], text)
        # Killing global rank 0 also takes the rendezvous store it hosts.
        assert any(s in text for s in ("closed the connection", "Connection closed by peer", "Connection reset",
                                       "rendezvous store", "stopped because the batch failed on")), (rank, text)


def test_a_stage_without_data_stops_every_rank_at_once():
    """Three stages; the first is given no data iterator: it says so, and the
    middle and last stages, already waiting for its activations, stop at once
    instead of after p2p_timeout (30 s)."""
    results = run_ranks(fault_cases.missing_data, 3, timeout=120)
    assert "stage 0 needs data: pass data_iter" in results[0]["error"][1], results[0]
    for rank in (1, 2):
        name, message, _ = results[rank]["error"]
        assert name == "RemoteFailure" and "stage 0 needs data" in message, results[rank]
    assert max(r["seconds"] for r in results) < 5, [r["seconds"] for r in results]


def test_a_rank_that_fails_before_its_peers_are_ready_stops_them_without_a_hang(tmp_path):
    """Stage 0 fails its first batch and exits; stage 1 was still building its
    layers. Engine construction ends with an agreement among the ranks, so
    stage 0 could not start before stage 1 could hear its failure: stage 1
    stops at once, naming stage 0, instead of waiting out the store's 30 minutes."""
    timeout = 20
    (_, result) = run_ranks(fault_cases.fails_before_peers_are_ready, 2, str(tmp_path / "stage0_failed"), timeout,
                            allow_exit={0}, timeout=120)
    name, message, _ = result["error"]
    assert name == "RemoteFailure" and "failed on global rank 0 (stage 0)" in message, result
    assert "boom in forward call 1" in message, result
    assert result["seconds"] < timeout, result


@pytest.mark.parametrize("gone", [1, 0])
def test_engine_construction_with_a_rank_that_is_gone_fails_within_the_timeout(gone):
    """The other rank's engine construction ends at a barrier on the store:
    with its peer gone it fails within p2p_timeout (its connection to the store
    too, when the peer was global rank 0, which hosts the store), naming what
    is missing, instead of waiting out the store's 30 minutes."""
    timeout = 4
    survivor = 1 - gone
    result = run_ranks(fault_cases.gone_before_building, 2, gone, timeout, allow_exit={gone}, timeout=120)[survivor]
    assert result["error"] is not None, result
    name, message, _ = result["error"]
    expected = ("only 1 of the 2 ranks finished building" if gone == 1 else "rendezvous store")
    assert name == "PipelineError" and expected in message, result
    assert result["seconds"] < 3 * timeout, result
