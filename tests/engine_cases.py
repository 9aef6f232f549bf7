"""Run on every rank by tests/test_engine.py: our PipelineEngine against
DeepSpeed's on the same model, seeds and data."""
import torch
import torch.nn as nn
from deepspeed.pipe import PipelineModule as DSPipelineModule

import deepspeed
import deepspeed_pipe_ext as dpe
from deepspeed_pipe_ext import engine as dpe_engine


def mlp_specs(spec):
    return [spec(nn.Linear, 8, 16), nn.ReLU(), spec(nn.Linear, 16, 16), nn.Tanh(), spec(nn.Linear, 16, 16),
            nn.ReLU(), spec(nn.Linear, 16, 4)]


def batches(seed, count, micro_batch=2):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(micro_batch, 8, generator=g), torch.randn(micro_batch, 4, generator=g)) for _ in range(count)]


def _train(module_cls, spec, make_engine, num_stages, steps, micro_batches, seed):
    torch.manual_seed(seed)
    net = module_cls(layers=mlp_specs(spec), num_stages=num_stages, loss_fn=nn.MSELoss())
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": micro_batches,
              "steps_per_print": 10**9}
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    engine, _, _, _ = make_engine(model=net, config=config, optimizer=optimizer, model_parameters=net.parameters())
    # The same batch every step (different per data-parallel rank), so the loss must fall.
    data = iter(batches(100 + engine.grid.data_parallel_id, micro_batches) * steps)
    losses = [engine.train_batch(data_iter=data).item() for _ in range(steps)]
    evals = engine.eval_batch(iter(batches(7, micro_batches)), return_logits=True)
    weights = {k: v.detach().clone() for k, v in net.state_dict().items()}
    return losses, weights, evals, type(engine).__name__


def train_both(rank, world_size, num_stages, steps=20, micro_batches=4, seed=3):
    from deepspeed import initialize as ds_initialize
    theirs = _train(DSPipelineModule, deepspeed.pipe.LayerSpec, ds_initialize, num_stages, steps, micro_batches,
                    seed)
    ours = _train(dpe.PipelineModule, dpe.LayerSpec, dpe_engine.initialize, num_stages, steps, micro_batches, seed)
    assert ours[3] == "PipelineEngine" and isinstance(ours, tuple)
    return theirs[:3], ours[:3]


def gradient_accumulation(rank, world_size):
    """Two 1x1 linear layers with weight 1, SGD lr 0.1, two micro-batches of
    (1 -> 0) with MSE: the weights after one train_batch, both engines."""
    from deepspeed import initialize as ds_initialize
    out = []
    for module_cls, spec, make in ((DSPipelineModule, deepspeed.pipe.LayerSpec, ds_initialize),
                                   (dpe.PipelineModule, dpe.LayerSpec, dpe_engine.initialize)):
        net = module_cls(layers=[spec(nn.Linear, 1, 1, bias=False), spec(nn.Linear, 1, 1, bias=False)],
                         num_stages=2, loss_fn=nn.MSELoss())
        with torch.no_grad():
            for p in net.parameters():
                p.fill_(1.0)
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2, "steps_per_print": 10**9}
        engine, _, _, _ = make(model=net, config=config, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                               model_parameters=net.parameters())
        data = iter([(torch.ones(1, 1), torch.zeros(1, 1))] * 2)
        loss = engine.train_batch(data_iter=data).item()
        out.append((loss, [p.item() for p in net.parameters()]))
    return out
