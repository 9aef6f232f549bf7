"""Pipeline checkpoints in DeepSpeed's layout, checked before they are trusted.

The layout is DeepSpeed's, so its PipelineEngine and ours read each other's files:

    DIR/latest                                   the newest tag (written by save_checkpoint)
    DIR/TAG/mp_rank_XX_model_states.pt           one per stage (x tensor-parallel rank): optimizer,
                                                 LR scheduler, step counters; 'module' is None
    DIR/TAG/layer_LL[-model_MM]-model_states.pt  one per layer that has a state_dict (global index LL;
                                                 -model_MM only when the topology has a 'model' axis)

DeepSpeed loads these with asserts and silent fallbacks: a missing layer file is
a bare AssertionError on one rank while its peers wait, a stage-count change maps
every stage to stage 0's optimizer state. Here every rank checks the files it
will read before anything is loaded, the ranks agree on the outcome, and a
problem is an error on every rank naming the file, the layer and the stage.
"""
import glob
import os
import re
from collections import OrderedDict
from collections.abc import Mapping

import torch
import torch.distributed as dist

from . import _deepspeed_compat

__all__ = ["CheckpointError", "CheckpointFileMissingError", "to_sequential_state_dict"]

MODEL_STATES = "mp_rank_{:02d}_model_states.pt"
_LAYER_FILE = re.compile(r"layer_(\d+)-(?:(.+)-)?model_states\.pt$")


class CheckpointError(RuntimeError):
    """A pipeline checkpoint that cannot be loaded as asked."""


class CheckpointFileMissingError(CheckpointError, FileNotFoundError):
    """A file the checkpoint should have is not there."""


# ---------------------------------------------------------------------- files
def read_latest_tag(checkpoint_dir, latest_name="latest"):
    """The tag in DIR/latest, or None when there is no such file."""
    path = os.path.join(checkpoint_dir, latest_name)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip()


def require_tag_dir(checkpoint_dir, tag):
    tag_dir = os.path.join(checkpoint_dir, str(tag))
    if not os.path.isdir(tag_dir):
        tags = sorted(d for d in os.listdir(checkpoint_dir) if os.path.isdir(os.path.join(checkpoint_dir, d))) \
            if os.path.isdir(checkpoint_dir) else []
        raise CheckpointFileMissingError(f"checkpoint {tag_dir} does not exist (tags in {checkpoint_dir}: "
                                         f"{', '.join(tags) or 'none'}): pass an existing tag")
    return tag_dir


def read_file(path, what, load=None):
    """torch.load a checkpoint file, turning every failure into an error naming it."""
    if not os.path.isfile(path):
        raise CheckpointFileMissingError(f"{what}: {path} is missing (a save that did not finish, or a file not "
                                         "copied?): save the checkpoint again or load another tag")
    try:
        return load(path) if load is not None else torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(f"{what}: cannot read {path} ({type(err).__name__}: {_first_sentence(err)}); "
                              "the file is truncated or corrupt (an interrupted save or copy?): save the "
                              "checkpoint again or load another tag") from err


def _first_sentence(err):
    return str(err).strip().split("\n")[0].split(". ")[0][:200]


def peek_file(path, what):
    """Load without reading the tensors' bytes (mmap), to check a file opens and
    see its keys and shapes; falls back to a full load for pre-zip files."""
    def load(p):
        try:
            return torch.load(p, map_location="cpu", mmap=True, weights_only=False)
        except Exception:
            return torch.load(p, map_location="cpu", weights_only=False)
    return read_file(path, what, load)


# ---------------------------------------------------------------------- one stage's layers
def _where(module):
    return f"stage {module.stage_id} (global rank {module.global_rank})"


def _stateful_layers(module):
    """(local index, layer) for the layers that have files: DeepSpeed skips the rest."""
    return [(i, layer) for i, layer in enumerate(module.forward_funcs) if hasattr(layer, "load_state_dict")]


def _layer_number(module, local_idx):
    """The number in the whole pipeline of this rank's `local_idx`-th layer
    (ours may hold several non-contiguous chunks; DeepSpeed's holds one run)."""
    if hasattr(module, "global_layer_index"):
        return module.global_layer_index(local_idx)
    return _deepspeed_compat.module_layers(module)[1] + local_idx


def layer_file(module, tag_dir, local_idx):
    """The file this rank reads for a layer: the name it would write itself.
    Shards of another tensor-parallel layout are refused: merging them is
    model-specific (DeepSpeed's loader applies Megatron's rules to any model)."""
    path = module.ckpt_layer_path(tag_dir, local_idx)
    if os.path.isfile(path):
        return path
    layer_idx = _layer_number(module, local_idx)
    others = module.ckpt_layer_path_list(tag_dir, local_idx)
    if others:
        raise CheckpointError(f"{_where(module)}: layer {layer_idx} has no file {os.path.basename(path)} but "
                              f"{', '.join(os.path.basename(p) for p in others)}: the checkpoint was saved with "
                              "another tensor-parallel ('model' axis) layout, and merging or splitting shards is "
                              "model-specific: load it with the topology that saved it")
    raise CheckpointFileMissingError(f"{_where(module)}: layer {layer_idx}'s checkpoint file {path} is missing (a "
                                     "save that did not finish, or a file not copied?): save the checkpoint again "
                                     "or load another tag")


def check_layer_state(state, layer, path, where, layer_idx, strict=True):
    """Keys and shapes of a layer file against the layer; a clear error on mismatch."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{where}: layer {layer_idx}'s file {path} holds a {type(state).__name__}, not a "
                              "layer's state_dict")
    expected = layer.state_dict()
    problems = [f"{k} has shape {tuple(state[k].shape)} in the file and {tuple(v.shape)} in the model"
                for k, v in expected.items()
                if k in state and torch.is_tensor(v) and torch.is_tensor(state[k]) and state[k].shape != v.shape]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if strict and missing:
        problems.append(f"missing keys {missing}")
    if strict and unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if not problems:
        return
    message = (f"{where}: layer {layer_idx} ({type(layer).__name__}) does not match its checkpoint file {path}: "
               f"{'; '.join(problems)}. ")
    frozen = {n for n, p in layer.named_parameters() if not p.requires_grad}
    if missing and set(missing) <= frozen and not unexpected and len(problems) == 1:
        message += ("The missing keys are frozen parameters (requires_grad=False): a checkpoint saved with "
                    "exclude_frozen_parameters=True leaves them out; load it with load_module_strict=False.")
    else:
        message += "The file was saved from a different model: build the pipeline from the layer list that saved it."
    raise CheckpointError(message)


def check_stage_layers(module, tag_dir, strict=True):
    """Every layer file this stage will read exists, opens and fits its layer."""
    for local_idx, layer in _stateful_layers(module):
        path = layer_file(module, tag_dir, local_idx)
        layer_idx = _layer_number(module, local_idx)
        state = peek_file(path, f"{_where(module)}: layer {layer_idx}")
        check_layer_state(state, layer, path, _where(module), layer_idx, strict)


# ---------------------------------------------------------------------- engine hooks
def save_module_layers(engine, exclude_frozen_parameters=False):
    """DeepSpeed's PipelineEngine.module_state_dict: each layer to its own file
    (data-parallel rank 0, or spread over the data-parallel ranks with
    checkpoint_parallel_write_pipeline); the mp_rank file gets module=None."""
    tag_dir = _deepspeed_compat.checkpoint_tag_dir(engine)
    if tag_dir is None:
        raise RuntimeError("a pipeline engine's module_state_dict() writes per-layer files and only runs inside "
                           "save_checkpoint(); to save the weights alone use engine.module.save_state_dict(dir, "
                           "checkpoint_engine)")
    engine.module.save_state_dict(tag_dir, checkpoint_engine=engine.checkpoint_engine,
                                  exclude_frozen_params=exclude_frozen_parameters)
    return None


def load_module_layers(engine, checkpoint, strict=True, custom_load_fn=None):
    """DeepSpeed's PipelineEngine.load_module_state_dict, every layer file checked
    against its layer before it is loaded."""
    if custom_load_fn is not None:
        raise ValueError("custom_load_fn is not supported with pipeline parallelism: the weights come from "
                         "per-layer files (DeepSpeed's PipelineEngine refuses it too)")
    from deepspeed.runtime.engine import DeepSpeedEngine
    state_dict = checkpoint if engine.has_moe_layers else checkpoint["module"]
    if state_dict is not None and not isinstance(state_dict, str):
        # A whole-model state_dict (saved by a non-pipeline engine): DeepSpeed's plain path.
        DeepSpeedEngine.load_module_state_dict(engine, checkpoint, strict)
        return
    module, tag_dir = engine.module, _deepspeed_compat.checkpoint_tag_dir(engine)
    for local_idx, layer in _stateful_layers(module):
        path = layer_file(module, tag_dir, local_idx)
        layer_idx = _layer_number(module, local_idx)
        state = read_file(path, f"{_where(module)}: layer {layer_idx}",
                          lambda p: engine.checkpoint_engine.load(p, map_location="cpu"))
        check_layer_state(state, layer, path, _where(module), layer_idx, strict)
        layer.load_state_dict(state, strict=strict)
    _deepspeed_compat.synchronize_tied_weights(module)


def check_before_load(engine, load_dir, tag=None, load_optimizer_states=True, load_module_only=False,
                      load_module_strict=True):
    """Run by PipelineEngine.load_checkpoint before DeepSpeed's: every rank checks
    what it will read, then all ranks raise if any rank found a problem (so no
    rank goes on to wait for a peer that failed). A missing `latest` file is left
    to DeepSpeed (it warns and returns (None, None))."""
    if engine.load_universal_checkpoint():
        return  # another layout (zero/ folders), read by DeepSpeed's universal loader
    problem = None
    try:
        _check_local_files(engine, load_dir, tag, load_optimizer_states and not load_module_only, load_module_strict)
    except Exception as err:  # reported to every rank below, then raised here
        problem = err
    _raise_on_every_rank(problem)


def _check_local_files(engine, load_dir, tag, loads_optimizer, strict):
    if tag is None:
        tag = read_latest_tag(load_dir)
        if tag is None:
            return
    tag_dir = require_tag_dir(load_dir, tag)
    where = _where(engine.module)
    first = os.path.join(tag_dir, MODEL_STATES.format(0))
    saved = peek_file(first, f"{where}: model states")
    found = len(glob.glob(os.path.join(tag_dir, "mp_rank_*_model_states.pt")))
    saved_mp = saved.get("mp_world_size", found)
    missing = [MODEL_STATES.format(r) for r in range(saved_mp)
               if not os.path.isfile(os.path.join(tag_dir, MODEL_STATES.format(r)))]
    if missing:
        raise CheckpointFileMissingError(f"{where}: {tag_dir} was saved by {saved_mp} model-parallel ranks but "
                                         f"{', '.join(missing)} is missing (a save that did not finish, or a file "
                                         "not copied?): save the checkpoint again or load another tag")
    if found != saved_mp:  # DeepSpeed asserts on this too
        raise CheckpointError(f"{where}: {tag_dir} has {found} mp_rank_XX_model_states.pt files but was saved by "
                              f"{saved_mp} ranks: files left from another save? Remove them or save again")
    if saved_mp == engine.mp_world_size:
        own = _deepspeed_compat.checkpoint_file_name(engine, load_dir, tag)
        if own != first:
            saved = peek_file(own, f"{where}: model states")
    elif loads_optimizer:
        dims = saved.get("checkpoint_parallel_dimensions") or {}
        tp = engine.grid.get_slice_parallel_world_size()
        was = dims.get("pp_degree", saved_mp // max(tp, 1))
        now = engine.grid.pipe_parallel_size
        raise CheckpointError(
            f"{where}: {tag_dir} was saved by {was} pipeline stages (model-parallel world size {saved_mp}) and this "
            f"engine has {now} (model-parallel world size {engine.mp_world_size}): the optimizer state is saved per "
            f"stage and cannot follow a change from {was} to {now} stages (DeepSpeed's loader hands every stage "
            "stage 0's optimizer state). To load the weights alone pass load_optimizer_states=False (the LR "
            "scheduler and step counters still load; add load_lr_scheduler_states=False to skip the scheduler) or "
            "load_module_only=True")
    module_entry = saved if engine.has_moe_layers else saved.get("module")
    if module_entry is None or isinstance(module_entry, str):
        check_stage_layers(engine.module, tag_dir, strict)


def _raise_on_every_rank(problem):
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        if problem is not None:
            raise problem
        return
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, None if problem is None else f"{type(problem).__name__}: {problem}")
    if problem is not None:
        raise problem
    failed = [r for r in reports if r is not None]
    if failed:
        raise CheckpointError("the checkpoint was not loaded because other ranks cannot read it:\n  " +
                              "\n  ".join(failed))


# ---------------------------------------------------------------------- deployment
def to_sequential_state_dict(checkpoint_dir, tag=None, model_rank=None):
    """One state_dict for nn.Sequential(*layers) from a pipeline checkpoint:
    keys f"{layer_index}.{name}", from the per-layer files (tag None: the tag in
    `latest`). A tied layer's index gets the tied module's weights. Layers
    without a file (functions, tied layers with a forward_fn) have no keys.
    With tensor-parallel shards (-model_MM files), `model_rank` picks one."""
    if tag is None:
        tag = read_latest_tag(checkpoint_dir)
        if tag is None:
            raise CheckpointFileMissingError(f"{os.path.join(checkpoint_dir, 'latest')} is missing: pass the tag "
                                             "to read (a folder of the checkpoint directory)")
    tag_dir = require_tag_dir(checkpoint_dir, tag)
    shards = {}
    for path in glob.glob(os.path.join(tag_dir, "layer_*-model_states.pt")):
        match = _LAYER_FILE.search(os.path.basename(path))
        if match:
            shards.setdefault(int(match.group(1)), {})[match.group(2) or ""] = path
    if not shards:
        raise CheckpointFileMissingError(f"{tag_dir} has no layer_XX-model_states.pt files: not a pipeline "
                                         "checkpoint (or its layer files were not copied)")
    state = OrderedDict()
    for layer_idx in sorted(shards):
        path = _pick_shard(shards[layer_idx], layer_idx, model_rank)
        layer_state = read_file(path, f"layer {layer_idx}",
                                lambda p: torch.load(p, map_location="cpu", weights_only=True))
        if not isinstance(layer_state, Mapping):
            raise CheckpointError(f"layer {layer_idx}: {path} holds a {type(layer_state).__name__}, not a state_dict")
        state.update((f"{layer_idx}.{name}", value) for name, value in layer_state.items())
    return state


def _pick_shard(by_rank, layer_idx, model_rank):
    if model_rank is None:
        if len(by_rank) == 1:
            return next(iter(by_rank.values()))
        raise CheckpointError(f"layer {layer_idx} has {len(by_rank)} tensor-parallel shards "
                              f"({', '.join(os.path.basename(p) for p in sorted(by_rank.values()))}); merging them "
                              "is model-specific: pass model_rank (--model-rank) to take one rank's shard")
    name = f"model_{model_rank:02d}"
    if name not in by_rank:
        raise CheckpointFileMissingError(f"layer {layer_idx} has no shard of model rank {model_rank} (files: "
                                         f"{', '.join(os.path.basename(p) for p in sorted(by_rank.values()))})")
    return by_rank[name]
