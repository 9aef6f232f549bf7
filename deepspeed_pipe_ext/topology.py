"""Process topologies for pipeline, data and model parallelism.

Same names, signatures and results as `deepspeed.runtime.pipe.topology`; the
rank math runs in C++ (`_C.Topology`), Python only creates the
torch.distributed groups from the rank lists computed there.
"""
from collections import namedtuple
from collections.abc import Iterable
from typing import Any

import torch.distributed as dist

from ._native import _C

__all__ = [
    "ProcessTopology", "PipeDataParallelTopology", "PipeModelDataParallelTopology", "PipelineParallelGrid",
    "as_topology"
]


class ProcessTopology:
    """Maps the global ranks of a job to coordinates on named axes, row-major
    (the last axis varies fastest), as DeepSpeed's ProcessTopology does."""

    def __init__(self, axes: Iterable[str], dims: Iterable[int]) -> None:
        self.axes = list(axes)
        self.dims = [int(d) for d in dims]
        self._core = _C.Topology(self.axes, self.dims)
        self.ProcessCoord: Any = namedtuple('ProcessCoord', self.axes)  # type: ignore[misc]  # axes known at run time
        self._mapping: dict[Any, int] | None = None

    @property
    def mapping(self) -> dict[Any, int]:
        """{ProcessCoord: rank} for every rank (built on first use)."""
        if self._mapping is None:
            self._mapping = {self.get_coord(r): r for r in range(self.world_size())}
        return self._mapping

    def _coord_list(self, coord_kwargs, what):
        unknown = sorted(set(coord_kwargs) - set(self.axes))
        if unknown:
            raise ValueError(f"{what}: unknown axis {unknown}; this topology's axes are {self.axes}")
        return [coord_kwargs.get(a) for a in self.axes]

    def get_rank(self, **coord_kwargs: int) -> int:
        """The global rank at the given coordinate (one value per axis)."""
        if len(coord_kwargs) != len(self.axes):
            raise ValueError('get_rank() does not support slices. Use filter_match())')
        return self._core.rank(self._coord_list(coord_kwargs, "get_rank()"))

    def get_axis_names(self) -> list[str]:
        return self.axes

    def get_rank_repr(self, rank: int, omit_axes: Iterable[str] = ['data', 'pipe'], inner_sep: str = '_',
                      outer_sep: str = '-') -> str:
        """'axis_XX' for each axis not omitted, e.g. 'model_01' (used in checkpoint names)."""
        return self._core.rank_repr(rank, list(omit_axes), inner_sep, outer_sep)

    def get_dim(self, axis: str) -> int:
        """Number of processes along `axis` (0 when the topology has no such axis)."""
        return self._core.dim(axis)

    def get_coord(self, rank: int) -> Any:
        """The ProcessCoord namedtuple of `rank`."""
        return self.ProcessCoord(*self._core.coord(rank))

    def get_axis_comm_lists(self, axis: str) -> list[list[int]]:
        """Rank lists that differ only along `axis` (one per combination of the others)."""
        return self._core.axis_comm_lists(axis)

    def filter_match(self, **filter_kwargs: int) -> list[int]:
        """Ranks whose coordinates match every given axis value."""
        return self._core.filter_match(self._coord_list(filter_kwargs, "filter_match()"))

    def get_axis_list(self, axis: str, idx: int) -> list[int]:
        """Ranks whose coordinate along `axis` is `idx`."""
        return self._core.axis_list(axis, idx)

    def world_size(self) -> int:
        return self._core.world_size()

    def p2p_pairs(self, axis: str = 'pipe') -> list[list[int]]:
        """For every rank, [rank, its successor along `axis`] (wrapping around)."""
        return self._core.ring_pairs(axis)

    def __str__(self) -> str:
        return str(self.mapping)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(axes={self.axes}, dims={self.dims})"


class PipeDataParallelTopology(ProcessTopology):
    """Pipeline x data parallelism; data is the fastest axis so gradient
    all-reduces stay on the closest ranks."""

    def __init__(self, num_pp: int, num_dp: int) -> None:
        super().__init__(axes=['pipe', 'data'], dims=[num_pp, num_dp])


class PipeModelDataParallelTopology(ProcessTopology):
    """Pipeline x data x model (tensor-slicing) parallelism."""

    def __init__(self, num_pp: int, num_mp: int, num_dp: int) -> None:
        super().__init__(axes=['pipe', 'data', 'model'], dims=[num_pp, num_dp, num_mp])


def as_topology(topology: Any) -> ProcessTopology:
    """Our ProcessTopology for `topology`, which may be DeepSpeed's."""
    if isinstance(topology, ProcessTopology):
        return topology
    if hasattr(topology, 'get_axis_names') and hasattr(topology, 'get_dim'):
        axes = list(topology.get_axis_names())
        return ProcessTopology(axes, [topology.get_dim(a) for a in axes])
    raise TypeError(f"topology must be a ProcessTopology (ours or DeepSpeed's), got {type(topology).__name__}")


def _default_topology(world_size):
    """DeepSpeed's default: alternate prime factors between pipe and data."""
    num_pp, num_dp = 1, 1
    for idx, prime in enumerate(_C.prime_factors(world_size)):
        if idx % 2 == 0:
            num_pp *= prime
        else:
            num_dp *= prime
    return PipeDataParallelTopology(num_pp=num_pp, num_dp=num_dp)


def _require_dist():
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: call deepspeed.init_distributed() "
                           "(or torch.distributed.init_process_group) before building a pipeline")


class PipelineParallelGrid:
    """The process groups of a pipeline job, as DeepSpeed's PipelineParallelGrid.

    Every rank must construct it (group creation is collective). It is also
    the `mpu` DeepSpeedEngine queries for data/model parallel groups.
    """
    dp_group: list[int]  # this rank's data-parallel ranks
    pp_group: list[int]  # this rank's pipeline ranks

    def __init__(self, topology: Any = None, process_group: "dist.ProcessGroup | None" = None) -> None:
        _require_dist()
        self.global_rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self._topo = _default_topology(self.world_size) if topology is None else as_topology(topology)
        if self._topo.world_size() != self.world_size:
            raise RuntimeError(f"topology {self._topo!r} has {self._topo.world_size()} ranks but the job has "
                               f"{self.world_size}: the product of the topology dims must equal the world size")
        self.data_parallel_size = max(self._topo.get_dim('data'), 1)
        self.pipe_parallel_size = max(self._topo.get_dim('pipe'), 1)
        self.model_parallel_size = max(self._topo.get_dim('model'), 1)
        self.slice_parallel_size = self.model_parallel_size

        self.stage_id = self.get_stage_id()
        self.data_parallel_id = self.get_data_parallel_id()

        # Everything but data parallelism: DeepSpeed checks overflow etc. over it.
        self.ds_model_proc_group, self.ds_model_rank, self.ds_model_world_size = None, -1, 0
        for dp in range(self.data_parallel_size):
            ranks = sorted(self._topo.get_axis_list(axis='data', idx=dp)) if 'data' in self._topo.axes \
                else list(range(self.world_size))
            group = dist.new_group(ranks=ranks)
            if self.global_rank in ranks:
                self.ds_model_proc_group = group
                self.ds_model_world_size = len(ranks)
                self.ds_model_rank = ranks.index(self.global_rank)

        self.dp_group, self.dp_proc_group = [], None
        self.dp_groups = self._topo.get_axis_comm_lists('data')
        for ranks in self.dp_groups:
            group = dist.new_group(ranks=ranks)
            if self.global_rank in ranks:
                self.dp_group, self.dp_proc_group = ranks, group
        if self.dp_proc_group is None:  # no 'data' axis: a data-parallel group of one
            self.dp_group = [self.global_rank]
            self.dp_proc_group = dist.new_group(ranks=[self.global_rank], use_local_synchronization=True)

        self.is_first_stage = self.stage_id == 0
        self.is_last_stage = self.stage_id == self.pipe_parallel_size - 1
        self.p2p_groups = self._build_p2p_groups()

        self.pp_group, self.pp_proc_group = [], None
        self.pipe_groups = self._topo.get_axis_comm_lists('pipe')
        for ranks in self.pipe_groups:
            group = dist.new_group(ranks=ranks)
            if self.global_rank in ranks:
                self.pp_group, self.pp_proc_group = ranks, group

        if self.model_parallel_size == 1:
            # Only this rank is in its slice group, so only it needs to create it.
            self.slice_group = [self.global_rank]
            self.slice_proc_group = dist.new_group(ranks=self.slice_group, use_local_synchronization=True)
        else:
            self.model_groups = self._topo.get_axis_comm_lists('model')
            for ranks in self.model_groups:
                group = dist.new_group(ranks=ranks)
                if self.global_rank in ranks:
                    self.slice_group, self.slice_proc_group = ranks, group

    def _build_p2p_groups(self):
        if 'pipe' not in self._topo.axes:
            return [[r, r] for r in range(self.world_size)]
        return self._topo.p2p_pairs('pipe')

    def get_stage_id(self) -> int:
        return self._coord_on('pipe')

    def get_data_parallel_id(self) -> int:
        return self._coord_on('data')

    def _coord_on(self, axis):
        idx = self._topo._core.axis_index(axis)
        return 0 if idx < 0 else self._topo._core.coord(self.global_rank)[idx]

    def stage_to_global(self, stage_id: int, **kwargs: int) -> int:
        """Global rank of `stage_id` with this rank's other coordinates (overridable by kwargs)."""
        coord = self._topo.get_coord(self.global_rank)._replace(pipe=stage_id, **kwargs)
        return self._topo.get_rank(**coord._asdict())

    def topology(self) -> ProcessTopology:
        return self._topo

    # MPU interface used by DeepSpeedEngine.
    def get_global_rank(self) -> int:
        return self.global_rank

    def get_pipe_parallel_rank(self) -> int:
        return self.get_stage_id()

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.get_pipe_parallel_rank()

    def get_pipe_parallel_world_size(self) -> int:
        return self.pipe_parallel_size

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.get_pipe_parallel_world_size()

    def get_pipe_parallel_group(self) -> "dist.ProcessGroup | None":
        return self.pp_proc_group

    def get_data_parallel_rank(self) -> int:
        return self.data_parallel_id

    def get_data_parallel_world_size(self) -> int:
        return self.data_parallel_size

    def get_data_parallel_group(self) -> "dist.ProcessGroup | None":
        return self.dp_proc_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.dp_group

    def get_model_parallel_rank(self) -> int:
        return self.ds_model_rank

    def get_model_parallel_world_size(self) -> int:
        return self.ds_model_world_size

    def get_model_parallel_group(self) -> "dist.ProcessGroup | None":
        return self.ds_model_proc_group

    def get_slice_parallel_rank(self) -> int:
        return self._coord_on('model')

    def get_tensor_model_parallel_rank(self) -> int:
        return self.get_slice_parallel_rank()

    def get_slice_parallel_world_size(self) -> int:
        return self.slice_parallel_size

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.get_slice_parallel_world_size()

    def get_tensor_model_parallel_group(self) -> "dist.ProcessGroup":
        """Megatron's name (DeepSpeed's activation checkpointing asks for it
        beside the rank and world size): the tensor-parallel group."""
        return self.get_slice_parallel_group()

    def get_slice_parallel_group(self) -> "dist.ProcessGroup":
        return self.slice_proc_group
