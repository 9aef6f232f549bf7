"""Schedules: parity with DeepSpeed's generator, the simulator's figures, the
simulator catching broken schedules, bad input, and the CLI."""
import random
import re

import pytest
from deepspeed.runtime.pipe import schedule as ds

from deepspeed_pipe_ext import schedule as ours
from deepspeed_pipe_ext.schedule import main as cli_main

from ..schedule_helpers import torch_zbv_rows


def ds_stream(sched):
    return [[(type(c).__name__, getattr(c, "buffer_id", None)) for c in step] for step in sched]


def our_stream(kind, micro_batches, stages, stage_id):
    raw = ours.get_schedule(kind, micro_batches, stages, stage_id).raw_steps()
    return [[(ours.OP_NAMES[op], buf if buf >= 0 else None) for op, buf, _, _ in step] for step in raw]


@pytest.mark.parametrize("kind,ds_cls", [("1f1b", ds.TrainSchedule), ("inference", ds.InferenceSchedule)])
def test_matches_deepspeed_for_every_stage_up_to_16_stages_and_64_micro_batches(kind, ds_cls):
    for stages in range(1, 17):
        for micro_batches in range(1, 65):
            for stage_id in range(stages):
                expected = ds_cls(micro_batches, stages, stage_id)
                assert our_stream(kind, micro_batches, stages, stage_id) == ds_stream(expected), \
                    (kind, micro_batches, stages, stage_id)
                mine = ours.get_schedule(kind, micro_batches, stages, stage_id)
                assert mine.num_pipe_buffers() == expected.num_pipe_buffers()


def test_data_parallel_matches_deepspeed():
    for micro_batches in range(1, 65):
        expected = ds.DataParallelSchedule(micro_batches, 1, 0)
        assert our_stream("data-parallel", micro_batches, 1, 0) == ds_stream(expected)
        assert ours.DataParallelSchedule(micro_batches, 1, 0).num_pipe_buffers() == expected.num_pipe_buffers()


def test_python_api_mirrors_deepspeed():
    rng = random.Random(0)
    for _ in range(40):
        stages = rng.randint(1, 8)
        micro_batches, stage_id = rng.randint(1, 20), rng.randrange(stages)
        for cls_name in ("TrainSchedule", "InferenceSchedule"):
            mine = getattr(ours, cls_name)(micro_batches, stages, stage_id)
            theirs = getattr(ds, cls_name)(micro_batches, stages, stage_id)
            for prop in ("num_micro_batches", "stage", "num_stages", "is_first_stage", "is_last_stage"):
                assert getattr(mine, prop) == getattr(theirs, prop)
            for step_mine, step_theirs in zip(mine, theirs):
                for a, b in zip(step_mine, step_theirs):
                    assert type(a) == getattr(ours, type(b).__name__)  # noqa: E721 (the contract is type ==)
                    assert isinstance(a, type(b))  # still DeepSpeed's instruction classes
                    assert a.kwargs == b.kwargs and repr(a) == repr(b)
            # Iterating twice gives the same steps, as DeepSpeed's generator does.
            assert ds_stream(mine) == ds_stream(mine)


def test_instructions_carry_micro_batch_and_chunk():
    sched = ours.Interleaved1F1BSchedule(micro_batches=4, stages=2, stage_id=1, chunks=2)
    forwards = [(c.micro_batch, c.chunk) for step in sched for c in step if type(c) == ours.ForwardPass]  # noqa: E721
    assert sorted(forwards) == [(mb, c) for mb in range(4) for c in range(2)]


# ------------------------------------------------------------------ simulator figures
@pytest.mark.parametrize("stages", [1, 2, 3, 4, 5, 8, 16])
@pytest.mark.parametrize("micro_batches", [1, 2, 3, 4, 7, 8, 16, 33, 64])
def test_1f1b_bubble_is_the_published_figure(stages, micro_batches):
    expected = (stages - 1) / (micro_batches + stages - 1)
    for kind in ("1f1b", "gpipe"):
        result = ours.simulate(kind, micro_batches, stages, forward=1, backward_input=1, backward_weight=1)
        assert result.idle_fraction == pytest.approx([expected] * stages, abs=1e-12)
    assert ours.simulate("1f1b", micro_batches, stages).peak_activations == \
        [min(stages - i, micro_batches) for i in range(stages)]


@pytest.mark.parametrize("stages", [2, 3, 4, 8])
@pytest.mark.parametrize("rounds", [1, 2, 3])
@pytest.mark.parametrize("chunks", [1, 2, 3, 4])
def test_interleaved_bubble_is_the_published_figure(stages, rounds, chunks):
    micro_batches = rounds * stages
    result = ours.simulate("interleaved-1f1b", micro_batches, stages, chunks)
    expected = (stages - 1) / (chunks * micro_batches + stages - 1)
    assert result.bubble_fraction == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("costs", [(1, 1, 1), (1, 1.5, 0.5), (1, 1, 0.5), (2, 1, 1), (1, 0.5, 0.25)])
@pytest.mark.parametrize("stages", [2, 3, 4, 8, 16])
def test_zero_bubble_h1_bubble_is_the_published_figure(costs, stages):
    forward, backward_input, backward_weight = costs
    for micro_batches in (stages, 2 * stages, 3 * stages + 1):
        zb = ours.simulate("zb-h1", micro_batches, stages, forward=forward, backward_input=backward_input,
                           backward_weight=backward_weight)
        one = ours.simulate("1f1b", micro_batches, stages, forward=forward, backward_input=backward_input,
                            backward_weight=backward_weight)
        idle = [zb.makespan - busy for busy in zb.busy]
        assert max(idle) == pytest.approx((stages - 1) * (forward + backward_input - backward_weight))
        assert max(one.makespan - busy for busy in one.busy) == \
            pytest.approx((stages - 1) * (forward + backward_input + backward_weight))
        # The same peak of micro-batches between forward and input gradient as 1F1B.
        assert zb.peak_activations == one.peak_activations


def test_zero_bubble_never_worse_than_1f1b():
    rng = random.Random(1)
    for _ in range(60):
        stages, micro_batches = rng.randint(1, 8), rng.randint(1, 24)
        costs = dict(forward=rng.uniform(0.2, 2), backward_input=rng.uniform(0.2, 2),
                     backward_weight=rng.uniform(0.2, 2), send_latency=rng.choice([0, 0.1]))
        zb = ours.simulate("zb-h1", micro_batches, stages, **costs)
        one = ours.simulate("1f1b", micro_batches, stages, **costs)
        assert zb.makespan <= one.makespan + 1e-9


def test_every_kind_is_valid_under_random_costs():
    """The simulator re-checks every stream under costs other than the unit
    costs the list-scheduled kinds were built with."""
    rng = random.Random(2)
    for _ in range(80):
        kind = rng.choice(["1f1b", "gpipe", "interleaved-1f1b", "zb-h1", "inference", "zb-v"])
        stages, micro_batches = rng.randint(2 if kind == "zb-v" else 1, 8), rng.randint(1, 20)
        chunks = rng.randint(1, 4) if kind == "interleaved-1f1b" else 2 if kind == "zb-v" else 1
        result = ours.simulate(kind, micro_batches, stages, chunks, forward=rng.uniform(0.1, 3),
                               backward_input=rng.uniform(0.1, 3), backward_weight=rng.uniform(0.1, 3),
                               send_latency=rng.uniform(0, 1))
        assert result.makespan > 0


# ------------------------------------------------------------------ the simulator catches broken schedules
def streams(kind, micro_batches, stages, chunks=1):
    all_steps = [ours.get_schedule(kind, micro_batches, stages, i, chunks).raw_steps() for i in range(stages)]
    buffers = [ours.get_schedule(kind, micro_batches, stages, i, chunks).num_pipe_buffers() for i in range(stages)]
    return [[list(step) for step in s] for s in all_steps], buffers


def run(all_steps, micro_batches, buffers, chunks=1):
    from deepspeed_pipe_ext import _C
    return _C.simulate_streams(all_steps, micro_batches, chunks, buffers)


OP = {name: code for code, name in enumerate(ours.OP_NAMES)}


def test_simulator_accepts_the_generated_streams():
    all_steps, buffers = streams("1f1b", 4, 3)
    assert run(all_steps, 4, buffers)["makespan"] > 0


def test_simulator_reports_deadlock():
    all_steps, buffers = streams("1f1b", 4, 2)
    # Stage 1 never sends its first gradient: stage 0 waits forever.
    for step in all_steps[1]:
        step[:] = [c for c in step if not (c[0] == OP["SendGrad"] and c[2] == 0)]
    with pytest.raises(ours.ScheduleError, match="(?s)deadlock.*stage 0 waits at step 3 on RecvGrad"):
        run(all_steps, 4, buffers)


def test_simulator_reports_out_of_order_receives():
    all_steps, buffers = streams("gpipe", 3, 2)
    recvs = [(i, j) for i, step in enumerate(all_steps[1]) for j, c in enumerate(step) if c[0] == OP["RecvActivation"]]
    (a, ja), (b, jb) = recvs[0], recvs[1]
    all_steps[1][a][ja], all_steps[1][b][jb] = all_steps[1][b][jb], all_steps[1][a][ja]
    with pytest.raises(ours.ScheduleError, match="out of order|holds"):
        run(all_steps, 3, buffers)


def test_simulator_reports_buffer_overwrite():
    all_steps, _ = streams("1f1b", 4, 2)
    with pytest.raises(ours.ScheduleError, match="buffer id out of range|overwrites buffer"):
        run(all_steps, 4, [1, 1])
    # Squash every buffer id to 0 on stage 0 (which has 2 buffers): micro-batch 1 lands on micro-batch 0.
    squashed = [[[(op, 0 if buf >= 0 else buf, mb, ch) for op, buf, mb, ch in step] for step in all_steps[0]],
                all_steps[1]]
    with pytest.raises(ours.ScheduleError, match="overwrites buffer 0 while it still holds micro-batch 0"):
        run(squashed, 4, [2, 2])


def test_simulator_reports_missing_backward_and_early_step():
    all_steps, buffers = streams("1f1b", 2, 1)
    without_last_backward = [[c for c in step if not (c[0] == OP["BackwardPass"] and c[2] == 1)]
                             for step in all_steps[0]]
    with pytest.raises(ours.ScheduleError, match="before micro-batch 1 finished its backward pass"):
        run([without_last_backward], 2, buffers)


def test_simulator_reports_weight_gradient_before_input_gradient():
    all_steps, buffers = streams("zb-h1", 2, 1)
    flat = [c for step in all_steps[0] for c in step]
    b = next(i for i, c in enumerate(flat) if c[0] == OP["BackwardInput"])
    w = next(i for i, c in enumerate(flat) if c[0] == OP["BackwardWeight"] and c[2] == flat[b][2])
    flat[b], flat[w] = flat[w], flat[b]
    with pytest.raises(ours.ScheduleError, match="weight gradient before the input gradient"):
        run([[flat]], 2, buffers)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("args,match", [
    (("1f1b", 0, 2, 0), "micro_batches must be >= 1"),
    (("1f1b", 4, 0, 0), "stages must be >= 1"),
    (("1f1b", 4, 2, 2), "stage_id 2 is out of range for 2 stages"),
    (("1f1b", 4, 2, -1), "stage_id -1 is out of range"),
    (("interleaved-1f1b", 4, 2, 0, 0), "chunks must be >= 1"),
    (("gpipe", 4, 2, 0, 2), "chunks=2 needs the interleaved-1f1b or zb-v schedule"),
    (("zero-bubble-9000", 4, 2, 0), "unknown schedule kind"),
])
def test_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        ours.get_schedule(*args)


def test_bad_input_on_constructors_and_simulate():
    with pytest.raises(ValueError, match="stage_id 5 is out of range for 4 stages"):
        ours.TrainSchedule(8, 4, 5)
    with pytest.raises(ValueError, match="chunks must be >= 1"):
        ours.Interleaved1F1BSchedule(8, 4, 0, chunks=0)
    with pytest.raises(ValueError, match="unknown schedule kind 'pipedream'"):
        ours.simulate("pipedream", 8, 4)
    with pytest.raises(ValueError, match="costs must be >= 0"):
        ours.simulate("1f1b", 8, 4, forward=-1)


# ------------------------------------------------------------------ seeing a schedule
def test_cli_prints_timeline_and_figures(capsys, tmp_path):
    png = tmp_path / "zb.png"
    cli_main(["--kind", "zb-h1", "--stages", "4", "--micro-batches", "8", "--plot", str(png)])
    out = capsys.readouterr().out
    assert out.count("stage  ") >= 8  # four timeline rows and four summary rows
    assert "bubble fraction 0.1111" in out  # (S-1)(F+B-W) / makespan = 3 / 27
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rejects_bad_kind(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--kind", "nope"])
    assert exit_info.value.code == 2
    assert "unknown schedule kind 'nope'" in capsys.readouterr().err


def test_measured_timeline_picture(tmp_path):
    from deepspeed_pipe_ext import timeline
    F, B = OP["ForwardPass"], OP["BackwardPass"]
    stages = [[(10.000, 10.001, F, 0, 0), (10.003, 10.005, B, 0, 0)],
              [(10.001, 10.002, F, 0, 0), (10.002, 10.003, B, 0, 0)]]
    result = timeline.measured_result(stages)
    assert result["makespan"] == pytest.approx(5.0)  # milliseconds from the earliest start
    assert result["idle_fraction"] == pytest.approx([0.4, 0.6])
    png = tmp_path / "measured.png"
    timeline.plot_timeline(result, str(png), xlabel="milliseconds")
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("micro_batches,title", [
    (8, "last training step as measured (1f1b): 2 stages, 8 micro-batches, idle fraction 0.31"),  # the demo's
    (64, ""),
])
def test_timeline_pictures_keep_their_title_and_fill_their_canvas(tmp_path, micro_batches, title):
    """A measured step a few milliseconds long (the demo's): nothing drawn
    touches the picture's edges (a title cut on both sides did), and no band
    of the canvas is left empty."""
    import matplotlib.image

    from deepspeed_pipe_ext import timeline
    F, B = OP["ForwardPass"], OP["BackwardPass"]
    stages = [[], []]
    for stage in (0, 1):
        t = 0.0003 * stage
        for mb in range(micro_batches):
            stages[stage] += [(t, t + 0.0003, F, mb, 0), (t + 0.0004, t + 0.0009, B, mb, 0)]
            t += 0.001
    png = tmp_path / "step.png"
    timeline.plot_timeline(timeline.measured_result(stages), str(png), title=title, xlabel="milliseconds")
    ink = matplotlib.image.imread(str(png))[..., :3].min(axis=2) < 0.9  # True where something is drawn
    assert not ink[:, :2].any() and not ink[:, -2:].any() and not ink[:2].any() and not ink[-2:].any()
    blank_rows, blank_columns = (~ink.any(axis=1)).mean(), (~ink.any(axis=0)).mean()
    assert blank_rows < 0.2 and blank_columns < 0.1, (blank_rows, blank_columns)


# ---------------------------------------------------------------- hand-written schedules (compute orders)
@pytest.mark.parametrize("kind", ["gpipe", "zb-h1"])
@pytest.mark.parametrize("micro_batches,stages", [(1, 1), (4, 2), (7, 3), (8, 4), (5, 6)])
def test_a_built_in_compute_order_lowers_to_the_built_in_streams(kind, micro_batches, stages):
    order = ours.ComputeOrder.builtin(kind, micro_batches, stages)
    assert order.stages == stages and order.micro_batches == micro_batches
    assert order.splits_backward == (kind == "zb-h1")
    assert ours.ComputeOrder.from_csv(order.to_csv()) == order  # the CSV form round-trips
    for stage_id in range(stages):
        built_in = ours.get_schedule(kind, micro_batches, stages, stage_id)
        assert [[repr(c) for c in step] for step in order.steps(stage_id)] == \
            [[repr(c) for c in step] for step in built_in]
    assert order.simulate().makespan == ours.simulate(kind, micro_batches, stages).makespan


def test_compute_order_tokens_are_torch_pipelining_actions():
    """The text form is torch.distributed.pipelining's: its parser reads our
    tokens back to the same action, and its tokens parse here."""
    from torch.distributed.pipelining.schedules import _Action
    order = ours.ComputeOrder.builtin("zb-h1", 4, 2)
    for row in order.rows:
        for token in row:
            assert str(_Action.from_str(token)) == token
    theirs = [[str(_Action.from_str(t)) for t in ("0F0", "0F1", "0I0", "0W0", "0I1", "0W1")],
              [str(_Action.from_str(t)) for t in ("1F0", "1I0", "1W0", "1F1", "1I1", "1W1")]]
    assert ours.ComputeOrder(theirs).simulate().makespan > 0


def test_a_broken_compute_order_is_refused_naming_the_rank_and_action():
    # Rank 0 waits for micro-batch 0's gradient before sending micro-batch 1's
    # activation, which rank 1 needs first: a deadlock the simulator reports.
    deadlock = ours.ComputeOrder([["0F0", "0B0", "0F1", "0B1"], ["1F1", "1B1", "1F0", "1B0"]])
    with pytest.raises(ours.ScheduleError, match="stage"):
        deadlock.simulate()
    from deepspeed_pipe_ext._native import _C
    with pytest.raises(ours.ScheduleError):
        _C.StageProgram.from_compute_order(deadlock.rows, 2, 0)
    cases = {"rank 1, action 0 (1B0): a backward pass of micro-batch 0 without its forward": [["0F0", "0B0"],
                                                                                             ["1B0", "1F0"]],
             "rank 0: action '1F0' names stage 1, which does not run on rank 0": [["1F0", "1B0"], ["0F0", "0B0"]],
             "runs its forward twice": [["0F0", "0F0", "0B0"]],
             "has the pass 'X'": [["0X0"]],
             # Stage 2 on both ranks fits neither layout of two chunks per rank.
             "names stage 2, which does not run on rank 0 of 2 (it runs on rank 1 in the 'v' layout)":
                 [["0F0", "2F0", "2B0", "0B0"], ["1F0", "2F0", "2B0", "1B0"]]}
    for message, rows in cases.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            ours.ComputeOrder(rows)
    # Every micro-batch's passes must be there: one B missing.
    with pytest.raises(ours.ScheduleError):
        ours.ComputeOrder([["0F0", "0F1", "0B0"]], micro_batches=2).simulate()


@pytest.mark.parametrize("stages,micro_batches", [(2, 4), (2, 3), (4, 8), (4, 7), (3, 9)])
def test_torch_zbv_order_reads_as_a_v_layout_compute_order_as_fast_as_ours(stages, micro_batches):
    order = ours.ComputeOrder(torch_zbv_rows(stages, micro_batches), micro_batches)
    assert (order.chunks, order.layout) == (2, "v")
    theirs, mine = order.simulate(), ours.simulate("zb-v", micro_batches, stages, 2)
    assert theirs.makespan == mine.makespan
    assert max(mine.peak_activations) <= 2 * stages
    # Our own zb-v order round-trips through the text form.
    exported = ours.ComputeOrder.builtin("zb-v", micro_batches, stages, 2)
    assert ours.ComputeOrder.from_csv(exported.to_csv(), micro_batches) == exported
    assert exported.simulate().makespan == mine.makespan


def test_zb_v_has_less_bubble_than_zb_h1_and_1f1b():
    for stages, micro_batches in ((2, 8), (4, 16), (8, 32)):
        v = ours.simulate("zb-v", micro_batches, stages, 2)
        h1 = ours.simulate("zb-h1", micro_batches, stages)
        one = ours.simulate("1f1b", micro_batches, stages)
        assert v.makespan < h1.makespan < one.makespan
        assert v.makespan == 3 * micro_batches + (stages - 1) / 2  # only the fill of the first forward
        assert max(v.peak_activations) == 2 * stages  # chunk activations: 1F1B's first stage, in halves
        assert max(v.peak_buffers) == 2 * stages  # deferred W's included


def test_cli_shows_zb_v_and_round_trips_its_order(capsys, tmp_path):
    path, png = tmp_path / "zbv.csv", tmp_path / "zbv.png"
    cli_main(["--kind", "zb-v", "--stages", "2", "--micro-batches", "4", "--plot", str(png)])
    out = capsys.readouterr().out
    assert "zb-v: stages=2, micro_batches=4, chunks=2" in out and png.stat().st_size > 1000
    cli_main(["--kind", "zb-v", "--stages", "2", "--micro-batches", "4", "--export-order", str(path)])
    assert path.read_text().splitlines()[0].startswith("0F0,0F1,0F2,3F0,")  # rank 0 holds stages 0 and 3
    cli_main(["--order", str(path)])
    assert "chunks=2" in capsys.readouterr().out


def test_cli_exports_a_compute_order_and_draws_one_read_from_a_file(capsys, tmp_path):
    path, png = tmp_path / "zb.csv", tmp_path / "zb.png"
    cli_main(["--kind", "zb-h1", "--stages", "2", "--micro-batches", "4", "--export-order", str(path)])
    assert path.read_text().splitlines()[0].startswith("0F0,0F1,0I0,")
    cli_main(["--order", str(path), "--plot", str(png)])
    out = capsys.readouterr().out
    assert "stages=2, micro_batches=4" in out and png.stat().st_size > 1000
    assert "bubble" in out
    bad = tmp_path / "bad.csv"
    bad.write_text("0F0,0B0,0F1,0B1\n1F1,1B1,1F0,1B0\n")
    with pytest.raises(SystemExit):
        cli_main(["--order", str(bad)])
    assert "stage 1, step 0, RecvActivation" in capsys.readouterr().err


@pytest.mark.parametrize("stages", [1, 2, 3, 5])
@pytest.mark.parametrize("micro_batches", [1, 2, 4, 7])
def test_a_pipe_schedule_class_gives_the_compute_order_of_its_instructions(stages, micro_batches):
    """DeepSpeed's own TrainSchedule read as a compute order is our 1f1b's;
    our ZeroBubbleH1Schedule (split backward instructions) is zb-h1's."""
    assert ours.ComputeOrder.from_pipe_schedule(ds.TrainSchedule, micro_batches, stages) == \
        ours.ComputeOrder.builtin("1f1b", micro_batches, stages)
    assert ours.ComputeOrder.from_pipe_schedule(ours.ZeroBubbleH1Schedule, micro_batches, stages) == \
        ours.ComputeOrder.builtin("zb-h1", micro_batches, stages)


def test_a_pipe_schedule_class_whose_backward_has_no_forward_is_refused():
    class BackwardFirst(ds.PipeSchedule):
        def steps(self):
            yield [ds.BackwardPass(0)]
            yield [ds.ForwardPass(0)]

        def num_pipe_buffers(self):
            return 1

    with pytest.raises(ValueError, match="BackwardFirst, stage 0, step 0: .* uses buffer 0, which no ForwardPass"):
        ours.ComputeOrder.from_pipe_schedule(BackwardFirst, 1, 1)


def test_simulate_measured_takes_each_stage_and_chunk_own_costs():
    """Measured costs per stage and chunk: a uniform table is simulate()'s
    result; a slower stage lengthens the step; a table of the wrong shape is
    refused."""
    uniform = [[(0.5, 0.5, 0.5)] * 2 for _ in range(4)]
    assert ours.simulate_measured("zb-v", 8, 4, uniform, chunks=2).makespan == ours.simulate("zb-v", 8, 4, 2).makespan
    slow = [list(stage) for stage in uniform]
    slow[3] = [(1.0, 1.0, 1.0)] * 2
    assert ours.simulate_measured("zb-v", 8, 4, slow, chunks=2).makespan > ours.simulate("zb-v", 8, 4, 2).makespan
    one_chunk = [[(1.0, 2.0, 0.0)], [(1.0, 2.0, 0.0)]]
    assert ours.simulate_measured("1f1b", 4, 2, one_chunk, send_latency=0.5).makespan == \
        ours.simulate("1f1b", 4, 2, forward=1.0, backward_input=2.0, backward_weight=0.0, send_latency=0.5).makespan
    with pytest.raises(ValueError, match="pass costs for 1 stages"):
        ours.simulate_measured("1f1b", 4, 2, one_chunk[:1])
