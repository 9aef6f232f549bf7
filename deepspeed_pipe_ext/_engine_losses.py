"""How the pipeline engine reports losses, as DeepSpeed's does: the mean over
micro-batches, averaged over data-parallel ranks and sent to every stage, with
a module's additional (auxiliary) losses; eval_batch's reduced outputs."""
from collections import OrderedDict

import torch
import torch.distributed as dist


class LossReporter:
    """A part of PipelineEngine: the collectives that report a batch's losses.
    `scale(value, **kwargs)` is DeepSpeed's division by the gradient
    accumulation steps; `bounded(work, what, group)` waits for a collective
    at most p2p_timeout."""

    def __init__(self, grid, placement, device, global_rank, loss_global_rank, scale, bounded):
        self.grid = grid
        self.placement = placement
        self.device = device
        self.global_rank = global_rank
        self.loss_global_rank = loss_global_rank  # the global rank of the loss stage of this pipeline
        self.scale = scale
        self.bounded = bounded

    def aggregate(self, total_loss, additional, additional_names):
        """The mean loss over micro-batches, averaged over data-parallel ranks
        and sent to every stage, with the module's additional losses, as
        DeepSpeed does. Returns (this data-parallel group's loss, the averaged
        loss, the averaged additional losses or None). `additional_names`: the
        names the module reports (the stages without the loss expect them)."""
        pipe_group = self.grid.get_pipe_parallel_group()
        is_pipe_parallel = self.placement.stages > 1
        if self.placement.holds_loss:
            loss = self.scale(total_loss)
            extra = additional
            if extra is not None:
                extra = OrderedDict((name, self.scale(value.clone().detach())) for name, value in extra.items())
            dp_group_loss = loss.clone().detach()
            agg_loss = dp_group_loss.clone().detach()
            if self.grid.data_parallel_size > 1:  # one all-reduce for the loss and the additional losses
                dp_group = self.grid.get_data_parallel_group()
                parts = [agg_loss, *(extra or {}).values()]
                flat = torch.cat([t.reshape(-1) for t in parts])
                self.bounded(dist.all_reduce(flat, group=dp_group, async_op=True), "the loss all-reduce", dp_group)
                flat /= self.grid.data_parallel_size
                reduced, offset = [], 0
                for t in parts:
                    reduced.append(flat[offset:offset + t.numel()].clone().reshape(t.shape))
                    offset += t.numel()
                agg_loss = reduced[0]
                if extra is not None:
                    extra = OrderedDict(zip(extra.keys(), reduced[1:]))
            losses = torch.stack([dp_group_loss, agg_loss, *(extra or {}).values()]).float()
            if is_pipe_parallel:
                self.bounded(dist.broadcast(losses, src=self.global_rank, group=pipe_group, async_op=True),
                             "the loss broadcast", pipe_group)
            return dp_group_loss, agg_loss, extra
        losses = torch.zeros(2 + len(additional_names), device=self.device)
        self.bounded(dist.broadcast(losses, src=self.loss_global_rank, group=pipe_group, async_op=True),
                     "the loss broadcast", pipe_group)
        extra = (OrderedDict((name, losses[2 + i].clone().detach()) for i, name in enumerate(additional_names))
                 if additional_names else None)
        return losses[0].clone().detach(), losses[1].clone().detach(), extra

    def reduce_outputs(self, outputs, reduce='avg', micro_batches=None):
        """eval_batch's outputs (one per micro-batch), averaged as DeepSpeed does."""
        if reduce is None:
            return outputs
        if reduce.lower() != 'avg':
            raise ValueError(f"reduce_output={reduce!r} is not supported: use 'avg' or None")
        if torch.is_tensor(outputs[0]):
            reduced = sum(outputs)
        else:
            reduced = [torch.zeros_like(o) for o in outputs[0]]
            for out in outputs:
                for idx, o in enumerate(out):
                    reduced[idx] += o
        reduced = self.scale(reduced, eval_micro_batches=micro_batches)
        if self.grid.data_parallel_size > 1:
            for t in ([reduced] if torch.is_tensor(reduced) else reduced):
                dp_group = self.grid.get_data_parallel_group()
                self.bounded(dist.all_reduce(t, group=dp_group, async_op=True), "the eval output all-reduce", dp_group)
                t /= self.grid.data_parallel_size
        return reduced

    def bcast_pipe_scalar(self, data, dtype=torch.float32):
        """The loss stage's `data`, on every stage of the pipeline."""
        src = self.loss_global_rank
        if self.global_rank == src:
            result = data.clone().detach().type(dtype).to(self.device)
        else:
            result = torch.tensor([0.], dtype=dtype, device=self.device)
        if self.placement.stages > 1:
            pipe_group = self.grid.get_pipe_parallel_group()
            self.bounded(dist.broadcast(result, src=src, group=pipe_group, async_op=True), "the eval loss broadcast",
                         pipe_group)
        return result
