"""Every private torch or DeepSpeed name this package uses still exists in
the installed versions (deepspeed_pipe_ext/_deepspeed_compat.py lists them)."""
from deepspeed_pipe_ext import _deepspeed_compat


def test_every_private_name_still_exists():
    missing = [f"{module.__name__}.{name}" for module, name in _deepspeed_compat.PRIVATE_NAMES
               if not hasattr(module, name)]
    assert not missing, f"gone from the installed version: {missing}"
    import importlib
    import inspect

    import torch.nn as nn
    module = nn.Linear(1, 1)
    missing = [name for name in _deepspeed_compat.TORCH_MODULE_INSTANCE_NAMES if not hasattr(module, name)]
    missing += [f"{where}.{name}" for where, name in _deepspeed_compat.SOURCE_NAMES
                if f".{name}" not in inspect.getsource(importlib.import_module(where))]
    assert not missing, f"gone from the installed version: {missing}"


def test_every_private_name_the_compat_module_uses_is_listed_for_checking():
    import inspect
    import re
    listed = {name for _, name in _deepspeed_compat.PRIVATE_NAMES + _deepspeed_compat.OVERRIDDEN
              + _deepspeed_compat.SOURCE_NAMES}
    listed |= set(_deepspeed_compat.ENGINE_INSTANCE_NAMES + _deepspeed_compat.MODULE_INSTANCE_NAMES
                  + _deepspeed_compat.TORCH_MODULE_INSTANCE_NAMES)
    used = set(re.findall(r"\.(_[A-Za-z]\w*)", inspect.getsource(_deepspeed_compat)))
    assert used and used <= listed, used - listed


def test_every_overridden_private_method_still_exists_and_no_other_is_shadowed():
    """Our subclasses override exactly the private DeepSpeed methods that
    OVERRIDDEN lists: one DeepSpeed renamed would silently stop being called,
    and one overridden by accident would change DeepSpeed's behaviour."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.pipe.module import PipelineModule as DSPipelineModule

    import deepspeed_pipe_ext as dpe
    gone = [f"{cls.__name__}.{name}" for cls, name in _deepspeed_compat.OVERRIDDEN if not hasattr(cls, name)]
    assert not gone, f"gone from the installed DeepSpeed: {gone}"
    shadowed = set()
    for ours, base in ((dpe.PipelineEngine, DeepSpeedEngine), (dpe.PipelineModule, DSPipelineModule)):
        for cls in ours.__mro__:
            if cls.__module__.startswith("deepspeed_pipe_ext"):
                shadowed |= {(base, name) for name in vars(cls)
                             if name.startswith("_") and not name.startswith("__") and hasattr(base, name)}
    assert shadowed == set(_deepspeed_compat.OVERRIDDEN)


def test_private_deepspeed_and_torch_names_are_used_only_through_the_compat_module():
    """Outside _deepspeed_compat.py, module.py (a subclass of DeepSpeed's
    PipelineModule, setting the attributes DeepSpeed's code reads) and
    topology.py (our own classes, no DeepSpeed base: its names are its own),
    no file of the package reads a private attribute that DeepSpeed's
    engine or module, or torch's Module, defines."""
    import os
    import re

    import torch.nn as nn
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.pipe.module import PipelineModule as DSPipelineModule
    package = os.path.dirname(_deepspeed_compat.__file__)
    theirs = {name for cls in (DeepSpeedEngine, DSPipelineModule, nn.Module) for name in dir(cls)
              if name.startswith("_") and not name.startswith("__")}
    theirs |= set(_deepspeed_compat.ENGINE_INSTANCE_NAMES) | set(_deepspeed_compat.MODULE_INSTANCE_NAMES)
    theirs |= {"_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_curr_ckpt_path",
               "_hp_grad", "_parameters", "_buffers", "_modules"}
    overridden = {name for _, name in _deepspeed_compat.OVERRIDDEN}
    found = []
    for file in sorted(os.listdir(package)):
        if not file.endswith(".py") or file in ("_deepspeed_compat.py", "module.py", "topology.py"):
            continue
        with open(os.path.join(package, file)) as f:
            for number, line in enumerate(f, 1):
                for name in re.findall(r"\.(_[A-Za-z]\w*)", line):
                    if name in theirs and name not in overridden:
                        found.append(f"{file}:{number}: {name}")
    assert not found, found
