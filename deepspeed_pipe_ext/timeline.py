"""Seeing a schedule: a text timeline (one row per stage), a Chrome trace and
a picture (`python -m deepspeed_pipe_ext.schedule` draws them)."""
import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

from . import schedule as _schedule

_COLORS = {"ForwardPass": "#4C72B0", "BackwardPass": "#55A868", "BackwardInput": "#55A868",
           "BackwardWeight": "#C44E52"}


def _resolution(timeline):
    durations = [end - start for stage in timeline for start, end, *_ in stage if end > start]
    return min(durations) if durations else 1.0


def text_timeline(result: Mapping[str, Any], chunks: int = 1) -> str:
    """One row per stage; each cell is the smallest op's duration: op letter and
    micro-batch ('F3', 'B3', 'I3', 'W3'; chunk as a suffix letter when chunks > 1),
    '.' where the stage idles."""
    unit = _resolution(result["timeline"])
    width = max(1, math.ceil(result["makespan"] / unit - 1e-9))
    cells = []
    for stage in result["timeline"]:
        row = ["."] * width
        for start, end, code, mb, chunk in stage:
            label = _schedule.OPS[code].letter + str(mb)
            if chunks > 1:
                label += "abcdefghijklmnopqrstuvwxyz"[chunk % 26]
            first = int(round(start / unit))
            for cell in range(first, max(first + 1, int(round(end / unit)))):
                if cell < width:
                    row[cell] = label
        cells.append(row)
    cell_width = max(len(c) for row in cells for c in row)
    lines = []
    for stage, row in enumerate(cells):
        lines.append(f"stage {stage:2d} |" + " ".join(c.ljust(cell_width) for c in row) + "|")
    return "\n".join(lines)


def summary(result: Mapping[str, Any]) -> str:
    lines = [f"makespan {result['makespan']:g}   bubble fraction {result['bubble_fraction']:.4f} (the idlest stage)"]
    for stage, (idle, act, buf) in enumerate(zip(result["idle_fraction"], result["peak_activations"],
                                                 result["peak_buffers"])):
        lines.append(f"  stage {stage:2d}: idle {idle:.4f}  peak activations {act}  peak buffers {buf}")
    return "\n".join(lines)


def measured_result(stage_timelines: Sequence[Sequence[tuple[float, float, int, int, int]]]) -> dict[str, Any]:
    """A simulator-shaped result from the executor's measured timelines (one
    list per stage, as PipelineEngine.last_timeline), in milliseconds from
    the earliest start."""
    t0 = min((start for stage in stage_timelines for start, *_ in stage), default=0.0)
    timeline = [[((s - t0) * 1e3, (e - t0) * 1e3, code, mb, chunk) for s, e, code, mb, chunk in stage]
                for stage in stage_timelines]
    makespan = max((e for stage in timeline for _, e, *_ in stage), default=0.0)
    busy = [sum(e - s for s, e, *_ in stage) for stage in timeline]
    idle = [1 - b / makespan if makespan else 0.0 for b in busy]
    return {"timeline": timeline, "makespan": makespan, "busy": busy, "idle_fraction": idle,
            "bubble_fraction": max(idle) if idle else 0.0}


def write_chrome_trace(stage_timelines: Sequence[Sequence[tuple[float, float, int, int, int]]],
                       path: str | os.PathLike[str]) -> str | os.PathLike[str]:
    """Write measured timelines (one list per stage, as PipelineEngine.last_timeline
    gathered from every rank) as a Chrome / Perfetto trace: one track per stage,
    one slice per pass, named as torch.profiler shows them ("pipe stage 1
    forward mb 3"). Open it in chrome://tracing or https://ui.perfetto.dev."""
    import json
    t0 = min((start for stage in stage_timelines for start, *_ in stage), default=0.0)
    events = []
    for stage, ops in enumerate(stage_timelines):
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": stage, "args": {"name": f"stage {stage}"}})
        for start, end, code, mb, chunk in ops:
            name = f"pipe stage {stage} {_schedule.OPS[code].label} mb {mb}" + \
                (f" chunk {chunk}" if chunk else "")
            events.append({"name": name, "ph": "X", "pid": 0, "tid": stage, "ts": (start - t0) * 1e6,
                           "dur": (end - start) * 1e6, "args": {"micro_batch": mb, "chunk": chunk}})
    with open(path, "w") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)
    return path


def plot_timeline(result: Mapping[str, Any], path: str | os.PathLike[str], title: str = "",
                  xlabel: str = "time (units of the given op costs)") -> None:
    """Draw the timeline with matplotlib (an optional dependency) into `path`."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError as err:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib") from err
    timeline = result["timeline"]
    stages = len(timeline)
    # Wide enough for every pass to carry its micro-batch number (the time unit says nothing about that).
    passes = max((len(ops) for ops in timeline), default=0)
    width = max(7.0, min(20.0, 2.0 + 0.3 * passes))
    fig, ax = plt.subplots(figsize=(width, 0.5 * stages + 1.0))
    for stage, ops in enumerate(timeline):
        for start, end, code, mb, chunk in ops:
            name = _schedule.OP_NAMES[code]
            ax.broken_barh([(start, end - start)], (stage - 0.4, 0.8), facecolors=_COLORS[name],
                           edgecolors="white", linewidth=0.6, alpha=1.0 - 0.35 * (chunk % 2))
            if end - start >= 0.02 * result["makespan"]:
                ax.text((start + end) / 2, stage, str(mb), ha="center", va="center", fontsize=7, color="white")
    ax.set_yticks(range(stages))
    ax.set_yticklabels([f"stage {s}" for s in range(stages)])
    ax.invert_yaxis()
    ax.set_xlim(0, result["makespan"])
    ax.set_xlabel(xlabel)
    title = title or f"bubble fraction {result['bubble_fraction']:.3f}"
    ax.set_title("\n".join(textwrap.wrap(title, width=int(width * 13))), fontsize=10)
    used = {_schedule.OP_NAMES[code] for ops in timeline for _, _, code, _, _ in ops}
    legend = [Patch(color=_COLORS[op.name], label=op.label) for op in _schedule.OPS
              if op.is_compute and op.name in used]
    ax.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    # "tight" takes the canvas to what was drawn: nothing cut, no empty margin.
    fig.savefig(path, dpi=110, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)
