"""The private names of torch (and DeepSpeed) this package relies on, in one
place: an upgrade that removes one fails here, by name, and
tests/test_compat.py checks that each still exists in the installed version."""
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
    (DeepSpeedEngine, "_backward_prologue_per_tensor"),
    (DSPipelineModule, "_precompute_checkpointable_values"),
    (DSPipelineModule, "_recursive_getattr"),
    (DSPipelineModule, "_synchronize_tied_weights"),
)

# Private attributes a DeepSpeedEngine (and DeepSpeed's PipelineModule) sets
# on itself in __init__, which our engine reads or updates; checked on live
# objects by tests/test_engine_surface.py.
ENGINE_INSTANCE_NAMES = ("_config", "_running_engine_backward_lock", "_running_engine_backward_count",
                         "_running_engine_backward", "_is_compiled_autograd_enabled")
MODULE_INSTANCE_NAMES = ("_grid", "_topo", "_layer_specs", "_local_start", "_local_stop")


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
