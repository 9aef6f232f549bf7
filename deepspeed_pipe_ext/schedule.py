"""Pipeline schedules, generated in C++.

Mirrors `deepspeed.runtime.pipe.schedule`: the same class names (instruction
classes included), constructors `(micro_batches, stages, stage_id)` and
iteration yielding a list of instructions per step. `TrainSchedule`,
`InferenceSchedule` and `DataParallelSchedule` give DeepSpeed's instruction
streams exactly. `GPipeSchedule`, `Interleaved1F1BSchedule` and
`ZeroBubbleH1Schedule` are schedules DeepSpeed lacks. `simulate()` runs every
stage's stream through the C++ simulator, which checks it and measures it.

    python -m deepspeed_pipe_ext.schedule --kind zb-h1 --stages 4 --micro-batches 8 [--plot out.png]

`ComputeOrder` is a schedule written by hand: each rank's compute passes in
order, as action tokens (`0F3`: stage 0, forward, micro-batch 3; B full
backward, I input backward, W weight backward), one row per rank in the CSV
form torch.distributed.pipelining reads and writes. The runtime adds the
loads, transfers, reductions and optimizer step, the simulator proves it, and
the engine runs it (`"pipeline": {"schedule": "order.csv"}` or
`engine.set_schedule(order)`).
"""
import csv
import io
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Self

from deepspeed.runtime.pipe import schedule as _ds

from ._native import _C

ScheduleError = _C.ScheduleError
# What each built-in schedule is (C++'s facts): ScheduleKind.parse("zb-v").layout.config_name == "v",
# .min_chunks / .max_chunks (0: no bound) model chunks per rank, .splits_backward, .trains.
ScheduleKind = _C.ScheduleKind
# Every fact about a kind (its layout, chunks, split backward, whether the
# engine trains with it) is C++'s: _C.ScheduleKind.
SCHEDULE_KINDS = tuple(kind.config_name for kind in _C.ScheduleKind.__members__.values())


# ---------------------------------------------------------------- instructions
# Subclasses of DeepSpeed's instruction classes, so code that checks
# isinstance(cmd, deepspeed...ForwardPass) keeps working; `type(cmd) ==
# deepspeed_pipe_ext.schedule.ForwardPass` works too. Buffer instructions also
# carry `micro_batch` and `chunk` (the model chunk / virtual stage on this rank).
class PipeInstruction(_ds.PipeInstruction):
    pass


class BufferOpInstruction(_ds.BufferOpInstruction):

    def __init__(self, buffer_id: int, micro_batch: int | None = None, chunk: int = 0, **kwargs: Any) -> None:
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
OPS = tuple(_C.Op.__members__.values())  # by op code: .name, .letter, .label, .is_compute, .is_transfer
OP_NAMES = tuple(op.name for op in OPS)
_OP_BY_CODE = [_OP_CLASSES[name] for name in OP_NAMES]


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

    kind: str | None = None  # the C++ generator's name

    def __init__(self, micro_batches: int, stages: int, stage_id: int, chunks: int = 1, layout: str = "") -> None:
        self.micro_batches = micro_batches
        self.stages = stages
        self.stage_id = stage_id
        self.chunks = chunks
        self.layout = layout  # of the chunks ("interleaved" | "v"); "" for the schedule's own
        self.prev_stage = stage_id - 1
        self.next_stage = stage_id + 1
        # kind is None only on PipeSchedule itself, which is no schedule (the binding refuses it).
        self._raw = _C.schedule_steps(self.kind,  # type: ignore[arg-type]
                                      micro_batches, stages, stage_id, chunks, layout)  # validates

    def steps(self) -> Iterator[list[_ds.PipeInstruction]]:
        for step in self._raw:
            yield [_instruction(*cmd) for cmd in step]

    def raw_steps(self) -> list[list[tuple[int, int, int, int]]]:
        """Steps as (op code, buffer_id, micro_batch, chunk) tuples; `OP_NAMES[code]` names the op."""
        return self._raw

    def num_pipe_buffers(self) -> int:
        return _C.num_pipe_buffers(self.kind, self.micro_batches, self.stages, self.stage_id,  # type: ignore[arg-type]
                                   self.chunks, self.layout)

    @property
    def stage(self) -> int:
        return self.stage_id

    @property
    def num_stages(self) -> int:
        return self.stages

    @property
    def num_micro_batches(self) -> int:
        return self.micro_batches

    @property
    def is_first_stage(self) -> bool:
        return self.stage_id == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage_id == self.stages - 1

    def __iter__(self) -> Self:
        self.it: Iterator[list[_ds.PipeInstruction]] | None = None
        return self

    def __next__(self) -> list[_ds.PipeInstruction]:
        if self.it is None:
            self.it = self.steps()
        return next(self.it)

    def __repr__(self) -> str:
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

    def __init__(self, micro_batches: int, stages: int, stage_id: int, chunks: int = 2) -> None:
        super().__init__(micro_batches, stages, stage_id, chunks)


class ZeroBubbleH1Schedule(PipeSchedule):
    """ZB-H1 (Qi et al., ICLR 2024): backward split into BackwardInput and
    BackwardWeight; weight gradients deferred to fill the bubbles, with 1F1B's
    peak of micro-batches between forward and input-gradient."""
    kind = "zb-h1"


class ZeroBubbleVSchedule(PipeSchedule):
    """ZB-V (Qi et al., ICLR 2024): two model chunks per rank in a V (rank r
    holds virtual stages r and 2 * stages - 1 - r; the last rank turns the
    activation around in memory), backward split as in zb-h1. Nearly no
    bubble, with at most 1F1B's first-stage activations on every rank."""
    kind = "zb-v"

    def __init__(self, micro_batches: int, stages: int, stage_id: int, chunks: int = 2) -> None:
        super().__init__(micro_batches, stages, stage_id, chunks)


class VHalfSchedule(ZeroBubbleVSchedule):
    """V-Half (after Qi et al., NeurIPS 2024): zb-v's V and split backward with
    each rank keeping at most stages + 1 chunk micro-batches between forward and
    weight gradient: about half of 1F1B's first-stage activations, for a larger
    bubble than zb-v's."""
    kind = "v-half"


class VMinSchedule(ZeroBubbleVSchedule):
    """V-Min: as v-half, at most ceil(2 * stages / 3) + 1 chunk micro-batches
    per rank: about a third of 1F1B's activations, for a larger bubble still."""
    kind = "v-min"


SCHEDULE_CLASSES = {cls.kind: cls for cls in (TrainSchedule, InferenceSchedule, DataParallelSchedule, GPipeSchedule,
                                              Interleaved1F1BSchedule, ZeroBubbleH1Schedule, ZeroBubbleVSchedule,
                                              VHalfSchedule, VMinSchedule)}


def get_schedule(kind: str, micro_batches: int, stages: int, stage_id: int, chunks: int = 1,
                 layout: str = "") -> PipeSchedule:
    """The schedule object for a kind name (see SCHEDULE_KINDS)."""
    if kind not in SCHEDULE_CLASSES:
        raise ValueError(f"unknown schedule kind {kind!r}: choose one of {', '.join(SCHEDULE_KINDS)}")
    cls = SCHEDULE_CLASSES[kind]
    obj = cls.__new__(cls)
    PipeSchedule.__init__(obj, micro_batches, stages, stage_id, chunks, layout)
    return obj


class SimulationResult(dict):
    """The simulator's figures: makespan, busy, idle_fraction (per stage),
    bubble_fraction (the largest), peak_activations (micro-batches between
    forward and input-gradient), peak_buffers, timeline (per stage:
    (start, end, op code, micro_batch, chunk))."""
    __getattr__ = dict.__getitem__


def simulate(kind: str | _C.ScheduleKind, micro_batches: int, stages: int, chunks: int = 1, forward: float = 1.0,
             backward_input: float = 1.0, backward_weight: float = 1.0, send_latency: float = 0.0,
             layout: str = "") -> SimulationResult:
    """Checks and measures the whole pipeline's schedule under per-micro-batch
    stage costs (BackwardPass costs backward_input + backward_weight; with
    chunks > 1 each chunk costs 1/chunks). Raises ScheduleError if invalid."""
    return SimulationResult(_C.simulate(kind, micro_batches, stages, chunks, forward, backward_input,
                                        backward_weight, send_latency, layout))


def simulate_measured(kind: str | _C.ScheduleKind, micro_batches: int, stages: int,
                      pass_costs: Sequence[Sequence[tuple[float, float, float]]], chunks: int = 1,
                      send_latency: float = 0.0, layout: str = "") -> SimulationResult:
    """simulate() with costs measured per stage and chunk: pass_costs[stage][chunk]
    = (forward, backward_input, backward_weight) of one micro-batch's pass of
    that chunk (a full backward costs both). Raises ScheduleError if invalid."""
    return SimulationResult(_C.simulate_pass_costs(kind, micro_batches, stages, chunks, pass_costs, send_latency,
                                                   layout))


class ComputeOrder:
    """Each rank's compute passes, in order: `rows[r]` is rank r's list of
    action tokens ("0F3": virtual stage 0, forward, micro-batch 3). With
    several model chunks per rank, stage indices above the rank count name
    the rank's other chunks, placed by `layout`: "interleaved" (stage s on
    rank s mod ranks) or "v" (stage s on rank s for s < ranks, else on rank
    2 * ranks - 1 - s, as torch's ZBV schedules number them); by default the
    one the rows fit. Built-in schedules export theirs with
    `ComputeOrder.builtin(kind, micro_batches, stages)`."""

    def __init__(self, rows: Iterable[Iterable[str]], micro_batches: int | None = None,
                 layout: str | None = None) -> None:
        self.rows = [[str(token).strip() for token in row if str(token).strip()] for row in rows]
        if not self.rows:
            raise ValueError("a compute order needs one row of actions per rank; got none")
        # (rank, virtual stage, letter, micro-batch) of every token, parsed by C++.
        actions = [(rank, *_C.parse_action_token(token, rank)) for rank, row in enumerate(self.rows) for token in row]
        found = [micro_batch for _, _, _, micro_batch in actions]
        self.micro_batches = micro_batches if micro_batches is not None else (max(found) + 1 if found else 0)
        self.chunks = max((stage for _, stage, _, _ in actions), default=0) // self.stages + 1
        self._letters = {letter for _, _, letter, _ in actions}
        if layout is None:  # the layout whose placement the rows follow ("interleaved" when both fit)
            layout = "interleaved" if self.chunks == 1 or all(
                stage % self.stages == rank for rank, stage, _, _ in actions) else "v"
        if layout not in ("interleaved", "v"):
            raise ValueError(f"layout must be 'interleaved' or 'v', got {layout!r}")
        self.layout = layout
        self._lowered()  # parses and lowers: a clear error if it cannot

    def _lowered(self):
        return _C.lower_compute_order(self.rows, self.micro_batches, self.chunks, self.layout)

    @classmethod
    def builtin(cls, kind: str, micro_batches: int, stages: int, chunks: int = 1) -> Self:
        layout = _C.ScheduleKind.parse(kind).layout.config_name
        return cls(_C.compute_order(kind, micro_batches, stages, chunks, layout), micro_batches, layout)

    @classmethod
    def from_pipe_schedule(cls, schedule_class: type[_ds.PipeSchedule] | type[PipeSchedule], micro_batches: int,
                           stages: int) -> Self:
        """The compute passes of a DeepSpeed-style schedule: a subclass of
        DeepSpeed's PipeSchedule (or ours), constructed for every stage,
        whose instructions (DeepSpeed's classes, or ours for split backward
        passes) are read in order. Each stage's k-th ForwardPass is
        micro-batch k (micro-batches enter a pipeline in order); a backward
        acts on the micro-batch whose forward used its buffer. Where the
        schedule puts its transfers does not matter: the runtime places them."""
        rows = []
        for stage_id in range(stages):
            schedule = schedule_class(micro_batches=micro_batches, stages=stages, stage_id=stage_id)
            row, micro_batch_of, forwards = [], {}, 0
            for step, commands in enumerate(schedule):
                for cmd in commands:
                    if isinstance(cmd, _ds.ForwardPass):
                        micro_batch_of[cmd.buffer_id] = forwards
                        row.append(f"{stage_id}F{forwards}")
                        forwards += 1
                    elif isinstance(cmd, (_ds.BackwardPass, BackwardInput, BackwardWeight)):
                        if cmd.buffer_id not in micro_batch_of:
                            raise ValueError(f"{schedule_class.__name__}, stage {stage_id}, step {step}: {cmd!r} "
                                             f"uses buffer {cmd.buffer_id}, which no ForwardPass filled")
                        letter = "B" if isinstance(cmd, _ds.BackwardPass) else \
                            "I" if isinstance(cmd, BackwardInput) else "W"
                        mb = micro_batch_of[cmd.buffer_id] if letter == "I" else micro_batch_of.pop(cmd.buffer_id)
                        row.append(f"{stage_id}{letter}{mb}")
            rows.append(row)
        return cls(rows, micro_batches)

    @classmethod
    def from_csv(cls, text: str, micro_batches: int | None = None) -> Self:
        """Rows of comma-separated tokens, one row per rank (empty cells skipped)."""
        return cls(list(csv.reader(io.StringIO(text))), micro_batches)

    @classmethod
    def read(cls, path: str | os.PathLike[str], micro_batches: int | None = None) -> Self:
        with open(path, newline="") as f:
            return cls.from_csv(f.read(), micro_batches)

    def to_csv(self) -> str:
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows(self.rows)
        return out.getvalue()

    @property
    def stages(self) -> int:
        return len(self.rows)

    @property
    def splits_backward(self) -> bool:
        """True when any backward is split into I and W (as in zb-h1)."""
        return bool(self._letters & {_C.Op.BackwardInput.letter, _C.Op.BackwardWeight.letter})

    def steps(self, stage_id: int) -> list[list[_ds.PipeInstruction]]:
        """Rank `stage_id`'s instruction stream, with the transfers added."""
        streams, _ = self._lowered()
        return [[_instruction(*cmd) for cmd in step] for step in streams[stage_id]]

    def simulate(self, forward: float = 1.0, backward_input: float = 1.0, backward_weight: float = 1.0,
                 send_latency: float = 0.0) -> SimulationResult:
        """Proves and measures the order as simulate() does a built-in kind;
        raises ScheduleError naming the rank, step and instruction that
        cannot proceed."""
        return SimulationResult(_C.simulate_compute_order(self.rows, self.micro_batches, forward, backward_input,
                                                          backward_weight, send_latency, self.chunks, self.layout))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ComputeOrder) and (self.rows, self.micro_batches, self.layout) == (
            other.rows, other.micro_batches, other.layout)

    def __repr__(self) -> str:
        chunks = f", {self.chunks} chunks per rank ({self.layout})" if self.chunks > 1 else ""
        return f"ComputeOrder({self.stages} ranks, {self.micro_batches} micro-batches{chunks})"


def load_schedule(value: object) -> ComputeOrder | None:
    """A `"pipeline": {"schedule": ...}` value as a ComputeOrder when it is one
    or names a CSV file of one; None for a built-in kind name."""
    if isinstance(value, ComputeOrder):
        return value
    if isinstance(value, (str, os.PathLike)) and str(value) not in SCHEDULE_KINDS and os.path.isfile(value):
        return ComputeOrder.read(value)
    return None


# ---------------------------------------------------------------- command line
def main(argv: Sequence[str] | None = None) -> None:
    """The command line: simulate a schedule (or a compute order), print its
    timeline and figures, and optionally draw it."""
    import argparse

    from .timeline import plot_timeline, summary, text_timeline
    parser = argparse.ArgumentParser(prog="python -m deepspeed_pipe_ext.schedule", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", default="1f1b", help=f"one of: {', '.join(SCHEDULE_KINDS)}")
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--chunks", type=int, default=None,
                        help="model chunks per rank (interleaved-1f1b: 2 or more; zb-v: 2, the default for it)")
    parser.add_argument("--forward", type=float, default=1.0, help="forward cost of a stage per micro-batch")
    parser.add_argument("--backward-input", type=float, default=1.0, help="input-gradient cost")
    parser.add_argument("--backward-weight", type=float, default=1.0, help="weight-gradient cost")
    parser.add_argument("--send-latency", type=float, default=0.0)
    parser.add_argument("--plot", metavar="PNG", help="also draw the timeline into this file (needs matplotlib)")
    parser.add_argument("--order", metavar="CSV", help="simulate (and draw) a hand-written compute order read from "
                        "this file instead of --kind: one row of actions per rank, like 0F0,0F1,0B0,...")
    parser.add_argument("--export-order", metavar="CSV",
                        help="write --kind's compute order in that CSV form to this file and stop")
    args = parser.parse_args(argv)
    if args.chunks is None:  # the fewest the kind runs (zb-v: 2)
        args.chunks = _C.ScheduleKind.parse(args.kind).min_chunks if args.kind in SCHEDULE_KINDS else 1
    try:
        if args.export_order:
            with open(args.export_order, "w") as f:
                f.write(ComputeOrder.builtin(args.kind, args.micro_batches, args.stages, args.chunks).to_csv())
            print(f"wrote {args.kind}'s compute order ({args.stages} ranks, {args.micro_batches} micro-batches) to "
                  f"{args.export_order}")
            return
        costs = (args.forward, args.backward_input, args.backward_weight, args.send_latency)
        if args.order:
            order = ComputeOrder.read(args.order)
            args.kind, args.stages, args.micro_batches = args.order, order.stages, order.micro_batches
            args.chunks = order.chunks
            result = order.simulate(*costs)
        else:
            result = simulate(args.kind, args.micro_batches, args.stages, args.chunks, *costs)
    except (ValueError, OSError, ScheduleError) as err:
        parser.exit(2, f"error: {err}\n")
    chunks = f", chunks={args.chunks}" if args.chunks > 1 else ""
    print(f"{args.kind}: stages={args.stages}, micro_batches={args.micro_batches}{chunks}")
    print(text_timeline(result, args.chunks))
    print(summary(result))
    if args.plot:
        plot_timeline(result, args.plot, title=f"{args.kind}, {args.stages} stages, {args.micro_batches} micro-batches"
                      f"{chunks}: bubble {result['bubble_fraction']:.3f}")
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
