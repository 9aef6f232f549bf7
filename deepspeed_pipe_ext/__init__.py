"""deepspeed_pipe_ext: compiled internals for DeepSpeed pipeline parallelism.

    import deepspeed_pipe_ext
    net = deepspeed_pipe_ext.PipelineModule(layers=..., num_stages=2, loss_fn=...)
"""
import types as _types

from . import engine, partition, topology
from ._failures import CollectiveFailed, CollectivePeerClosed, CollectiveTimeout, RemoteFailure
from ._native import _C
from .engine import PipelineEngine, initialize, run_deepspeed_pipelines_on_this_engine
from .module import LayerSpec, PipelineError, PipelineModule, TiedLayerSpec
from .planner import Plan, PlanError, plan
from .topology import PipeDataParallelTopology, PipelineParallelGrid, PipeModelDataParallelTopology, ProcessTopology

__version__ = "0.1.0"  # the one version string (pyproject reads it)

# What a failed transfer raises (subclasses of RuntimeError, registered from C++).
P2PError, P2PTimeout, P2PAborted, PeerClosed = _C.P2PError, _C.P2PTimeout, _C.P2PAborted, _C.PeerClosed

# deepspeed.initialize builds our PipelineEngine for our PipelineModule.
engine.install()

__all__ = [
    "PipelineModule", "LayerSpec", "TiedLayerSpec", "PipelineError", "PipelineEngine", "initialize",
    "run_deepspeed_pipelines_on_this_engine", "ProcessTopology", "PipeDataParallelTopology",
    "PipeModelDataParallelTopology", "PipelineParallelGrid", "partition", "schedule", "topology", "RemoteFailure",
    "P2PError", "P2PTimeout", "P2PAborted", "PeerClosed", "CollectiveFailed", "CollectiveTimeout",
    "CollectivePeerClosed", "plan", "Plan", "PlanError", "__version__"
]


def __getattr__(name: str) -> _types.ModuleType:
    # Imported on first use, so `python -m deepspeed_pipe_ext.schedule` does
    # not find the module already imported by the package.
    if name == "schedule":
        import importlib
        return importlib.import_module(".schedule", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
