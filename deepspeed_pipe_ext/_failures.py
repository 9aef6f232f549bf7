"""When a batch fails on one rank, every rank of the engine stops within
milliseconds, says where the failure started, and no rank takes an optimizer
step for that batch.

Everything goes through the rendezvous store all processes of the job
already share (c10d's Store; with torchrun or deepspeed's launcher a TCPStore
hosted by global rank 0), over connections of the engine's own:

- Each rank has an inbox (a store queue). A watcher thread per engine blocks
  on it; when a failure arrives it stops this rank's transfers (P2P.abort)
  and wakes the collectives this rank is waiting for. A failure in a later
  batch than the one this rank is finishing (a peer of another data-parallel
  replica ran ahead) waits for this rank's next batch to start, and raises
  there: the failing rank finished this rank's batch (its sends and
  collectives), so nothing this rank still waits for depends on it.
- The rank where a batch fails posts a description of the failure to every
  inbox, and under a key the others read when their own error is only a
  consequence (a closed connection, a timeout); it raises once every other
  watcher holds the description (at most a few seconds), since its process
  may exit, with the store, right after.
- Engine construction ends at a barrier on the store: no rank starts a batch
  before every rank's watcher can hear its failure.
- Before the gradient reductions and the optimizer step, every rank checks in
  at a barrier on the store. It opens when all have checked in (the forward
  and backward passes succeeded everywhere), or when a failure is posted:
  then no rank steps.
"""
import contextlib
import datetime
import itertools
import threading

import torch.distributed as dist
from deepspeed.runtime.pipe.module import PipelineError

from . import _deepspeed_compat
from ._native import _C

# Engines are built collectively, in the same order on every rank, so the
# n-th engine of every process shares the key prefix n.
_engine_numbers = itertools.count()
_STOP = b"\0stop"
_OK = b"ok"
_FOREVER = datetime.timedelta(days=3650)
_DELIVERY_S = 5.0  # how long a failing rank waits for the others to hold its failure
# What torch's gloo collectives say (as a plain RuntimeError) when a peer died or never came: the one
# place text is read, because torch gives these no type of their own. Our own errors have types:
# _C.P2PError (P2PTimeout, P2PAborted, PeerClosed) and CollectiveFailed below.
_GLOO_TIMEOUT = ("Timed out", "timed out")
_GLOO_PEER_CLOSED = ("Connection closed by peer", "Connection reset")
_RECOVERY = ("Rebuild the engine with deepspeed.initialize and load the last checkpoint (engine.load_checkpoint) "
             "to continue")


class RemoteFailure(PipelineError):
    """Raised on a rank that stopped because a batch failed on another rank."""


class CollectiveFailed(PipelineError):
    """A collective of the batch (DeepSpeed's or ours) failed on a group of
    this pipeline: a peer stopped answering. `what` names it, `ranks` the
    global ranks of its groups."""

    def __init__(self, message, what="", ranks=""):
        super().__init__(message)
        self.what, self.ranks = what, ranks


class CollectiveTimeout(CollectiveFailed):
    """It did not complete within p2p_timeout."""


class CollectivePeerClosed(CollectiveFailed):
    """A peer of its group closed the connection (its process probably died)."""


def _gloo_says(err, phrases):
    return isinstance(err, RuntimeError) and any(p in str(err) for p in phrases)


class FailureBoard:
    """One engine's view of failures on any rank of the job.

    `name` prefixes errors ("stage 1 (global rank 3)"); `timeout_s` bounds the
    waits (the engine's p2p_timeout)."""

    def __init__(self, name, timeout_s, store=None):
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.name = name
        self.timeout_s = timeout_s
        self.remote = None  # the failure another rank posted, once the watcher has it
        # Batches (train and eval) counted from 1 in the same order on every rank: the one this rank runs now,
        # and the one the posted failure stopped. A failure from a later batch than this rank's does not cut
        # this rank's batch short (its failing rank finished this one); this rank's next batch raises at its start.
        self._batch = 0
        self._remote_batch = None
        self._prefix = f"deepspeed_pipe_ext/engine{next(_engine_numbers)}"
        shared = store if store is not None else _deepspeed_compat.default_store()
        # Connections of our own: a timed-out wait never disturbs the store
        # torch uses (new_group), and the watcher's blocking pop never holds
        # up the batch's barrier. Connecting waits at most the timeout: the
        # store's host may already have died.
        self._store, watch_store = _bounded_clones(shared, 2, timeout_s, name)
        watch_store.set_timeout(_FOREVER)
        self._lock = threading.Lock()
        self._listeners = []
        self._wakers = set()
        self._closed = False
        self._thread = threading.Thread(target=_watch, args=(self, watch_store, self._key(f"inbox/{self.rank}")),
                                        name=f"deepspeed_pipe_ext failure watcher ({name})", daemon=True)
        self._thread.start()

    def _key(self, name):
        return f"{self._prefix}/{name}"

    def on_failure(self, listener):
        """Calls listener(description) when another rank's failure in the
        batch this rank runs (or an earlier one) arrives."""
        with self._lock:
            self._listeners.append(listener)

    def _deliver(self, description, batch):
        with self._lock:
            if self.remote is not None:
                # The first failure stands, unless it waits for this rank's next batch and this one is from an
                # earlier batch: a rank still finishing that batch failed on its own, and this rank may wait for it.
                waiting_for_next = self._remote_batch > self._batch
                if not (waiting_for_next and batch < self._remote_batch):
                    return
            self.remote, self._remote_batch = description, batch
            if batch > self._batch:  # this rank is still finishing an earlier batch: begin_batch raises it
                return
            listeners, wakers = list(self._listeners), list(self._wakers)
        for listener in listeners:
            listener(description)
        for waker in wakers:
            waker.set()

    # ------------------------------------------------------------------ the failing rank
    def announce(self, description, batch, wait_for_delivery=True):
        """Posts this rank's failure to every rank; `batch` counts train
        batches (it names the barrier to open as failed), while the message
        names the batch among train and eval batches (begin_batch's count).
        With wait_for_delivery, returns once every other rank's watcher holds
        it (at most a few seconds). Best effort: with the store gone (its host
        died) peers learn through their own connections. Returns whether
        ours was posted: it was the first, or the first came from a later batch."""
        value = description.encode()
        message = b"%d|%s" % (self._batch, value)  # the batch that failed, then what went wrong
        try:
            first = self._store.compare_set(self._key("failure"), "", message)
            if first != message and _parse(first)[0] <= self._batch:
                return False  # another rank's failure in this batch (or before) came first: it is the cause
            # (One from a later batch stops only the ranks already in it; those still in ours need ours.)
            for go in (batch, batch + 1):  # opens the barrier of this batch (and the next) as failed
                self._store.compare_set(self._key(f"go/{go}"), "", value)
            for rank in range(self.world_size):
                if rank != self.rank:
                    self._store.queue_push(self._key(f"inbox/{rank}"), message)
        except Exception:
            return False
        # This process may exit as soon as it raises, taking the store with it when it is global rank 0: wait
        # (briefly) until every other rank's watcher holds the description, so that none is left with only a
        # closed connection to explain its stop.
        if not wait_for_delivery:
            return True
        try:
            self._store.wait([self._key(f"delivered/{self._batch}")],
                             datetime.timedelta(seconds=min(self.timeout_s, _DELIVERY_S)))
        except Exception:
            pass  # a peer that died or closed its engine: the others still stop through their own connections
        return True

    def posted(self):
        """The failure posted by another rank, if any (asks the store: the
        watcher may not have it yet); None when there is none or no store."""
        if self.remote is not None:
            return self.remote
        try:
            key = self._key("failure")
            if self._store.check([key]):
                return _parse(self._store.get(key))[1]
        except Exception:
            pass
        return None

    @staticmethod
    def is_consequence(err):
        """`err` says only that a peer stopped answering (an aborted transfer,
        a closed connection, a timeout), not what went wrong first."""
        return isinstance(err, (_C.P2PError, CollectiveFailed)) or _gloo_says(err, _GLOO_TIMEOUT + _GLOO_PEER_CLOSED)

    def cause_of(self, err):
        """The failure another rank posted, when `err` is only its consequence
        here; else None."""
        return self.posted() if self.is_consequence(err) else None

    def error(self, description):
        """The error a rank raises because of another rank's failure
        (`description`: where it failed, and whether ranks may have stepped)."""
        return RemoteFailure(f"{self.name}: stopped because the batch failed on {description} {_RECOVERY}")

    def begin_batch(self):
        """This rank starts its next batch (train or eval); raises when
        another rank's failure arrived since this rank's last batch."""
        with self._lock:
            self._batch += 1
            remote = self.remote
        if remote is not None:
            raise self.error(remote)

    def _failure_of_this_batch(self):
        """The posted failure, when it stops the batch this rank runs now."""
        with self._lock:
            return self.remote if self.remote is not None and self._remote_batch <= self._batch else None

    # ------------------------------------------------------------------ every rank
    def _barrier(self, name, on_open=None):
        """Checks this rank in at barrier `name` and waits (at most the
        timeout) until every rank has, or a failure opened it: the verdict.
        The last rank to arrive opens it, then calls on_open()."""
        store, go_key = self._store, self._key(f"go/{name}")
        if store.add(self._key(f"arrived/{name}"), 1) == self.world_size:
            verdict = store.compare_set(go_key, "", _OK)
            if on_open is not None:
                on_open()
            return verdict
        store.wait([go_key], datetime.timedelta(seconds=self.timeout_s))
        return store.get(go_key)

    def _forget_barrier(self, batch):
        """Every rank is past the barrier of train batch `batch`: its keys can go."""
        if batch >= 1:
            self._store.delete_key(self._key(f"arrived/{batch}"))
            self._store.delete_key(self._key(f"go/{batch}"))

    def _arrived(self, name):
        """How many ranks checked in at barrier `name`; None when the store is gone."""
        try:
            return self._store.add(self._key(f"arrived/{name}"), 0)
        except Exception:
            return None

    def agree_built(self):
        """The end of the engine's construction: returns when every rank has
        built its engine (and can hear a failure), so that no rank starts a
        batch before all can; raises when a rank does not arrive within the
        timeout (it died, failed or stalled while building)."""
        try:
            self._barrier("built")
        except Exception as err:
            arrived = self._arrived("built")
            if arrived is None:
                raise PipelineError(
                    f"{self.name}: lost the rendezvous store while the ranks built their engines ({err}); it lives "
                    "in the process of global rank 0, which probably failed or died (check its log)") from err
            raise PipelineError(
                f"{self.name}: only {arrived} of the {self.world_size} ranks finished building their pipeline "
                f"engine (deepspeed.initialize) within p2p_timeout ({self.timeout_s:g} s); the others failed, died "
                "or stalled while building (check their logs), or build slower than that (raise "
                '"pipeline": {"p2p_timeout": ...})') from err

    def agree(self, batch):
        """The barrier before the gradient reductions and the optimizer step of
        train batch `batch`: returns when every rank has reached it, raises
        when a failure is posted or a rank does not arrive within the timeout."""
        try:
            verdict = self._barrier(batch, on_open=lambda: self._forget_barrier(batch - 2))
        except Exception as err:
            arrived = self._arrived(batch)
            if arrived is None:
                raise PipelineError(
                    f"{self.name}: lost the rendezvous store at the end of batch {batch} ({err}); it lives in the "
                    f"process of global rank 0, which probably died (check its log). {_RECOVERY}") from err
            posted = self.posted()
            if posted is not None:
                raise self.error(posted) from err
            raise PipelineError(
                f"{self.name}: only {arrived} of the {self.world_size} ranks finished the forward and backward passes "
                f"of batch {batch} within p2p_timeout ({self.timeout_s:g} s); the others stalled, died or stopped "
                f"calling train_batch. No rank takes an optimizer step for this batch. {_RECOVERY}") from err
        if verdict != _OK:
            raise self.error(verdict.decode(errors="replace"))

    def wait_work(self, work, what, group):
        """Waits for a collective `work` on `group` at most the timeout; a
        failure another rank posted in this batch (or an earlier one) ends the
        wait at once."""
        if dist.get_backend(group) == "nccl":  # waits on the GPU stream, not here
            work.wait(timeout=datetime.timedelta(seconds=self.timeout_s))
            return
        done = threading.Event()
        work.get_future().add_done_callback(lambda _: done.set())
        with self._lock:
            self._wakers.add(done)
        try:
            if self._failure_of_this_batch() is None:
                done.wait(self.timeout_s)
        finally:
            with self._lock:
                self._wakers.discard(done)
        remote = self._failure_of_this_batch()
        if remote is not None:
            raise self.error(remote)
        # The future's callbacks run as it completes, before the work itself
        # reads as completed: the event is the answer, not is_completed().
        if not done.is_set():
            raise self.collective_failed(what, [group], None)
        try:
            work.wait()  # the collective's own error, if it failed
        except Exception as err:
            raise self.collective_failed(what, [group], err) from err

    @contextlib.contextmanager
    def collectives(self, what, groups):
        """Around DeepSpeed code that runs collectives on `groups`: their raw
        timeout and closed-connection errors become errors naming this rank,
        `what` and the ranks."""
        try:
            yield
        except RuntimeError as err:
            if not _gloo_says(err, _GLOO_TIMEOUT + _GLOO_PEER_CLOSED):
                raise
            raise self.collective_failed(what, groups, err) from err

    def collective_failed(self, what, groups, cause):
        """The error for a collective `what` on `groups` that failed with
        `cause` (None: it did not complete within the timeout)."""
        ranks = " or ".join(str(dist.get_process_group_ranks(g)) for g in groups if g is not None)
        text = str(cause) if cause is not None else ""
        if cause is None or _gloo_says(cause, _GLOO_TIMEOUT):  # our timer or the group's
            return CollectiveTimeout(f"{self.name}: {what} over global ranks {ranks} did not complete within "
                                     f"p2p_timeout ({self.timeout_s:g} s). A rank of that group may have died, "
                                     "failed, or stalled", what, ranks)
        if _gloo_says(cause, _GLOO_PEER_CLOSED):
            return CollectivePeerClosed(f"{self.name}: {what} over global ranks {ranks} failed: a peer closed the "
                                        f"connection (its process probably died; check the logs of those ranks): "
                                        f"{text}", what, ranks)
        return CollectiveFailed(f"{self.name}: {what} over global ranks {ranks} failed: {text}", what, ranks)

    def close(self):
        """Stops the watcher (an engine that is garbage collected)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._store.queue_push(self._key(f"inbox/{self.rank}"), _STOP)
        except Exception:
            return
        self._thread.join(timeout=5)


def _bounded_clones(store, count, timeout_s, name):
    """`count` clones of a c10d store (new connections to its server), each
    connecting within `timeout_s`: a TCPStore's clone otherwise retries for the
    store's own timeout (30 minutes by default) when its host has died."""
    base = store
    while hasattr(base, "underlying_store"):  # a PrefixStore (the default group's) wraps the real one
        base = base.underlying_store
    saved = base.timeout
    base.set_timeout(datetime.timedelta(seconds=timeout_s))
    try:
        return [store.clone() for _ in range(count)]
    except Exception as err:
        raise PipelineError(
            f"{name}: could not connect to the rendezvous store within p2p_timeout ({timeout_s:g} s) "
            f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); it "
            "lives in the process of global rank 0, which probably failed or died before this rank built its "
            "engine (check its log)") from err
    finally:
        base.set_timeout(saved)


def _parse(message):
    """(batch, description) of a failure message (b"<batch>|<description>")."""
    batch, _, description = message.partition(b"|")
    return int(batch), description.decode(errors="replace")


def _watch(board, store, inbox):
    """The watcher thread: blocks on this rank's inbox until a failure or
    the stop message arrives, or the store goes away."""
    while True:
        try:
            message = store.queue_pop(inbox, True)
        except Exception:
            return  # the store is gone: transfers and collectives still fail on their own
        if message == _STOP:
            return
        batch, description = _parse(message)
        board._deliver(description, batch)
        try:  # the last watcher to hold the failure tells the announcing rank
            # Counted per failing batch: a second failure, from an earlier batch, waits for its own delivery.
            if store.add(board._key(f"delivered/{batch}/count"), 1) == board.world_size - 1:
                store.set(board._key(f"delivered/{batch}"), _OK)
        except Exception:
            return
