"""Functions run on every rank by test_module.py (through run_ranks)."""
import random

import torch
import torch.nn as nn
from deepspeed.pipe import LayerSpec as DSLayerSpec
from deepspeed.pipe import PipelineModule as DSPipelineModule
from deepspeed.pipe import TiedLayerSpec as DSTiedLayerSpec
from deepspeed.runtime.pipe import topology as ds_topo

import deepspeed_pipe_ext as dpe


class Block(nn.Module):

    def __init__(self, width, hidden):
        super().__init__()
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


def double(x):
    return 2 * x


def random_layer_list(rng, spec_classes):
    """A layer list mixing specs (ours or DeepSpeed's), modules and functions."""
    layer_spec, tied_spec = spec_classes
    width = 4
    layers = [tied_spec("embed", nn.Linear, width, width)] if rng.random() < 0.5 else []
    for _ in range(rng.randint(4, 14)):
        r = rng.random()
        if r < 0.45:
            layers.append(layer_spec(Block, width, rng.choice([2, 8, 32])))
        elif r < 0.65:
            layers.append(layer_spec(nn.Linear, width, width, bias=rng.random() < 0.5))
        elif r < 0.8:
            layers.append(nn.ReLU())
        elif r < 0.9:
            layers.append(double)
        else:
            layers.append(nn.Linear(width, width))
    if layers and isinstance(layers[0], (dpe.TiedLayerSpec, DSTiedLayerSpec)):
        layers.append(tied_spec("embed", nn.Linear, width, width))
    return layers


def layers_local_state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def check_parity_with_deepspeed(rank, world_size, num_cases, seed):
    """For many random layer lists, stage counts and methods: ours and
    DeepSpeed's PipelineModule give the same parts, build the same local
    layers with the same weights, and tie the same ranks."""
    rng = random.Random(seed)  # same on every rank
    stage_choices = [s for s in (1, 2, 4) if world_size % s == 0]
    checked = 0
    for case in range(num_cases):
        num_stages = rng.choice(stage_choices)
        method = rng.choice(["parameters", "uniform", "type:linear", "type:block|relu"])
        spec_classes = rng.choice([(dpe.LayerSpec, dpe.TiedLayerSpec), (DSLayerSpec, DSTiedLayerSpec)])
        layer_seed = rng.randrange(10**6)
        layers = random_layer_list(random.Random(layer_seed), spec_classes)
        if len(layers) < num_stages:
            continue

        def build(cls):
            torch.manual_seed(case)
            layers = random_layer_list(random.Random(layer_seed), spec_classes)
            return cls(layers=layers, num_stages=num_stages, loss_fn=nn.MSELoss(), partition_method=method)

        try:
            theirs = build(DSPipelineModule)
        except RuntimeError as err:  # e.g. 'type:' regex that matches no layer
            assert "found no valid layers" in str(err)
            continue
        ours = build(dpe.PipelineModule)
        assert isinstance(ours, DSPipelineModule)
        assert ours.parts == [int(p) for p in theirs.parts], (case, method, ours.parts, theirs.parts)
        assert (ours._local_start, ours._local_stop) == (theirs._local_start, theirs._local_stop)
        assert ours.stage_id == theirs.stage_id
        assert len(ours.forward_funcs) == len(theirs.forward_funcs)
        sd_ours, sd_theirs = layers_local_state(ours), layers_local_state(theirs)
        assert sd_ours.keys() == sd_theirs.keys()
        for k in sd_ours:
            assert torch.equal(sd_ours[k], sd_theirs[k]), (case, method, k)
        assert sorted(ours.tied_comms) == sorted(theirs.tied_comms)
        for key in ours.tied_comms:
            assert ours.tied_comms[key]["ranks"] == theirs.tied_comms[key]["ranks"]
        x = torch.randn(3, 4)
        assert ours.num_pipeline_stages() == theirs.num_pipeline_stages()
        if num_stages == 1:
            assert torch.equal(ours(x), theirs(x))
        checked += 1
    return checked


def check_constructor_variants_match_deepspeed(rank, world_size):
    """nn.Sequential layers, seed_layers (default and custom seed_fn), a
    topology argument (ours or DeepSpeed's) and checkpoint paths."""
    seeds_seen = []

    def my_seed(seed):
        seeds_seen.append(seed)
        torch.manual_seed(seed * 7)

    def build(cls, layers_fn, **kw):
        torch.manual_seed(123)
        return cls(layers=layers_fn(), loss_fn=nn.MSELoss(), **kw)

    seq = lambda: nn.Sequential(*[nn.Linear(4, 4) for _ in range(4)], nn.ReLU())
    specs = lambda: [DSLayerSpec(Block, 4, 8) for _ in range(6)]
    # seed_layers with 'uniform': DeepSpeed's own 'parameters' partition yields
    # numpy ints that its set_random_seed passes to random.seed, which rejects
    # them on Python 3.11 (a DeepSpeed bug ours does not have; see below).
    variants = [(seq, dict(num_stages=2)),
                (specs, dict(num_stages=2, seed_layers=True, partition_method="uniform")),
                (specs, dict(num_stages=2, seed_layers=True, seed_fn=my_seed, base_seed=99,
                             partition_method="uniform"))]
    if world_size == 4:
        variants += [(specs, dict(topology=ds_topo.PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=1))),
                     (specs, dict(topology=dpe.PipeDataParallelTopology(num_pp=4, num_dp=1)))]
    for layers_fn, kw in variants:
        theirs_kw = dict(kw)
        if isinstance(kw.get("topology"), dpe.ProcessTopology):
            t = kw["topology"]
            theirs_kw["topology"] = ds_topo.ProcessTopology(t.get_axis_names(), [t.get_dim(a) for a in t.axes])
        theirs = build(DSPipelineModule, layers_fn, **theirs_kw)
        ours = build(dpe.PipelineModule, layers_fn, **kw)
        assert ours.parts == [int(p) for p in theirs.parts], kw
        sd_ours, sd_theirs = layers_local_state(ours), layers_local_state(theirs)
        assert sd_ours.keys() == sd_theirs.keys()
        assert all(torch.equal(sd_ours[k], sd_theirs[k]) for k in sd_ours), kw
        for local in range(len(ours.forward_funcs)):
            assert ours.ckpt_layer_path("/ckpt", local) == theirs.ckpt_layer_path("/ckpt", local)
        assert ours.ckpt_prefix("/ckpt", "tag") == theirs.ckpt_prefix("/ckpt", "tag")
        assert ours.mpu().get_slice_parallel_rank() == theirs.mpu().get_slice_parallel_rank()
    assert seeds_seen and all(s >= 99 for s in seeds_seen)
    # Where DeepSpeed's PipelineModule crashes (seed_layers with 'parameters'), ours builds.
    seeded = build(dpe.PipelineModule, specs, num_stages=2, seed_layers=True)
    assert len(seeded.forward_funcs) == seeded.parts[seeded.stage_id + 1] - seeded.parts[seeded.stage_id]
    return len(variants)


def check_grid_matches_deepspeed(rank, world_size):
    """Our PipelineParallelGrid answers every query as DeepSpeed's does."""
    shapes = [ds_topo.PipeDataParallelTopology(num_pp=world_size, num_dp=1),
              ds_topo.PipeDataParallelTopology(num_pp=1, num_dp=world_size)]
    if world_size == 4:
        shapes += [ds_topo.PipeDataParallelTopology(num_pp=2, num_dp=2),
                   ds_topo.PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=1),
                   ds_topo.PipeModelDataParallelTopology(num_pp=1, num_mp=2, num_dp=2)]
    queries = ["get_stage_id", "get_data_parallel_id", "get_global_rank", "get_pipe_parallel_rank",
               "get_pipe_parallel_world_size", "get_data_parallel_rank", "get_data_parallel_world_size",
               "get_data_parallel_group_ranks", "get_model_parallel_rank", "get_model_parallel_world_size",
               "get_slice_parallel_rank", "get_slice_parallel_world_size"]
    import torch.distributed as dist
    for t in shapes + [None]:
        theirs = ds_topo.PipelineParallelGrid(topology=t)
        ours = dpe.PipelineParallelGrid(topology=t)
        for q in queries:
            assert getattr(ours, q)() == getattr(theirs, q)(), q
        for attr in ["p2p_groups", "dp_groups", "pipe_groups", "pp_group", "dp_group", "slice_group",
                     "is_first_stage", "is_last_stage", "data_parallel_size", "pipe_parallel_size",
                     "model_parallel_size"]:
            assert getattr(ours, attr) == getattr(theirs, attr), attr
        for s in range(ours.pipe_parallel_size):
            assert ours.stage_to_global(s) == theirs.stage_to_global(s)
        # The groups work: an all-reduce over each gives the group's size.
        for group, size in [(ours.get_data_parallel_group(), ours.data_parallel_size),
                            (ours.get_pipe_parallel_group(), ours.pipe_parallel_size),
                            (ours.get_model_parallel_group(), ours.get_model_parallel_world_size()),
                            (ours.get_slice_parallel_group(), ours.slice_parallel_size)]:
            one = torch.ones(1)
            dist.all_reduce(one, group=group)
            assert one.item() == size
    return True


def _error_of(fn):
    try:
        fn()
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None


def collect_bad_input_errors(rank, world_size):
    """Each bad input raises a clear error on every rank (no hang)."""
    mlp = lambda: [dpe.LayerSpec(nn.Linear, 4, 4) for _ in range(4)]
    cases = {
        "stages_not_dividing": lambda: dpe.PipelineModule(mlp(), num_stages=3),
        "unknown_method": lambda: dpe.PipelineModule(mlp(), num_stages=2, partition_method="magic"),
        "regex_no_match": lambda: dpe.PipelineModule(mlp(), num_stages=2, partition_method="type:conv"),
        "bad_layer": lambda: dpe.PipelineModule([nn.Linear(4, 4), 42, nn.ReLU()], num_stages=2),
        "more_stages_than_layers": lambda: dpe.PipelineModule(mlp()[:1], num_stages=2),
        "explicit_wrong_length": lambda: dpe.PipelineModule(mlp(), num_stages=2, partition_method=[0, 4]),
        "explicit_empty_stage": lambda: dpe.PipelineModule(mlp(), num_stages=2, partition_method=[0, 0, 4]),
        "explicit_wrong_end": lambda: dpe.PipelineModule(mlp(), num_stages=2, partition_method=[0, 2, 5]),
        "profile_without_inputs": lambda: dpe.PipelineModule(mlp(), num_stages=2, partition_method="profile"),
        "spec_of_non_module": lambda: dpe.LayerSpec(dict),
        "no_stages": lambda: dpe.PipelineModule(mlp()),
        "zero_stages": lambda: dpe.PipelineModule(mlp(), num_stages=0),
        "nested": lambda: dpe.PipelineModule([dpe.PipelineModule(mlp(), num_stages=2)], num_stages=2),
    }
    return {name: _error_of(fn) for name, fn in cases.items()}


def check_new_partition_methods(rank, world_size):
    """parameters-minmax, explicit boundaries and profile on a 2-stage pipeline."""
    import torch.distributed as dist

    from deepspeed_pipe_ext import partition
    out = {}
    widths = [8, 8, 64, 8, 8, 8, 8, 64]
    specs = lambda: [dpe.LayerSpec(Block, 8, h) for h in widths]
    m = dpe.PipelineModule(specs(), num_stages=2, partition_method="parameters-minmax")
    counts = [sum(p.numel() for p in Block(8, h).parameters()) for h in widths]
    out["minmax_parts"] = m.parts
    out["minmax_expected"] = partition.partition_minmax(counts, 2)
    out["minmax_weights"] = m.partition_weights == counts
    e = dpe.PipelineModule(specs(), num_stages=2, partition_method=[0, 3, 8])
    out["explicit_parts"] = e.parts
    out["explicit_local"] = len(e.forward_funcs)
    # Profiling: two heavy layers among light ones.
    heavy = [dpe.LayerSpec(Block, 256, 1024) if i in (1, 6) else nn.Tanh() for i in range(8)]
    torch.manual_seed(0)
    p = dpe.PipelineModule(heavy, num_stages=2, partition_method="profile", profile_inputs=torch.randn(64, 256))
    out["profile_parts"] = p.parts
    out["profile_costs"] = p.layer_costs
    out["profile_expected"] = partition.partition_minmax(p.layer_costs, 2)
    out["describe"] = p.describe_partition()
    parts = [None] * world_size
    dist.all_gather_object(parts, p.parts)
    out["profile_same_on_all_ranks"] = all(x == parts[0] for x in parts)
    return out


def check_virtual_stage_partitions(rank, world_size):
    """Every partition method over stages x 2 parts, in both layouts: the
    boundaries each method gives for 4 parts, and this rank's chunks."""
    from deepspeed.runtime import utils as ds_utils

    from deepspeed_pipe_ext import partition
    widths = [8, 8, 64, 8, 8, 8, 8, 64, 8, 32, 8, 8]
    specs = lambda: [dpe.LayerSpec(Block, 8, h) if i % 4 else nn.Tanh() for i, h in enumerate(widths)]
    counts = [sum(p.numel() for p in Block(8, h).parameters()) if i % 4 else 0 for i, h in enumerate(widths)]
    parts = 2 * world_size
    out = {}
    for layout in ("interleaved", "v"):
        for method in ("uniform", "parameters", "type:Block", "parameters-minmax", "profile", [0, 2, 5, 9, 12]):
            torch.manual_seed(0)
            extra = {"profile_inputs": torch.randn(4, 8)} if method == "profile" else {}
            m = dpe.PipelineModule(specs(), num_stages=world_size, partition_method=method, virtual_stages=2,
                                   virtual_layout=layout, **extra)
            if method == "uniform":
                expected = ds_utils.partition_uniform(len(widths), parts)
            elif method == "parameters":
                expected = ds_utils.partition_balanced(counts, parts)
            elif method == "type:Block":
                expected = ds_utils.partition_balanced([1 if c else 0 for c in counts], parts)
            elif method == "parameters-minmax":
                expected = partition.partition_minmax(counts, parts)
            elif method == "profile":
                expected = partition.partition_minmax(m.layer_costs, parts)
            else:
                expected = method
            mine = [m.part_of(c) for c in range(2)]
            out[(layout, str(method))] = {
                "parts": m.parts, "expected": expected, "my_parts": mine,
                "chunks": [m.chunk_bounds(c) for c in range(2)],
                "expected_chunks": [(expected[p], expected[p + 1]) for p in mine],
                "local_layers": len(m.forward_funcs),
                "describe": m.describe_partition()}
    return out
