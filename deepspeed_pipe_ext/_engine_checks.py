"""What PipelineEngine refuses before it builds anything, with the fix in the
message: ZeRO stages pipelines cannot use, schedules the runtime cannot run,
a schedule that does not fit the module's model chunks, a bad p2p timeout."""
from deepspeed.runtime.zero.config import ZeroStageEnum

from ._native import _C
from ._placement import model_chunks
from .schedule import load_schedule

# Every set below is derived from what C++ says of each kind (_C.ScheduleKind).
_TRAINING_KINDS = {kind.config_name: kind for kind in _C.ScheduleKind.__members__.values() if kind.trains}
# Schedules the executor runs end to end with one model chunk per rank.
RUNNABLE_SCHEDULES = frozenset(name for name, kind in _TRAINING_KINDS.items() if kind.max_chunks == 1)
# Schedules over several model chunks per rank, and the module layout each needs.
VIRTUAL_STAGE_SCHEDULES = {name: kind.layout.config_name for name, kind in _TRAINING_KINDS.items()
                           if kind.min_chunks > 1}
# Schedules that split the backward: the loss backward is the executor's, so
# DeepSpeedEngine's backward wrappers (ZeRO, bf16, autocast...) cannot run.
SPLIT_BACKWARD_SCHEDULES = frozenset(name for name, kind in _TRAINING_KINDS.items() if kind.splits_backward)


def resolve_auto_schedule(config, module):
    """"schedule": "auto" runs what the module's planner picked
    (partition_method='auto'): its schedule and checkpoint interval go into
    the config, once the plan was made for this config's micro-batches and
    memory cap."""
    pipeline = config.pipeline
    if pipeline.get("schedule") != "auto":
        return
    plan = getattr(module, "plan", None)
    if plan is None or plan.best is None:
        raise ValueError("\"schedule\": \"auto\" runs the plan of a PipelineModule built with "
                         "partition_method='auto' (and planner={'micro_batches': ..., 'memory_per_rank': ...}); "
                         "this module was partitioned otherwise: build it that way, or name a schedule")
    from .planner import parse_bytes
    best = plan.best
    if best.micro_batches != config.gradient_accumulation_steps:
        raise ValueError(f"the module's plan is for {best.micro_batches} micro-batches, the config's "
                         f"gradient_accumulation_steps is {config.gradient_accumulation_steps}: plan with "
                         f"planner={{'micro_batches': {config.gradient_accumulation_steps}}} or change the config")
    cap = pipeline.get("memory_per_rank")
    if cap is not None and parse_bytes(cap) != plan.memory_per_rank:
        raise ValueError(f"the config's memory_per_rank ({cap}) is not the cap the module was planned under "
                         f"({plan.memory_per_rank:.0f} bytes): give PipelineModule planner={{'memory_per_rank': "
                         f"{cap!r}}}")
    pipeline["schedule"] = best.schedule
    pipeline["activation_checkpoint_interval"] = best.checkpoint_interval


def check_supported(config, module):
    """Clear errors for configurations this engine cannot run (yet)."""
    resolve_auto_schedule(config, module)
    stage = config.zero_optimization_stage
    if stage >= ZeroStageEnum.gradients:
        raise ValueError(f"ZeRO stage {int(stage)} partitions gradients, which pipeline parallelism cannot use: "
                         "set zero_optimization.stage to 0 or 1")
    kind = config.pipeline.get("schedule", "1f1b")
    check_layout(kind, module)
    if kind in VIRTUAL_STAGE_SCHEDULES:
        return
    if kind not in RUNNABLE_SCHEDULES and load_schedule(kind) is None:
        raise ValueError(f"schedule {kind!r} cannot run on the pipeline runtime yet: choose one of "
                         f"{sorted(RUNNABLE_SCHEDULES)} or the path of a compute-order CSV file (the others can be "
                         "simulated with deepspeed_pipe_ext.schedule.simulate)")


def check_layout(kind, module):
    """A built-in schedule must match the module's model chunks per rank and
    their layout; a compute order must name the module's chunks."""
    chunks, layout = model_chunks(module)
    built = f"virtual_stages={chunks}" + (f", virtual_layout={layout!r}" if chunks > 1 else "")
    order = load_schedule(kind)
    if order is not None:
        if (order.chunks, order.layout) != (chunks, layout) and order.chunks > 1:
            raise ValueError(f"the compute order places {order.chunks} model chunks per rank in the {order.layout!r} "
                             f"layout, but the PipelineModule is built with {built}: build it to match the order")
        if order.chunks != chunks:
            raise ValueError(f"the compute order names {order.chunks} model chunk(s) per rank, but the PipelineModule "
                             f"is built with {built}: write every chunk's passes, or build the module to match")
        return
    if kind in VIRTUAL_STAGE_SCHEDULES:
        needs, info = VIRTUAL_STAGE_SCHEDULES[kind], _TRAINING_KINDS[kind]
        wanted = f"virtual_stages={info.min_chunks}" + ("" if info.max_chunks == info.min_chunks else " (or more)")
        fits_chunks = info.min_chunks <= chunks and (info.max_chunks == 0 or chunks <= info.max_chunks)
        if not fits_chunks or layout != needs:
            raise ValueError(f"schedule {kind!r} runs a PipelineModule built with {wanted}, virtual_layout={needs!r}; "
                             f"this one is built with {built}: build it so, or choose a schedule that fits it")
    elif chunks > 1:
        fits = [k for k, v in VIRTUAL_STAGE_SCHEDULES.items() if v == layout]
        raise ValueError(f"the PipelineModule is built with {built}, which the {fits[0]} schedule runs, not "
                         f"{kind!r}: set \"pipeline\": {{\"schedule\": \"{fits[0]}\"}} (or a compute order for its "
                         "chunks), or build the module without virtual_stages")


def p2p_timeout(value):
    """`"pipeline": {"p2p_timeout"}` in seconds: a finite positive number (the
    C++ side counts milliseconds in 64 bits; 0 would mean no timeout at all)."""
    import math
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = float("nan")
    if not (math.isfinite(seconds) and 0.001 <= seconds <= 10**9):
        raise ValueError(f'"pipeline": {{"p2p_timeout": {value!r}}} must be a number of seconds between 0.001 and '
                         '1e9 (default 300): how long a stage waits for its peer before failing with an error')
    return seconds
