"""What the pipeline engine does when a batch fails: the failure is posted to
every rank (failures.FailureBoard), no rank steps on it, later batches refuse,
and every wait of the batch is bounded by p2p_timeout."""
import contextlib
import datetime

import torch.distributed as dist
from deepspeed.runtime.pipe.module import PipelineError

from . import _deepspeed_compat
from .failures import RemoteFailure


class FailureHandling:
    """PipelineEngine's side of failures (a mixin of the engine)."""

    @contextlib.contextmanager
    def _batch_guard(self):
        """Around a whole train_batch / eval_batch. A batch that raised here
        is posted to every rank (which stop at once); after it, the
        pipeline's transfers and gradients may be half done on this and other
        stages, so every later batch refuses at once."""
        if self._failed_batch is not None:
            raise PipelineError(
                f"stage {self.stage_id} (global rank {self.global_rank}): an earlier batch failed here "
                f"({self._failed_batch}); its transfers and gradients may be half done on this and other stages, so "
                "this engine refuses to go on rather than train on misaligned data. Rebuild the engine with "
                "deepspeed.initialize and load the last checkpoint (engine.load_checkpoint) to continue")
        self._agreed = False
        try:
            if self._failures is not None:  # another rank failed since this rank's last batch: latched below too
                self._failures.raise_if_failed()
            yield
        except BaseException as err:
            cause = None if isinstance(err, RemoteFailure) or self._failures is None else self._failures.cause_of(err)
            final = err if cause is None else self._failures.error(cause)
            self._failed_batch = f"{type(final).__name__}: {str(final).splitlines()[0] if str(final) else ''}"[:300]
            if isinstance(err, RemoteFailure):
                raise
            if cause is not None:
                raise final from err
            # A failure of this rank's own waits for every peer to hold it; one that only says a peer stopped
            # answering (it died) does not wait for that peer.
            told = self._failures is not None and self._failures.announce(
                self._describe_failure(err), self._train_batches,
                wait_for_delivery=not self._failures.is_consequence(err))
            if hasattr(err, "add_note"):  # Python 3.11+: errors from DeepSpeed or torch name the rank too
                err.add_note(f"deepspeed_pipe_ext: this batch failed on stage {self.stage_id} "
                             f"(global rank {self.global_rank}); " + ("every other rank was told and stops; "
                                                                      if told else "") +
                             "later batches on this engine will refuse to run")
            raise

    def _describe_failure(self, err):
        """Where and how this rank's batch failed, for the other ranks."""
        where = ""
        for note in getattr(err, "__notes__", []):
            if note.startswith("deepspeed_pipe_ext: raised on stage ") and " at " in note:
                where = " at " + note.split(" at ", 1)[1]
        who = f"global rank {self.global_rank} (stage {self.stage_id}"
        if self.is_data_parallel:
            who += f", data-parallel rank {self.grid.get_data_parallel_rank()}"
        text = str(err).splitlines()[0] if str(err) else ""
        return f"{who}){where}: {type(err).__name__}{': ' + text if text else ''}"[:4000]

    def _bound_collectives(self, timeout_s):
        """The collectives a batch runs inside DeepSpeed (data-parallel and
        clipping all-reduces, ZeRO's gathers) and ours (tied weights, loss)
        wait at most p2p_timeout on the groups of this pipeline."""
        grid, timeout = self.grid, datetime.timedelta(seconds=timeout_s)
        groups = [grid.get_pipe_parallel_group(), grid.get_data_parallel_group()]
        for getter in ("get_slice_parallel_group", "get_model_parallel_group"):
            if hasattr(grid, getter):
                groups.append(getattr(grid, getter)())
        groups += [comm["group"] for comm in getattr(self.module, "tied_comms", {}).values()]
        for group in {id(g): g for g in groups if g is not None}.values():
            if self.global_rank in dist.get_process_group_ranks(group):
                _deepspeed_compat.set_group_timeout(group, timeout)

    def _agree_before_step(self):
        """Before the first reduction of a train batch: every rank has done its
        forward and backward passes, or none goes on to step."""
        if self._failures is not None and not self._agreed:
            self._agreed = True
            self._failures.agree(self._train_batches)

    def _deepspeed_collectives(self, what, *groups):
        if self._failures is None:
            return contextlib.nullcontext()
        return self._failures.collectives(what, groups)

    def _bounded(self, work, what, group):
        """Waits for a collective of the batch at most p2p_timeout (less when
        another rank's failure arrives), then fails naming this stage, the
        collective and the ranks of its group."""
        if self._failures is not None:
            self._failures.wait_work(work, what, group)
            return
        work.wait(timeout=datetime.timedelta(seconds=self.p2p_timeout))
