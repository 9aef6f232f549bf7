"""Pipeline schedules, generated in C++.

Mirrors `deepspeed.runtime.pipe.schedule`: the same class names (instruction
classes included), constructors `(micro_batches, stages, stage_id)` and
iteration yielding a list of instructions per step. `TrainSchedule`,
`InferenceSchedule` and `DataParallelSchedule` give DeepSpeed's instruction
streams exactly. `GPipeSchedule`, `Interleaved1F1BSchedule` and
`ZeroBubbleH1Schedule` are schedules DeepSpeed lacks. `simulate()` runs every
stage's stream through the C++ simulator, which checks it and measures it.

    python -m deepspeed_pipe_ext.schedule --kind zb-h1 --stages 4 --micro-batches 8 [--plot out.png]
"""
from deepspeed.runtime.pipe import schedule as _ds

from ._native import _C

ScheduleError = _C.ScheduleError
SCHEDULE_KINDS = tuple(_C.SCHEDULE_KINDS)


# ---------------------------------------------------------------- instructions
# Subclasses of DeepSpeed's instruction classes, so code that checks
# isinstance(cmd, deepspeed...ForwardPass) keeps working; `type(cmd) ==
# deepspeed_pipe_ext.schedule.ForwardPass` works too. Buffer instructions also
# carry `micro_batch` and `chunk` (the model chunk / virtual stage on this rank).
class PipeInstruction(_ds.PipeInstruction):
    pass


class BufferOpInstruction(_ds.BufferOpInstruction):

    def __init__(self, buffer_id, micro_batch=None, chunk=0, **kwargs):
        super().__init__(buffer_id=buffer_id, **kwargs)
        self.micro_batch = micro_batch
        self.chunk = chunk


class OptimizerStep(_ds.OptimizerStep):
    pass


class ReduceGrads(_ds.ReduceGrads):
    pass


class ReduceTiedGrads(_ds.ReduceTiedGrads):
    pass


class LoadMicroBatch(BufferOpInstruction, _ds.LoadMicroBatch):
    pass


class ForwardPass(BufferOpInstruction, _ds.ForwardPass):
    pass


class BackwardPass(BufferOpInstruction, _ds.BackwardPass):
    pass


class BackwardInput(BufferOpInstruction):
    """Gradients w.r.t. the stage's input only (zero-bubble's B)."""


class BackwardWeight(BufferOpInstruction):
    """Gradients w.r.t. the stage's weights (zero-bubble's W), after its BackwardInput."""


class SendActivation(BufferOpInstruction, _ds.SendActivation):
    pass


class RecvActivation(BufferOpInstruction, _ds.RecvActivation):
    pass


class SendGrad(BufferOpInstruction, _ds.SendGrad):
    pass


class RecvGrad(BufferOpInstruction, _ds.RecvGrad):
    pass


_OP_CLASSES = {cls.__name__: cls for cls in (
    LoadMicroBatch, ForwardPass, BackwardPass, BackwardInput, BackwardWeight, SendActivation, RecvActivation,
    SendGrad, RecvGrad, ReduceTiedGrads, ReduceGrads, OptimizerStep)}
_OP_BY_CODE = [_OP_CLASSES[name] for name in _C.OP_NAMES]
OP_NAMES = tuple(_C.OP_NAMES)


def _instruction(code, buffer_id, micro_batch, chunk):
    # Fills the instance dict directly (what the constructors would set): the
    # constructor chain through DeepSpeed's classes costs more than the C++
    # generation itself.
    cls = _OP_BY_CODE[code]
    obj = object.__new__(cls)
    if buffer_id < 0:
        obj.__dict__.update(name=cls.__name__, kwargs={})
    else:
        obj.__dict__.update(name=cls.__name__, kwargs={"buffer_id": buffer_id}, buffer_id=buffer_id,
                            micro_batch=micro_batch, chunk=chunk)
    return obj


# ---------------------------------------------------------------- schedules
class PipeSchedule:
    """A stage's schedule: iterate it for one list of instructions per step."""

    kind = None  # the C++ generator's name

    def __init__(self, micro_batches, stages, stage_id, chunks=1):
        self.micro_batches = micro_batches
        self.stages = stages
        self.stage_id = stage_id
        self.chunks = chunks
        self.prev_stage = stage_id - 1
        self.next_stage = stage_id + 1
        self._raw = _C.schedule_steps(self.kind, micro_batches, stages, stage_id, chunks)  # validates

    def steps(self):
        for step in self._raw:
            yield [_instruction(*cmd) for cmd in step]

    def raw_steps(self):
        """Steps as (op code, buffer_id, micro_batch, chunk) tuples; `OP_NAMES[code]` names the op."""
        return self._raw

    def num_pipe_buffers(self):
        return _C.num_pipe_buffers(self.kind, self.micro_batches, self.stages, self.stage_id, self.chunks)

    @property
    def stage(self):
        return self.stage_id

    @property
    def num_stages(self):
        return self.stages

    @property
    def num_micro_batches(self):
        return self.micro_batches

    @property
    def is_first_stage(self):
        return self.stage_id == 0

    @property
    def is_last_stage(self):
        return self.stage_id == self.stages - 1

    def __iter__(self):
        self.it = None
        return self

    def __next__(self):
        if self.it is None:
            self.it = self.steps()
        return next(self.it)

    def __repr__(self):
        chunks = f", chunks={self.chunks}" if self.chunks != 1 else ""
        return (f"{type(self).__name__}(micro_batches={self.micro_batches}, stages={self.stages}, "
                f"stage_id={self.stage_id}{chunks})")


class TrainSchedule(PipeSchedule):
    """DeepSpeed's 1F1B training schedule, instruction for instruction."""
    kind = "1f1b"


class InferenceSchedule(PipeSchedule):
    """DeepSpeed's inference schedule (two alternating buffers)."""
    kind = "inference"


class DataParallelSchedule(PipeSchedule):
    """DeepSpeed's data-parallel schedule with gradient accumulation."""
    kind = "data-parallel"


class GPipeSchedule(PipeSchedule):
    """All forwards, then all backwards: the simplest schedule, one buffer per micro-batch."""
    kind = "gpipe"


class Interleaved1F1BSchedule(PipeSchedule):
    """Megatron's interleaved 1F1B: `chunks` model chunks per rank (virtual
    stages chunk * stages + stage_id); the bubble shrinks by about `chunks`.
    Best with micro_batches a multiple of stages."""
    kind = "interleaved-1f1b"

    def __init__(self, micro_batches, stages, stage_id, chunks=2):
        super().__init__(micro_batches, stages, stage_id, chunks)


class ZeroBubbleH1Schedule(PipeSchedule):
    """ZB-H1 (Qi et al., ICLR 2024): backward split into BackwardInput and
    BackwardWeight; weight gradients deferred to fill the bubbles, with 1F1B's
    peak of micro-batches between forward and input-gradient."""
    kind = "zb-h1"


SCHEDULE_CLASSES = {cls.kind: cls for cls in (TrainSchedule, InferenceSchedule, DataParallelSchedule, GPipeSchedule,
                                              Interleaved1F1BSchedule, ZeroBubbleH1Schedule)}


def get_schedule(kind, micro_batches, stages, stage_id, chunks=1):
    """The schedule object for a kind name (see SCHEDULE_KINDS)."""
    if kind not in SCHEDULE_CLASSES:
        raise ValueError(f"unknown schedule kind {kind!r}: choose one of {', '.join(SCHEDULE_KINDS)}")
    cls = SCHEDULE_CLASSES[kind]
    obj = cls.__new__(cls)
    PipeSchedule.__init__(obj, micro_batches, stages, stage_id, chunks)
    return obj


class SimulationResult(dict):
    """The simulator's figures: makespan, busy, idle_fraction (per stage),
    bubble_fraction (the largest), peak_activations (micro-batches between
    forward and input-gradient), peak_buffers, timeline (per stage:
    (start, end, op code, micro_batch, chunk))."""
    __getattr__ = dict.__getitem__


def simulate(kind, micro_batches, stages, chunks=1, forward=1.0, backward_input=1.0, backward_weight=1.0,
             send_latency=0.0):
    """Checks and measures the whole pipeline's schedule under per-micro-batch
    stage costs (BackwardPass costs backward_input + backward_weight; with
    chunks > 1 each chunk costs 1/chunks). Raises ScheduleError if invalid."""
    return SimulationResult(_C.simulate(kind, micro_batches, stages, chunks, forward, backward_input,
                                        backward_weight, send_latency))


if __name__ == "__main__":
    from .timeline import main
    main()
