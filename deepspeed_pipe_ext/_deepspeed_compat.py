"""The private names of torch (and DeepSpeed) this package relies on, in one
place: an upgrade that removes one fails here, by name, and
tests/test_compat.py checks that each still exists in the installed version.
The rest of the package reads and calls them only through the functions
below (or overrides the methods OVERRIDDEN lists)."""
import contextlib

import torch.distributed as dist
import torch.nn.modules.module as torch_module
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.pipe.module import PipelineModule as DSPipelineModule
from torch.distributed import distributed_c10d

# (module or class, attribute): every private name of torch or DeepSpeed this
# package relies on that a module or class defines. The functions below wrap
# the torch ones; the DeepSpeed methods are called on the engine and module,
# which inherit them, so they are listed here to be checked on upgrade.
PRIVATE_NAMES = (
    (distributed_c10d, "_get_default_store"),
    (distributed_c10d, "_set_pg_timeout"),
    (torch_module, "_global_forward_hooks"),
    (torch_module, "_global_forward_pre_hooks"),
    (torch_module, "_global_backward_hooks"),
    (torch_module, "_global_backward_pre_hooks"),
    (DeepSpeedEngine, "_take_model_step"),
    (DeepSpeedEngine, "_scale_loss_by_gas"),
    (DeepSpeedEngine, "_get_ckpt_name"),
    (DSPipelineModule, "_precompute_checkpointable_values"),
    (DSPipelineModule, "_recursive_getattr"),
)

# DeepSpeed's private methods our subclasses override, because DeepSpeed's
# own code calls them (its PipelineModule.__init__ builds and partitions
# through them; DeepSpeedEngine.backward's gradient hooks call the prologue).
# tests/test_compat.py checks each still exists, and that our classes
# override no other private name of DeepSpeed's by accident.
OVERRIDDEN = (
    (DeepSpeedEngine, "_backward_prologue_per_tensor"),
    (DSPipelineModule, "_build"),
    (DSPipelineModule, "_partition_layers"),
    (DSPipelineModule, "_find_layer_type"),
    (DSPipelineModule, "_index_tied_modules"),
    (DSPipelineModule, "_synchronize_tied_weights"),
)

# Private attributes a DeepSpeedEngine (and DeepSpeed's PipelineModule) sets
# on itself in __init__, which our engine reads or updates; checked on live
# objects by tests/test_engine_surface.py.
ENGINE_INSTANCE_NAMES = ("_config", "_running_engine_backward_lock", "_running_engine_backward_count",
                         "_running_engine_backward", "_is_compiled_autograd_enabled")
MODULE_INSTANCE_NAMES = ("_grid", "_topo", "_layer_specs", "_local_start", "_local_stop")
# Set on torch modules by nn.Module.__init__ (checked on a live module).
TORCH_MODULE_INSTANCE_NAMES = ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks", "_backward_pre_hooks")
# Set by DeepSpeed only at certain moments (checked in its source): the fp32
# gradient its bf16 optimizer keeps on each weight, and the tag directory of a
# save or load in progress.
SOURCE_NAMES = (("deepspeed.runtime.bf16_optimizer", "_hp_grad"), ("deepspeed.runtime.engine", "_curr_ckpt_path"))


def engine_config(engine):
    """The DeepSpeedConfig a DeepSpeedEngine was built with."""
    return engine._config


@contextlib.contextmanager
def engine_backward_running(engine):
    """Marks a backward pass in flight on a DeepSpeedEngine for the duration
    (its gradient hooks and ZeRO check the count, as engine.backward sets it)."""
    with engine._running_engine_backward_lock:
        engine._running_engine_backward_count += 1
        engine._running_engine_backward = True
    try:
        yield
    finally:
        with engine._running_engine_backward_lock:
            engine._running_engine_backward_count -= 1
            engine._running_engine_backward = engine._running_engine_backward_count > 0


def compiled_autograd_enabled(engine):
    return engine._is_compiled_autograd_enabled


def take_model_step(engine):
    """DeepSpeedEngine's optimizer step with its bookkeeping (lr scheduler,
    skipped steps, global steps), without the boundary checks of step()."""
    engine._take_model_step(None)


def scale_loss_by_gas(engine, loss, **kwargs):
    """A loss divided by the gradient accumulation steps (or by the eval
    micro-batches), as DeepSpeedEngine reports it."""
    return engine._scale_loss_by_gas(loss, **kwargs)


def checkpoint_tag_dir(engine):
    """Inside DeepSpeedEngine.save_checkpoint or load_checkpoint: the tag
    directory being written or read (None outside them)."""
    return getattr(engine, "_curr_ckpt_path", None)


def checkpoint_file_name(engine, load_dir, tag):
    """DeepSpeedEngine's model-states file for this rank under load_dir/tag."""
    return engine._get_ckpt_name(load_dir, tag)


def high_precision_grad(weight):
    """DeepSpeed's bf16 optimizer keeps a weight's fp32 gradient on the weight."""
    return weight._hp_grad


def module_grid(module):
    """A DeepSpeed PipelineModule's PipelineParallelGrid."""
    return module._grid


def module_layers(module):
    """A DeepSpeed PipelineModule's layer specs and this stage's [start, stop)
    among them."""
    return module._layer_specs, module._local_start, module._local_stop


def precompute_checkpointable_values(module):
    module._precompute_checkpointable_values()


def synchronize_tied_weights(module):
    """Copies each tied weight from its owner stage to the others."""
    module._synchronize_tied_weights()


def module_hook_ids(module):
    """The ids of a torch module's own hooks: forward pre, forward, backward,
    backward pre."""
    return (list(module._forward_pre_hooks), list(module._forward_hooks), list(module._backward_hooks),
            list(module._backward_pre_hooks))


def global_module_hooks():
    """torch's process-wide module hooks (forward, forward pre, backward,
    backward pre): anyone's hook there means a module call cannot be skipped."""
    return (torch_module._global_forward_hooks, torch_module._global_forward_pre_hooks,
            torch_module._global_backward_hooks, torch_module._global_backward_pre_hooks)


def default_store():
    """The rendezvous store the default process group was created with
    (a c10d Store every process of the job shares)."""
    return distributed_c10d._get_default_store()


def set_group_timeout(group, timeout):
    """Sets how long collectives on `group` (a c10d ProcessGroup) wait before
    failing; `timeout` is a datetime.timedelta."""
    if group is None or group == dist.GroupMember.NON_GROUP_MEMBER:
        return
    distributed_c10d._set_pg_timeout(timeout, group)
