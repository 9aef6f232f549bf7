"""Run on two ranks by test_p2p.py."""
import time

import torch
import torch.distributed as dist

from deepspeed_pipe_ext import _C


def _tuple(step):
    hidden = torch.randn(2, 3, generator=torch.Generator().manual_seed(step)) + step
    mask = torch.tensor([[True, False, True]]) if step % 2 else torch.tensor([[False, True, True]])
    positions = torch.arange(3, dtype=torch.int64) * (step + 1)
    half = torch.full((2, ), step, dtype=torch.float16)
    return [hidden.requires_grad_(), mask, positions, half]


def transfer_tuples(rank, world_size):
    """Tuples of float/bool/int64/float16 tensors arrive intact with their
    dtypes, repeatedly on one channel (meta sent once) and on two channels."""
    p2p = _C.P2P(dist.group.WORLD, 30.0, f"stage {rank}")
    received = []
    for step in range(5):
        if rank == 0:
            p2p.send(_tuple(step), 1, 0, "activation")
            p2p.send(torch.full((4, ), float(step)), 1, 1, "second channel")
        else:
            got = p2p.recv(0, 0, "activation")
            assert isinstance(got, tuple)
            received.append([(t.dtype, t.clone()) for t in got])
            other = p2p.recv(0, 1, "second channel")
            assert torch.is_tensor(other), "a single tensor arrives as a tensor, not a tuple"
            assert torch.equal(other, torch.full((4, ), float(step)))
    p2p.wait_sends()
    if rank == 1:
        for step, got in enumerate(received):
            expected = _tuple(step)
            assert [d for d, _ in got] == [t.dtype for t in expected]
            for (_, t), e in zip(got, expected):
                assert torch.equal(t, e.detach())
    return True


def shape_change_is_refused(rank, world_size):
    """Without dynamic shapes a changed activation shape is an error naming both
    shapes; with dynamic shapes it goes through."""
    p2p = _C.P2P(dist.group.WORLD, 30.0, f"stage {rank}")
    error = None
    if rank == 0:
        p2p.send(torch.zeros(2, 3), 1, 0, "activation")
        try:
            p2p.send(torch.zeros(2, 4), 1, 0, "activation")
        except RuntimeError as err:
            error = str(err)
    else:
        p2p.recv(0, 0, "activation")
    p2p.wait_sends()
    dynamic = _C.P2P(dist.group.WORLD, 30.0, f"stage {rank}", dynamic_shapes=True)
    shapes = []
    for n in (3, 5, 2):
        if rank == 0:
            dynamic.send(torch.ones(n, 2, dtype=torch.bool), 1, 7, "activation")
        else:
            shapes.append(tuple(dynamic.recv(0, 7, "activation").shape))
    dynamic.wait_sends()
    return error, shapes


def timeout_names_the_peer(rank, world_size):
    """Rank 1 waits for an activation rank 0 never sends: a clear error within
    the timeout, not a hang."""
    if rank == 0:
        time.sleep(4)  # stay alive past rank 1's timeout
        return None
    p2p = _C.P2P(dist.group.WORLD, 1.5, "stage 1")
    start = time.monotonic()
    try:
        p2p.recv(0, 0, "RecvActivation(micro-batch 0)")
    except RuntimeError as err:
        return str(err), time.monotonic() - start
    return "no error", time.monotonic() - start


def posted_receives_and_sends_in_flight(rank, world_size):
    """A posted receive lands in tensors of its own (they stay valid after the
    next receive); before the channel's meta is known nothing is posted; several
    receives posted on one channel are consumed in the order posted; at most one
    send is in flight per channel, however many are sent."""
    p2p = _C.P2P(dist.group.WORLD, 30.0, f"stage {rank}")
    out = {}
    if rank == 0:
        for step in range(6):
            p2p.send((torch.full((3, ), float(step)), torch.tensor([step])), 1, 0, "activation")
            p2p.send(torch.full((2, ), -float(step)), 1, 1, "other channel")
        # The latest send on each channel (2 + 1 tensors) may still be in flight, no more.
        out["pending"] = p2p.pending_sends
        p2p.wait_sends()
        out["pending_after_wait"] = p2p.pending_sends
    else:
        out["posted_before_meta"] = p2p.post_recv(0, 0)
        kept = [p2p.recv(0, 0, "activation")]
        p2p.recv(0, 1, "other channel")
        out["posted"] = [p2p.post_recv(0, 0), p2p.post_recv(0, 0)]  # two ahead on one channel
        for step in range(5):
            kept.append(p2p.recv(0, 0, "activation"))
            p2p.recv(0, 1, "other channel")
            if step < 3:
                out["posted"].append(p2p.post_recv(0, 0))
        out["values"] = [(t[0].tolist(), t[1].item()) for t in kept]
        out["distinct_storages"] = len({t[0].data_ptr() for t in kept[1:]})
    dist.barrier()
    return out


def abort_wakes_a_blocked_receive(rank, world_size):
    """Rank 0 waits for a transfer rank 1 never sends; another thread aborts
    it: the wait ends at once with the reason, and so does every later one."""
    import threading
    p2p = _C.P2P(dist.group.WORLD, 30.0, f"stage {rank}", peer_label="stage")
    if rank == 1:
        dist.barrier()  # after rank 0 is done
        return None
    threading.Timer(0.3, p2p.abort, args=("global rank 1 failed: ValueError: boom", )).start()
    start = time.monotonic()
    messages = []
    for what in ("RecvActivation(micro-batch 0)", "RecvActivation(micro-batch 1)"):
        try:
            p2p.recv(1, 0, what)
            messages.append("no error")
        except RuntimeError as err:
            messages.append(str(err))
    waited = time.monotonic() - start
    dist.barrier()
    return messages, waited


def _p2p(rank, staged):
    return _C.P2P(dist.group.WORLD, 30.0, f"stage {rank}", peer_label="stage", stage_through_host=staged)


def abort_during_a_posted_tuple_receive(rank, staged, tag):
    """Rank 1 posts a tuple receive ahead, and is aborted while waiting for
    its first tensor; rank 0 then sends that tuple after all. Its later
    tensors land in buffers the aborted receive still owns: rank 1 must
    neither crash (gloo aborts the process when a message arrives for a
    buffer that is gone) nor hand them to anyone. With `staged`, CPU tensors
    take the path CUDA tensors take over gloo."""
    import threading
    p2p = _p2p(rank, staged)
    value = (torch.randn(2, 3), torch.tensor([1, 2]), torch.ones(4, dtype=torch.float16))
    out = {}
    if rank == 0:
        p2p.send(value, 1, tag, "activation 0")
        p2p.wait_sends()
        dist.barrier()  # rank 1 was aborted
        p2p.send(value, 1, tag, "activation 1")  # arrives in the aborted receive's buffers
        p2p.wait_sends()
        out["late_send_completed"] = True
    else:
        first = p2p.recv(0, tag, "activation 0")
        out["first"] = [t.tolist() for t in first]
        out["posted"] = p2p.post_recv(0, tag)
        threading.Timer(0.3, p2p.abort, args=("global rank 0 failed: ValueError: boom", )).start()
        try:
            p2p.recv(0, tag, "activation 1")
            out["error"] = None
        except RuntimeError as err:
            out["error"] = (type(err).__name__, str(err))
        try:  # nothing new goes out after an abort
            p2p.send(value, 0, tag + 1, "gradient 0")
            out["send_after_abort"] = None
        except RuntimeError as err:
            out["send_after_abort"] = (type(err).__name__, str(err))
        out["pending_after_abort"] = p2p.pending_sends
        dist.barrier()
    dist.barrier()  # after the late send has landed
    del p2p  # the aborted receive's buffers must outlive it
    dist.barrier()
    return out


def abort_during_pending_sends_on_two_channels(rank, staged, waits_in, tag):
    """Rank 0 sends on two channels; nobody receives yet, so the sends stay
    pending, and rank 0 is aborted while it waits for the first of them (in
    wait_sends, or in a second send on the first channel, which waits for the
    channel's previous one). Every send not yet waited for must stay owned:
    once rank 1 receives, the data of both channels arrives intact, and
    neither rank crashes."""
    import threading
    p2p = _p2p(rank, staged)
    first = (torch.arange(6, dtype=torch.float32).reshape(2, 3), torch.tensor([7, 8]))
    second = torch.full((5, ), 3.5)
    out = {}
    if rank == 0:
        # The second channel first: a wait on the first channel then has the second's sends behind it and before.
        p2p.send(second, 1, tag + 1, "gradient 0")
        p2p.send(first, 1, tag, "activation 0")
        out["pending"] = p2p.pending_sends
        threading.Timer(0.3, p2p.abort, args=("global rank 1 failed: ValueError: boom", )).start()
        try:
            if waits_in == "wait_sends":
                p2p.wait_sends()
            else:
                p2p.send(first, 1, tag, "activation 1")
            out["error"] = None
        except RuntimeError as err:
            out["error"] = (type(err).__name__, str(err))
        out["pending_after_abort"] = p2p.pending_sends
        dist.barrier()  # now rank 1 receives what rank 0 sent before the abort
        dist.barrier()
    else:
        dist.barrier()
        got_first = p2p.recv(0, tag, "activation 0")
        got_second = p2p.recv(0, tag + 1, "gradient 0")
        out["first"] = [t.tolist() for t in got_first]
        out["second"] = got_second.tolist()
        out["expected"] = ([t.tolist() for t in first], second.tolist())
        dist.barrier()
    del p2p
    dist.barrier()
    return out


def aborts_leave_no_transfer_unowned(rank, world_size):
    """Every abort case, plain and host-staged, each on channels of its own
    (a transfer that outlives its case must not land in the next one's)."""
    out = {}
    tag = 0
    for staged in (False, True):
        out[("tuple receive", staged)] = abort_during_a_posted_tuple_receive(rank, staged, tag)
        for waits_in in ("wait_sends", "a second send"):
            tag += 2
            out[(waits_in, staged)] = abort_during_pending_sends_on_two_channels(rank, staged, waits_in, tag)
        tag += 2
    return out
