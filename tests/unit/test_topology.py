"""Topology rank math: parity with deepspeed.runtime.pipe.topology, bad input."""
import itertools
import random

import pytest
from deepspeed.runtime.pipe import topology as ds_topo

from deepspeed_pipe_ext import topology as topo

AXIS_NAMES = ["pipe", "data", "model", "x", "expert"]


def shapes():
    rng = random.Random(0)
    out = [(["pipe", "data"], [1, 1]), (["pipe", "data"], [4, 2]), (["pipe", "data", "model"], [2, 2, 2])]
    for _ in range(60):
        k = rng.randint(1, 4)
        axes = rng.sample(AXIS_NAMES, k)
        dims = [rng.randint(1, 4) for _ in range(k)]
        out.append((axes, dims))
    return out


def assert_same_topology(ours, theirs):
    axes = theirs.get_axis_names()
    assert ours.get_axis_names() == axes
    assert ours.world_size() == theirs.world_size()
    assert str(ours) == str(theirs)
    for axis in AXIS_NAMES:
        assert ours.get_dim(axis) == theirs.get_dim(axis)
        assert ours.get_axis_comm_lists(axis) == theirs.get_axis_comm_lists(axis)
    for rank in range(theirs.world_size()):
        c_ours, c_theirs = ours.get_coord(rank), theirs.get_coord(rank)
        assert tuple(c_ours) == tuple(c_theirs) and c_ours._fields == c_theirs._fields
        assert ours.get_rank(**c_theirs._asdict()) == rank
        assert ours.get_rank_repr(rank) == theirs.get_rank_repr(rank)
        assert ours.get_rank_repr(rank, omit_axes=[]) == theirs.get_rank_repr(rank, omit_axes=[])
        assert ours.get_rank_repr(rank, omit_axes=axes[:1], inner_sep=':', outer_sep='/') == \
            theirs.get_rank_repr(rank, omit_axes=axes[:1], inner_sep=':', outer_sep='/')
    dims = [theirs.get_dim(a) for a in axes]
    for axis, dim in zip(axes, dims):
        for idx in range(dim):
            assert ours.get_axis_list(axis, idx) == theirs.get_axis_list(axis, idx)
    for subset_size in range(len(axes) + 1):
        for subset in itertools.combinations(axes, subset_size):
            for values in itertools.product(*[range(theirs.get_dim(a)) for a in subset]):
                kw = dict(zip(subset, values))
                assert ours.filter_match(**kw) == theirs.filter_match(**kw)


@pytest.mark.parametrize("axes,dims", shapes())
def test_process_topology_matches_deepspeed(axes, dims):
    assert_same_topology(topo.ProcessTopology(axes, dims), ds_topo.ProcessTopology(axes, dims))


@pytest.mark.parametrize("pp,dp,mp", [(1, 1, 1), (2, 1, 3), (4, 2, 1), (3, 2, 2), (8, 1, 2)])
def test_specialised_topologies_match_deepspeed(pp, dp, mp):
    assert_same_topology(topo.PipeDataParallelTopology(num_pp=pp, num_dp=dp),
                         ds_topo.PipeDataParallelTopology(num_pp=pp, num_dp=dp))
    assert_same_topology(topo.PipeModelDataParallelTopology(num_pp=pp, num_mp=mp, num_dp=dp),
                         ds_topo.PipeModelDataParallelTopology(num_pp=pp, num_mp=mp, num_dp=dp))


def test_deepspeed_topology_converts():
    theirs = ds_topo.PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=3)
    assert_same_topology(topo.as_topology(theirs), theirs)


def test_default_grid_topology_matches_deepspeed_prime_split():
    from deepspeed_pipe_ext import _C
    for n in range(1, 200):
        assert _C.prime_factors(n) == ds_topo._prime_factors(n)
        expected_pp = 1
        for i, p in enumerate(ds_topo._prime_factors(n)):
            expected_pp *= p if i % 2 == 0 else 1
        assert topo._default_topology(n).get_dim('pipe') == expected_pp


def test_bad_topologies():
    with pytest.raises(ValueError, match="every dim must be >= 1"):
        topo.ProcessTopology(["pipe", "data"], [2, 0])
    with pytest.raises(ValueError, match="appears twice"):
        topo.ProcessTopology(["pipe", "pipe"], [2, 2])
    with pytest.raises(ValueError, match="2 axes but 1 dims"):
        topo.ProcessTopology(["pipe", "data"], [2])
    t = topo.PipeDataParallelTopology(num_pp=2, num_dp=2)
    with pytest.raises(ValueError, match="rank 4 not found"):
        t.get_coord(4)
    with pytest.raises(ValueError, match="does not support slices"):
        t.get_rank(pipe=1)
    with pytest.raises(ValueError, match="outside"):
        t.get_rank(pipe=2, data=0)
    with pytest.raises(ValueError, match="unknown axis"):
        t.get_rank(pipe=0, model=0)
    with pytest.raises(ValueError, match="no axis 'model'"):
        t.get_axis_list('model', 0)
    with pytest.raises(ValueError, match="unknown axis"):
        t.filter_match(model=0)
    with pytest.raises(TypeError, match="ProcessTopology"):
        topo.as_topology(object())
