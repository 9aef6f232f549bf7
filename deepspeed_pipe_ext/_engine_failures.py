"""What the pipeline engine does when a batch fails: the failure is posted to
every rank (_failures.FailureBoard), no rank steps on it, later batches refuse,
and every wait of the batch is bounded by p2p_timeout."""
import contextlib
import datetime

import torch.distributed as dist
from deepspeed.runtime.pipe.module import PipelineError

from . import _deepspeed_compat
from ._failures import RemoteFailure
from ._native import _C


class BatchGuard:
    """A part of PipelineEngine: guards each batch. `board` is the engine's
    FailureBoard (None in a one-process job); `who` names this rank ("global
    rank 3 (stage 1, data-parallel rank 1)"); `timeout_s` is p2p_timeout."""

    def __init__(self, board, who, stage_id, global_rank, timeout_s):
        self.board = board
        self.who = who
        self.stage_id = stage_id
        self.global_rank = global_rank
        self.timeout_s = timeout_s
        self.failed_batch = None  # what made a batch fail: later batches refuse to run
        self.train_batches = 0  # the same count on every rank: names a batch's barrier on the store
        self.agreed = False
        self.past_barrier = False

    @contextlib.contextmanager
    def batch(self, training):
        """Around a whole train_batch / eval_batch. A batch that raised here
        is posted to every rank (which stop at once); after it, the
        pipeline's transfers and gradients may be half done on this and other
        stages, so every later batch refuses at once."""
        if self.failed_batch is not None:
            raise PipelineError(
                f"stage {self.stage_id} (global rank {self.global_rank}): an earlier batch failed here "
                f"({self.failed_batch}); its transfers and gradients may be half done on this and other stages, so "
                "this engine refuses to go on rather than train on misaligned data. Rebuild the engine with "
                "deepspeed.initialize and load the last checkpoint (engine.load_checkpoint) to continue")
        if training:
            self.train_batches += 1
        self.agreed = False
        self.past_barrier = False  # every rank finished the batch's passes: ranks may step on it
        board = self.board
        try:
            if board is not None:  # another rank failed since this rank's last batch: latched below too
                board.begin_batch()
            yield
        except BaseException as err:
            cause = None if isinstance(err, RemoteFailure) or board is None else board.cause_of(err)
            final = err if cause is None else board.error(cause)
            self.failed_batch = f"{type(final).__name__}: {str(final).splitlines()[0] if str(final) else ''}"[:300]
            if isinstance(err, RemoteFailure):
                raise
            if cause is not None:
                raise final from err
            # A failure of this rank's own waits for every peer to hold it; one that only says a peer stopped
            # answering (it died) does not wait for that peer.
            told = board is not None and board.announce(self.describe(err), self.train_batches,
                                                        wait_for_delivery=not board.is_consequence(err))
            if hasattr(err, "add_note"):  # Python 3.11+: errors from DeepSpeed or torch name the rank too
                err.add_note(f"deepspeed_pipe_ext: this batch failed on stage {self.stage_id} "
                             f"(global rank {self.global_rank}); " + ("every other rank was told and stops; "
                                                                      if told else "") +
                             "later batches on this engine will refuse to run")
            raise

    def describe(self, err):
        """Where and how this rank's batch failed, for the other ranks."""
        # Where the schedule stood: a transfer's error says it, run_stage marks a callback's.
        position = err.position if isinstance(err, _C.P2PError) else getattr(err, "pipeline_position", "")
        where = f" at {position.split(' at ', 1)[-1]}" if position else ""
        text = str(err).splitlines()[0] if str(err) else ""
        what = f"{self.who}{where}: {type(err).__name__}{': ' + text if text else ''}"[:4000].rstrip(". ")
        if self.past_barrier:  # the reductions and optimizer steps had begun: some ranks may have stepped
            return (f"{what}. It failed after every rank had finished the batch's passes, so some ranks may have "
                    "taken their optimizer step on it and others not.")
        return f"{what}. No rank takes an optimizer step for it."

    def agree_before_step(self):
        """Before the first reduction of a train batch: every rank has done its
        forward and backward passes, or none goes on to step."""
        if self.board is not None and not self.agreed:
            self.agreed = True
            self.board.agree(self.train_batches)
            self.past_barrier = True

    def collectives(self, what, *groups):
        """Around DeepSpeed code that runs collectives on `groups`."""
        if self.board is None:
            return contextlib.nullcontext()
        return self.board.collectives(what, groups)

    def bounded(self, work, what, group):
        """Waits for a collective of the batch at most p2p_timeout (less when
        another rank's failure arrives), then fails naming this stage, the
        collective and the ranks of its group."""
        if self.board is not None:
            self.board.wait_work(work, what, group)
            return
        work.wait(timeout=datetime.timedelta(seconds=self.timeout_s))


def bound_collectives(grid, module, global_rank, timeout_s):
    """The collectives a batch runs inside DeepSpeed (data-parallel and
    clipping all-reduces, ZeRO's gathers) and ours (tied weights, loss) wait
    at most p2p_timeout on the groups of this pipeline."""
    timeout = datetime.timedelta(seconds=timeout_s)
    groups = [grid.get_pipe_parallel_group(), grid.get_data_parallel_group()]
    for getter in ("get_slice_parallel_group", "get_model_parallel_group"):
        if hasattr(grid, getter):
            groups.append(getattr(grid, getter)())
    groups += [comm["group"] for comm in getattr(module, "tied_comms", {}).values()]
    for group in {id(g): g for g in groups if g is not None}.values():
        if global_rank in dist.get_process_group_ranks(group):
            _deepspeed_compat.set_group_timeout(group, timeout)
