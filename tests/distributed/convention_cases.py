"""DeepSpeed's data conventions, run on every rank by test_conventions.py:
labels of every kind DeepSpeed passes to the loss, a module's additional
(auxiliary) losses, and a batch_fn that makes the batch itself. DeepSpeed's
engine and ours on the same module, seeds and data."""
import deepspeed
import torch
import torch.nn as nn
from deepspeed.pipe import PipelineModule as DSPipelineModule

import deepspeed_pipe_ext as dpe

MICRO_BATCHES = 3
STEPS = 10


def mse_with_label(kind):
    """A loss taking labels of `kind`, as a user's loss_fn would."""
    def loss(outputs, labels):
        if kind == "int":  # e.g. a class index or a weight passed through untouched
            assert type(labels) is int, type(labels)
            return (outputs - labels).pow(2).mean()
        if kind == "dict":
            assert isinstance(labels, dict), type(labels)
            return labels["weight"] * nn.functional.mse_loss(outputs, labels["target"])
        if kind == "none":
            assert labels is None
            return outputs.pow(2).mean()
        if kind == "list":  # DeepSpeed hands a list of tensors over as a tuple
            assert isinstance(labels, tuple) and all(torch.is_tensor(t) for t in labels), type(labels)
            return nn.functional.mse_loss(outputs, labels[0]) + nn.functional.mse_loss(outputs, labels[1]) / 2
        raise AssertionError(kind)
    return loss


def labels_of(kind, y):
    return {"int": 1, "dict": {"target": y, "weight": 0.5}, "none": None, "list": [y, -y]}[kind]


class AuxTap(nn.Module):
    """Passes its input on and keeps an auxiliary loss of it (as MoE's load
    balancing loss is kept), for the module to report."""

    def forward(self, x):
        self.aux = x.detach().abs().mean()
        return x


def _aux_module(base):
    class WithAuxLosses(base):
        def get_additional_losses(self):
            taps = [f for f in self.forward_funcs if isinstance(f, AuxTap)]
            value = taps[0].aux if taps else torch.zeros(())
            return {"aux": value, "aux_doubled": 2 * value}
    return WithAuxLosses


def _layers(spec):
    return [spec(nn.Linear, 8, 8), nn.Tanh(), spec(nn.Linear, 8, 4), AuxTap()]


def run(rank, world_size, cases):
    """Each case on both engines (2 stages): per engine, the losses, weights
    and additional losses this rank reports after every step."""
    return {case: run_case(case) for case in cases}


def run_case(case, num_stages=2):
    from deepspeed import initialize as ds_initialize
    results = []
    for base, spec in ((DSPipelineModule, deepspeed.pipe.LayerSpec), (dpe.PipelineModule, dpe.LayerSpec)):
        torch.manual_seed(4)
        module_cls = _aux_module(base) if case == "aux" else base
        kind = case if case in ("int", "dict", "none", "list") else None
        loss_fn = mse_with_label(kind) if kind else nn.MSELoss()
        net = module_cls(layers=_layers(spec), num_stages=num_stages, loss_fn=loss_fn, partition_method="uniform")
        config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": MICRO_BATCHES,
                  "steps_per_print": 10**9}
        engine, _, _, _ = ds_initialize(model=net, config=config, model_parameters=net.parameters(),
                                        optimizer=torch.optim.SGD(net.parameters(), lr=0.05))
        dp = engine.grid.data_parallel_id
        g = torch.Generator().manual_seed(100 + dp)
        data = [(torch.randn(2, 8, generator=g), torch.randn(2, 4, generator=g)) for _ in range(MICRO_BATCHES)]
        if kind:
            data = [(x, labels_of(kind, y)) for x, y in data]
        if case == "batch_fn":
            # batch_fn makes the batch from nothing, as a Megatron user's broadcasts one reader's batch.
            made = iter(data * STEPS)
            engine.set_batch_fn(lambda batch: next(made))
            engine.set_dataiterator(None)
            batches = None
        else:
            batches = iter(data * STEPS)
        losses, extras = [], []
        for _ in range(STEPS):
            losses.append(engine.train_batch(data_iter=batches).item())
            extra = engine.get_additional_losses() if hasattr(engine, "get_additional_losses") else \
                engine.agg_additional_losses
            extras.append(None if extra is None else {k: v.item() for k, v in extra.items()})
        weights = {k: v.detach().clone() for k, v in net.state_dict().items()}
        results.append((losses, weights, extras, type(engine).__module__))
    return results
