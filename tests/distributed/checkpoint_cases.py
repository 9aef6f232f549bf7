"""Run on every rank by test_checkpoint.py: pipeline checkpoints saved
and loaded by DeepSpeed's PipelineEngine and ours, resumed, reshaped, broken."""
import os
import shutil

import deepspeed
import torch
import torch.distributed as dist
import torch.nn as nn
from deepspeed.pipe import PipelineModule as DSPipelineModule

import deepspeed_pipe_ext as dpe

SAVED_STEPS, MORE_STEPS, MICRO_BATCHES = 3, 2, 2
CONFIG = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": MICRO_BATCHES,
          "steps_per_print": 10**9,
          "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.05,
                                                       "warmup_num_steps": 4}}}


def layer_specs(spec, tied):
    """A weight tied between the first and last layer, activations without files."""
    return [tied("shared", nn.Linear, 8, 8, bias=False), nn.Tanh(), spec(nn.Linear, 8, 16), nn.ReLU(),
            spec(nn.Linear, 16, 8), tied("shared", nn.Linear, 8, 8, bias=False)]


def sequential_layers():
    """The same model as one nn.Sequential (what deployment loads into)."""
    shared = nn.Linear(8, 8, bias=False)
    return nn.Sequential(shared, nn.Tanh(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), shared)


def build(kind, num_stages, seed=3, extra_config=None, frozen_layer=None, virtual_stages=1, layout="interleaved"):
    """An engine from deepspeed.initialize: DeepSpeed's module and engine
    ('deepspeed') or ours ('ours'), SGD with momentum and a WarmupLR schedule."""
    if kind == "deepspeed":
        module_cls, spec, tied = DSPipelineModule, deepspeed.pipe.LayerSpec, deepspeed.pipe.TiedLayerSpec
    else:
        module_cls, spec, tied = dpe.PipelineModule, dpe.LayerSpec, dpe.TiedLayerSpec
    torch.manual_seed(seed)
    virtual = {} if virtual_stages == 1 else {"virtual_stages": virtual_stages, "virtual_layout": layout}
    net = module_cls(layers=layer_specs(spec, tied), num_stages=num_stages, loss_fn=nn.MSELoss(),
                     partition_method="uniform", **virtual)
    if virtual_stages > 1:
        schedule = "zb-v" if layout == "v" else "interleaved-1f1b"
        extra_config = {"pipeline": {"schedule": schedule}, **(extra_config or {})}
    if frozen_layer is not None and str(frozen_layer) in net._modules:
        net._modules[str(frozen_layer)].requires_grad_(False)
    engine, _, _, _ = deepspeed.initialize(model=net, config={**CONFIG, **(extra_config or {})},
                                           optimizer=torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9),
                                           model_parameters=net.parameters())
    assert (type(engine) is dpe.PipelineEngine) == (kind == "ours"), type(engine)
    return engine


def step_batches(step, dp_id):
    g = torch.Generator().manual_seed(1000 * step + dp_id)
    return [(torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)) for _ in range(MICRO_BATCHES)]


def train(engine, first_step, steps):
    """Each step has its own batches, so a resumed run sees what an uninterrupted one does."""
    dp_id = engine.grid.data_parallel_id
    return [engine.train_batch(data_iter=iter(step_batches(s, dp_id))).item()
            for s in range(first_step, first_step + steps)]


EVAL_INPUT = torch.randn(3, 8, generator=torch.Generator().manual_seed(77))


def evaluate(engine):
    """(loss, logits of EVAL_INPUT on the last stage, else None)."""
    loss, logits = engine.eval_batch(iter([(EVAL_INPUT, torch.zeros(3, 8))]), return_logits=True,
                                     num_micro_batches=1)
    return loss.item(), logits


def weights(engine):
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def state(engine):
    return {"global_steps": engine.global_steps, "lr": engine.get_lr()[0]}


def interop_and_save(rank, world_size, root):
    """Each engine trains SAVED_STEPS, saves, trains MORE_STEPS; a fresh engine of
    the other kind loads that checkpoint and trains the same MORE_STEPS."""
    out = {}
    for kind in ("deepspeed", "ours"):
        engine = build(kind, 2)
        first = train(engine, 0, SAVED_STEPS)
        engine.save_checkpoint(os.path.join(root, kind))
        more = train(engine, SAVED_STEPS, MORE_STEPS)
        out[kind] = {"first": first, "more": more, "weights": weights(engine), "state": state(engine)}
    for kind, other in (("ours", "deepspeed"), ("deepspeed", "ours")):
        engine = build(kind, 2, seed=99)  # other initial weights: the load must replace them
        path, _ = engine.load_checkpoint(os.path.join(root, other))
        loaded = state(engine)
        more = train(engine, SAVED_STEPS, MORE_STEPS)
        out[f"{kind}_from_{other}"] = {"path": path, "loaded": loaded, "more": more, "weights": weights(engine)}
    return out


def resume(rank, world_size, root):
    """In fresh processes: load our checkpoint, evaluate, train MORE_STEPS."""
    engine = build("ours", 2, seed=99)
    engine.load_checkpoint(os.path.join(root, "ours"))
    loaded = state(engine)
    evaluation = evaluate(engine)
    more = train(engine, SAVED_STEPS, MORE_STEPS)
    return {"loaded": loaded, "eval": evaluation, "more": more, "weights": weights(engine),
            "bad_files": bad_files(engine, rank, os.path.join(root, "ours"), root)}


def _truncate(path):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])


def _other_model(path):
    torch.save({"weight": torch.zeros(4, 4), "bias": torch.zeros(4)}, path)


def _other_keys(path):
    torch.save({"w": torch.zeros(16, 8), "b": torch.zeros(16)}, path)


BREAKAGES = {
    "layer_missing": ("layer_04-model_states.pt", os.remove),
    "layer_truncated": ("layer_02-model_states.pt", _truncate),
    "layer_other_model": ("layer_02-model_states.pt", _other_model),
    "layer_other_keys": ("layer_04-model_states.pt", _other_keys),
    "mp_rank_missing": ("mp_rank_01_model_states.pt", os.remove),
    "mp_rank_truncated": ("mp_rank_00_model_states.pt", _truncate),
}


def _attempt(load):
    try:
        return f"loaded: {load()}"
    except Exception as err:
        return f"{type(err).__name__}: {err}"


def bad_files(engine, rank, good, root):
    """Each breakage on a copy of a good checkpoint: what load_checkpoint says on this rank."""
    out = {}
    tag = open(os.path.join(good, "latest")).read().strip()
    for name, (filename, breakage) in BREAKAGES.items():
        copy = os.path.join(root, f"bad_{name}")
        if rank == 0:
            shutil.copytree(good, copy)
            breakage(os.path.join(copy, tag, filename))
        dist.barrier()
        out[name] = _attempt(lambda: engine.load_checkpoint(copy))
    out["no_tag"] = _attempt(lambda: engine.load_checkpoint(good, tag="global_step999"))
    out["no_latest"] = _attempt(lambda: engine.load_checkpoint(os.path.join(root, "empty")))
    dist.barrier()
    return out


def reshape_parallel_write_frozen(rank, world_size, root):
    """4 ranks. Saved by 4 stages, loaded by 2 stages (x DP 2) and 1 stage (x DP 4);
    checkpoint_parallel_write_pipeline with DP 2; exclude_frozen_parameters."""
    out = {}
    s4 = build("ours", 4)
    train(s4, 0, SAVED_STEPS)
    s4.save_checkpoint(os.path.join(root, "s4"))
    out["s4"] = {"weights": weights(s4), "eval": evaluate(s4)[0], "state": state(s4)}
    for stages, kwargs in ((2, {"load_optimizer_states": False}), (1, {"load_module_only": True})):
        engine = build("ours", stages, seed=99)
        refused = _attempt(lambda: engine.load_checkpoint(os.path.join(root, "s4")))
        engine.load_checkpoint(os.path.join(root, "s4"), **kwargs)
        out[f"s{stages}"] = {"refused": refused, "weights": weights(engine), "eval": evaluate(engine)[0],
                             "state": state(engine)}

    parallel = {"checkpoint": {"parallel_write": {"pipeline_stage": True}}}  # checkpoint_parallel_write_pipeline
    writer = build("ours", 2, extra_config=parallel)
    written, save = [], writer.checkpoint_engine.save
    writer.checkpoint_engine.save = lambda state_dict, path: (written.append(os.path.basename(path)),
                                                              save(state_dict, path))[1]
    train(writer, 0, 1)
    writer.save_checkpoint(os.path.join(root, "parallel"))
    reader = build("ours", 2, seed=99, extra_config=parallel)
    reader.load_checkpoint(os.path.join(root, "parallel"))
    out["parallel"] = {"written": written, "saved": weights(writer), "loaded": weights(reader),
                       "dp_id": writer.grid.data_parallel_id, "stage": writer.stage_id}

    frozen = build("ours", 2, frozen_layer=2)
    train(frozen, 0, 1)
    frozen.save_checkpoint(os.path.join(root, "frozen"), exclude_frozen_parameters=True)
    fresh = build("ours", 2, seed=99, frozen_layer=2)
    fresh_weights = weights(fresh)
    strict = _attempt(lambda: fresh.load_checkpoint(os.path.join(root, "frozen")))
    fresh.load_checkpoint(os.path.join(root, "frozen"), load_module_strict=False)
    out["frozen"] = {"strict": strict, "saved": weights(frozen), "fresh": fresh_weights, "loaded": weights(fresh)}
    return out


def virtual_stage_checkpoints(rank, world_size, root, layout="interleaved"):
    """Two chunks per rank (in `layout`): save and resume (bitwise); that
    checkpoint's weights into one chunk per rank, into DeepSpeed's engine and
    into the other layout, and DeepSpeed's back into two chunks per rank (the
    eval loss equal each time)."""
    out = {}
    other = "interleaved" if layout == "v" else "v"
    v2 = build("ours", 2, virtual_stages=2, layout=layout)
    out["first"] = train(v2, 0, SAVED_STEPS)
    v2.save_checkpoint(os.path.join(root, "v2"))
    out["eval_v2"] = evaluate(v2)[0]
    out["continued"] = train(v2, SAVED_STEPS, MORE_STEPS)
    with open(os.path.join(root, "v2", "latest")) as f:
        out["files"] = sorted(os.listdir(os.path.join(root, "v2", f.read().strip())))
    resumed = build("ours", 2, seed=99, virtual_stages=2, layout=layout)
    resumed.load_checkpoint(os.path.join(root, "v2"))
    out["resumed"] = train(resumed, SAVED_STEPS, MORE_STEPS)
    for kind in ("ours", "deepspeed"):  # one chunk per rank: the weights (their optimizer state is laid out per chunk)
        engine = build(kind, 2, seed=99)
        engine.load_checkpoint(os.path.join(root, "v2"), load_module_only=True)
        out[f"eval_{kind}_from_v2"] = evaluate(engine)[0]
        if kind == "deepspeed":
            engine.save_checkpoint(os.path.join(root, "deepspeed"))
    back = build("ours", 2, seed=99, virtual_stages=2, layout=layout)
    back.load_checkpoint(os.path.join(root, "deepspeed"), load_module_only=True)
    out["eval_v2_from_deepspeed"] = evaluate(back)[0]
    moved = build("ours", 2, seed=99, virtual_stages=2, layout=other)
    moved.load_checkpoint(os.path.join(root, "v2"), load_module_only=True)
    out["eval_other_layout_from_v2"] = evaluate(moved)[0]
    return out
