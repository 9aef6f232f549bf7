"""Run on one rank by test_engine_surface.py: the names an engine of
each kind has, and how a few of DeepSpeed's accessors behave on both."""
import deepspeed
import torch
import torch.nn as nn
from deepspeed.pipe import PipelineModule as DSPipelineModule

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
        out[name] = {"names": sorted(n for n in dir(engine)
                                     if not _inherited_from_deepspeeds_pipeline_engine(engine, n)),
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


def megatron_loop(rank, world_size):
    """What Megatron-DeepSpeed's training loop does with a pipeline engine, in
    small, on DeepSpeed's engine and on ours (DeepSpeed's module adopted, as
    Megatron's GPTModelPipe is): its isinstance check picks the pipeline path
    and sets its batch_fn; train_batch, get_additional_losses and
    get_global_grad_norm (with gradient clipping) each step; a batch-size
    ramp-up through set_train_batch_size; eval_batch with
    num_micro_batches. The module's class name GPT2ModelPipe marks a bool
    attention mask among the activations."""
    import torch.nn as nn
    from deepspeed.pipe import LayerSpec
    from deepspeed.runtime.pipe.module import PipelineModule as DSModule

    class GPT2ModelPipe(DSModule):
        def _megatron_batch_fn(self, batch):  # Megatron's: the raw batch to ((inputs...), labels)
            tokens, labels = batch
            return (tokens, tokens > 0), labels

    class Masked(nn.Linear):
        def forward(self, inputs):
            x, mask = inputs
            return super().forward(x) * mask, mask

    class Head(nn.Linear):
        def forward(self, inputs):
            return super().forward(inputs[0])

    out = {}
    for name, adopt in (("deepspeed", False), ("ours", True)):
        dpe.run_deepspeed_pipelines_on_this_engine(adopt)
        try:
            torch.manual_seed(0)
            net = GPT2ModelPipe(layers=[LayerSpec(Masked, 8, 8), LayerSpec(Masked, 8, 8), LayerSpec(Head, 8, 4)],
                                num_stages=2, loss_fn=nn.MSELoss(), partition_method="uniform")
            config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "steps_per_print": 10**9,
                      "gradient_clipping": 0.05}
            engine, _, _, _ = deepspeed.initialize(model=net, config=config, model_parameters=net.parameters(),
                                                   optimizer=torch.optim.AdamW(net.parameters(), lr=0.01,
                                                                               weight_decay=0.1))
            row = {"engine": type(engine).__module__, "has_attention_mask": engine.has_attention_mask,
                   "is_pipe_parallel": engine.is_pipe_parallel}
            if isinstance(engine, deepspeed.PipelineEngine):  # megatron/training.py, setup_model_and_optimizer
                engine.set_batch_fn(engine.module._megatron_batch_fn)
            g = torch.Generator().manual_seed(1)
            data = [(torch.randn(2, 8, generator=g), torch.randn(2, 4, generator=g)) for _ in range(64)]
            it = iter(data)
            steps = []
            for step in range(4):
                if step == 2:
                    engine.set_train_batch_size(8)  # Megatron's batch-size ramp-up
                loss = engine.train_batch(data_iter=it)
                norm = engine.get_global_grad_norm()  # None where DeepSpeed tracks none (fp32, a client optimizer)
                steps.append((loss.item(), engine.get_additional_losses(), None if norm is None else float(norm)))
            row["steps"] = steps
            row["eval"] = engine.eval_batch(iter(data), num_micro_batches=2).item()
            row["weights"] = {k: v.clone() for k, v in net.state_dict().items()}
            out[name] = row
        finally:
            dpe.run_deepspeed_pipelines_on_this_engine(False)
    return out
