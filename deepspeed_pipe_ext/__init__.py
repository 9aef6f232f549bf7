"""deepspeed_pipe_ext: compiled internals for DeepSpeed pipeline parallelism.

    import deepspeed_pipe_ext
    net = deepspeed_pipe_ext.PipelineModule(layers=..., num_stages=2, loss_fn=...)
"""
from . import partition, topology
from .module import LayerSpec, PipelineError, PipelineModule, TiedLayerSpec
from .topology import (PipeDataParallelTopology, PipelineParallelGrid, PipeModelDataParallelTopology,
                       ProcessTopology)

__version__ = "0.1.0"

__all__ = [
    "PipelineModule", "LayerSpec", "TiedLayerSpec", "PipelineError", "ProcessTopology", "PipeDataParallelTopology",
    "PipeModelDataParallelTopology", "PipelineParallelGrid", "partition", "topology"
]
