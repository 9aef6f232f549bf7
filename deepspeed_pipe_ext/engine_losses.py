"""How the pipeline engine reports losses, as DeepSpeed's does: the mean over
micro-batches, averaged over data-parallel ranks and sent to every stage, with
a module's additional (auxiliary) losses; eval_batch's reduced outputs."""
from collections import OrderedDict

import torch
import torch.distributed as dist

from . import _deepspeed_compat


class LossReporting:
    """PipelineEngine's losses (a mixin of the engine)."""

    def get_additional_losses(self):
        """The module's auxiliary losses (get_additional_losses(), e.g. MoE's)
        of the last batch: averaged over micro-batches and data-parallel ranks,
        on every stage; None when the module has none."""
        return self.agg_additional_losses

    def _aggregate_total_loss(self):
        """Mean loss over micro-batches, averaged over data-parallel ranks, sent
        to every stage; with the module's additional losses, as DeepSpeed does."""
        pipe_group = self.grid.get_pipe_parallel_group()
        if self._is_loss_stage():
            loss = _deepspeed_compat.scale_loss_by_gas(self, self.total_loss)
            extra = self.total_additional_losses
            if extra is not None:
                extra = OrderedDict((name, _deepspeed_compat.scale_loss_by_gas(self, value.clone().detach()))
                                    for name, value in extra.items())
            self.dp_group_loss = loss.clone().detach()
            agg_loss = self.dp_group_loss.clone().detach()
            if self.is_data_parallel:  # one all-reduce for the loss and the additional losses
                dp_group = self.grid.get_data_parallel_group()
                parts = [agg_loss, *(extra or {}).values()]
                flat = torch.cat([t.reshape(-1) for t in parts])
                self._bounded(dist.all_reduce(flat, group=dp_group, async_op=True), "the loss all-reduce", dp_group)
                flat /= self.grid.data_parallel_size
                reduced, offset = [], 0
                for t in parts:
                    reduced.append(flat[offset:offset + t.numel()].clone().reshape(t.shape))
                    offset += t.numel()
                agg_loss = reduced[0]
                if extra is not None:
                    extra = OrderedDict(zip(extra.keys(), reduced[1:]))
            self.agg_additional_losses = extra
            losses = torch.stack([self.dp_group_loss, agg_loss, *(extra or {}).values()]).float()
            if self.is_pipe_parallel:
                self._bounded(dist.broadcast(losses, src=self.global_rank, group=pipe_group, async_op=True),
                              "the loss broadcast", pipe_group)
        else:
            names = list((self.module.get_additional_losses() or {}).keys())
            losses = torch.zeros(2 + len(names), device=self.device)
            self._bounded(dist.broadcast(losses, src=self._loss_stage_global_rank(), group=pipe_group,
                                         async_op=True), "the loss broadcast", pipe_group)
            self.dp_group_loss = losses[0].clone().detach()
            agg_loss = losses[1].clone().detach()
            self.agg_additional_losses = (OrderedDict((name, losses[2 + i].clone().detach())
                                                      for i, name in enumerate(names)) if names else None)
        return agg_loss

    def _reduce_outputs(self, outputs, reduce='avg', micro_batches=None):
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
        reduced = _deepspeed_compat.scale_loss_by_gas(self, reduced, eval_micro_batches=micro_batches)
        if self.is_data_parallel:
            for t in ([reduced] if torch.is_tensor(reduced) else reduced):
                dp_group = self.grid.get_data_parallel_group()
                self._bounded(dist.all_reduce(t, group=dp_group, async_op=True), "the eval output all-reduce", dp_group)
                t /= self.grid.data_parallel_size
        return reduced

    def _bcast_pipe_scalar(self, data, dtype=torch.float32):
        src = self._loss_stage_global_rank()
        if self.global_rank == src:
            result = data.clone().detach().type(dtype).to(self.device)
        else:
            result = torch.tensor([0.], dtype=dtype, device=self.device)
        if self.is_pipe_parallel:
            pipe_group = self.grid.get_pipe_parallel_group()
            self._bounded(dist.broadcast(result, src=src, group=pipe_group, async_op=True), "the eval loss broadcast",
                          pipe_group)
        return result
