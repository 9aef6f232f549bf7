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
        behaviour["type_checks"] = _type_checks(engine)
        out[name] = {"names": sorted(n for n in dir(engine) if not _inherited_from_deepspeeds_pipeline_engine(engine, n)),
                     "behaviour": behaviour}
        if name == "deepspeed":  # the private attributes our engine relies on, on DeepSpeed's own objects
            from deepspeed_pipe_ext import _deepspeed_compat as compat
            out["missing_private"] = ([n for n in compat.ENGINE_INSTANCE_NAMES if not hasattr(engine, n)] +
                                      [n for n in compat.MODULE_INSTANCE_NAMES if not hasattr(net, n)])
    return out


def _inherited_from_deepspeeds_pipeline_engine(engine, name):
    """On our engine (a subclass of DeepSpeed's PipelineEngine): `name` comes
    from DeepSpeed's class, not from ours or DeepSpeedEngine."""
    from deepspeed.runtime.pipe.engine import PipelineEngine as DSPipelineEngine
    if type(engine) is DSPipelineEngine or name in vars(engine):
        return False
    owner = next((cls for cls in type(engine).__mro__ if name in vars(cls)), None)
    return owner is DSPipelineEngine


def _type_checks(engine):
    """What Megatron-DeepSpeed and DeepSpeed ask of a pipeline engine's type."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.pipe import engine as ds_pipe_engine
    return {"deepspeed.PipelineEngine is a class": isinstance(deepspeed.PipelineEngine, type),
            "isinstance deepspeed.PipelineEngine": isinstance(engine, deepspeed.PipelineEngine),
            "issubclass deepspeed.PipelineEngine": issubclass(type(engine), deepspeed.PipelineEngine),
            "isinstance runtime.pipe.engine.PipelineEngine": isinstance(engine, ds_pipe_engine.PipelineEngine),
            "isinstance DeepSpeedEngine": isinstance(engine, DeepSpeedEngine),
            "DeepSpeedEngine is not a pipeline engine": not issubclass(DeepSpeedEngine, deepspeed.PipelineEngine)}
