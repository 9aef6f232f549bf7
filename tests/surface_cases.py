"""Run on one rank by tests/test_engine_surface.py: the names an engine of
each kind has, and how a few of DeepSpeed's accessors behave on both."""
import torch
import torch.nn as nn
from deepspeed.pipe import PipelineModule as DSPipelineModule

import deepspeed
import deepspeed_pipe_ext as dpe


def engine_names(rank, world_size):
    out = {}
    for name, module_cls in (("deepspeed", DSPipelineModule), ("ours", dpe.PipelineModule)):
        torch.manual_seed(0)
        net = module_cls(layers=[nn.Linear(4, 4), nn.Linear(4, 2)], num_stages=1, loss_fn=nn.MSELoss())
        config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "steps_per_print": 10**9}
        engine, _, _, _ = deepspeed.initialize(model=net, config=config, model_parameters=net.parameters(),
                                               optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
        behaviour = {
            "class": type(engine).__module__,
            "flags": (engine.is_pipe_parallel, engine.is_data_parallel, engine.is_model_parallel,
                      engine.is_pipe_partitioned, engine.is_grad_partitioned, engine.has_bool_tensors,
                      engine.has_attention_mask),
            "loss_stage": engine._loss_stage_global_rank(),
            "reentrant": engine._reentrant_activation_checkpointing(),
        }
        engine.set_has_attention_mask(True)
        behaviour["mask_set"] = engine.has_attention_mask
        engine.set_train_batch_size(8)
        behaviour["micro_batches"] = (engine.micro_batches, engine.gradient_accumulation_steps())
        batches = [(torch.randn(2, 4), torch.randn(2, 2)) for _ in range(4)]
        behaviour["trains_with_new_size"] = engine.train_batch(data_iter=iter(batches)).item() > 0
        behaviour["additional_losses"] = engine.get_additional_losses()
        behaviour["train_schedule"] = [[repr(i) for i in step] for step in engine._train_schedule()]
        out[name] = {"names": sorted(n for n in dir(engine)), "behaviour": behaviour}
        if name == "deepspeed":  # the private attributes our engine relies on, on DeepSpeed's own objects
            from deepspeed_pipe_ext import _deepspeed_compat as compat
            out["missing_private"] = ([n for n in compat.ENGINE_INSTANCE_NAMES if not hasattr(engine, n)] +
                                      [n for n in compat.MODULE_INSTANCE_NAMES if not hasattr(net, n)])
    return out
