"""The planner's Python side: measuring layers, planning from a profile,
describing, saving and drawing a plan, the command line, and refusing what
cannot fit (the search itself: tests/core, csrc/core/planner)."""
import dataclasses
import json

import pytest
import torch
import torch.nn as nn

import deepspeed_pipe_ext as dpe
from deepspeed_pipe_ext import planner
from deepspeed_pipe_ext._native import _C
from deepspeed_pipe_ext._profile import measure_layers


def synthetic_profile(layers=8, state=1000, saved=100):
    return planner.CostProfile(
        layers=[planner.LayerProfile(name="Linear", forward=1e-3, backward_input=1e-3, backward_weight=1e-3,
                                     saved_bytes=saved, output_bytes=10, parameter_bytes=state // 4,
                                     state_bytes=state, has_parameters=True) for _ in range(layers)],
        input_bytes=10)


def test_memory_sizes_read_as_bytes():
    assert planner.parse_bytes("60GiB") == 60 * 2**30
    assert planner.parse_bytes("512 MB") == 512e6
    assert planner.parse_bytes(1.5e9) == 1.5e9 and planner.parse_bytes(None) == 0
    for bad in ("sixty", "60 GiBs", -1):
        with pytest.raises(ValueError, match="memory size"):
            planner.parse_bytes(bad)


def test_a_layer_is_measured_as_the_executor_runs_it():
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    specs = [dpe.LayerSpec(nn.Linear, 8, 8), nn.Tanh()]
    layers, input_bytes = measure_layers(specs, (x, y), nn.MSELoss(), repeats=2, state_bytes_per_parameter=8)
    linear, tanh = layers
    assert input_bytes == 4 * 8 * 4
    # Linear saves its input (not its weight, which is state); Tanh its output.
    assert linear.saved_bytes == 4 * 8 * 4 and tanh.saved_bytes == 4 * 8 * 4
    assert linear.output_bytes == tanh.output_bytes == 4 * 8 * 4
    assert linear.parameter_bytes == (64 + 8) * 4
    assert linear.state_bytes == 2 * (64 + 8) * 4 + 8 * (64 + 8)  # parameters, gradients, two Adam moments
    assert linear.has_parameters and not tanh.has_parameters and tanh.state_bytes == 0
    assert linear.forward > 0 and linear.backward_input > 0 and linear.backward_weight > 0
    assert tanh.backward_weight < linear.backward_weight  # nothing to do but return
    with pytest.raises(ValueError, match=r"\(inputs, labels\)"):
        measure_layers(specs, x, nn.MSELoss())


def test_an_embedding_first_layer_has_no_input_gradient():
    ids = torch.randint(0, 100, (4, 3))
    layers, input_bytes = measure_layers([dpe.LayerSpec(nn.Embedding, 100, 8), dpe.LayerSpec(nn.Linear, 8, 2)],
                                         ids, repeats=1)
    assert input_bytes == ids.numel() * 8
    assert layers[0].backward_weight > 0 and layers[0].output_bytes == 4 * 3 * 8 * 4
    assert not layers[0].differentiable_input and layers[1].differentiable_input
    # Checkpointing a stage that starts at the embedding would stop its gradients: never planned.
    profile = planner.CostProfile(layers=layers * 2, input_bytes=input_bytes)
    plan = planner.plan(cost_profile=profile, num_stages=2, micro_batches=4, schedules=["1f1b"])
    assert all(c.unavailable for c in plan.candidates if c.checkpoint_interval > 0 and c.parts[0] == 0)
    assert "whose input cannot carry a gradient (token ids)" in plan.candidates[-1].unavailable


def test_a_failing_layer_is_named():
    def broken(x):
        raise RuntimeError("shape mismatch")
    with pytest.raises(RuntimeError, match=r"profiling layer 1 \(broken\) on the sample micro-batch failed"):
        measure_layers([nn.Linear(8, 8), broken], torch.randn(2, 8), repeats=1)


def test_plan_picks_the_fastest_that_fits_and_builds_its_config():
    plan = planner.plan(cost_profile=synthetic_profile(), num_stages=2, micro_batches=8, memory_per_rank="6KB")
    best = plan.best
    assert best.fits and max(best.peak_bytes) <= 6000
    fitting = [c for c in plan.candidates if c.fits and not c.unavailable]
    assert best == min(fitting, key=lambda c: c.step_time)
    assert any(not c.fits for c in plan.candidates)
    assert plan.config() == {"schedule": best.schedule, "activation_checkpoint_interval": best.checkpoint_interval}
    kwargs = plan.module_kwargs()
    assert kwargs["partition_method"] == best.parts and kwargs["num_stages"] == 2
    assert ("virtual_stages" in kwargs) == (best.chunks > 1)
    text = plan.describe()
    assert f"->{best.name} " in text and text.count("->") == 1
    assert text.count("\n") >= len(plan.candidates) and "picked:" in text
    # Restricting the schedules restricts the candidates.
    only = planner.plan(cost_profile=synthetic_profile(), num_stages=2, micro_batches=8, schedules=["gpipe"],
                        checkpoint_intervals=[0])
    assert [c.schedule for c in only.candidates] == ["gpipe"]


def test_several_micro_batch_counts_are_compared_per_micro_batch():
    plan = planner.plan(cost_profile=synthetic_profile(), num_stages=2, micro_batches=[2, 16], schedules=["1f1b"],
                        checkpoint_intervals=[0])
    assert plan.best.micro_batches == 16  # the bubble is paid once per step
    assert ", 16 micro-batches" in plan.describe()


def test_a_plan_that_cannot_fit_is_refused_with_what_would_fit():
    with pytest.raises(planner.PlanError) as info:
        planner.plan(cost_profile=synthetic_profile(), num_stages=2, micro_batches=8, memory_per_rank=1000)
    message = str(info.value)
    assert "no plan fits memory_per_rank=1000 B on all 2 stages" in message
    assert "on rank" in message and "over the cap" in message and "Raise memory_per_rank to at least" in message
    kept = info.value.plan
    assert kept.best is None
    with pytest.raises(planner.PlanError):
        kept.config()
    assert "no plan fits" in kept.describe()


def test_plans_and_profiles_round_trip_through_json(tmp_path):
    profile = synthetic_profile()
    profile.save(tmp_path / "profile.json")
    assert planner.CostProfile.load(tmp_path / "profile.json") == profile
    plan = planner.plan(cost_profile=profile, num_stages=2, micro_batches=4)
    plan.save(tmp_path / "plan.json")
    again = planner.Plan.load(tmp_path / "plan.json")
    assert again.candidates == plan.candidates and again.best == plan.best and again.default == plan.default
    assert again.describe() == plan.describe()
    with pytest.raises(ValueError, match="saved profile, without the layers"):
        again.module()
    (tmp_path / "old.json").write_text(json.dumps({"version": 99}))
    with pytest.raises(ValueError, match="not a cost profile this version reads"):
        planner.CostProfile.load(tmp_path / "old.json")


def test_a_plan_draws_its_pick(tmp_path):
    pytest.importorskip("matplotlib")
    plan = planner.plan(cost_profile=synthetic_profile(), num_stages=2, micro_batches=4)
    plan.draw(tmp_path / "plan.png")
    assert (tmp_path / "plan.png").stat().st_size > 1000


def test_the_command_line_plans_from_a_saved_profile(tmp_path, capsys):
    synthetic_profile().save(tmp_path / "profile.json")
    planner.main([str(tmp_path / "profile.json"), "--stages", "2", "--micro-batches", "8",
                  "--memory-per-rank", "6KB", "--save", str(tmp_path / "plan.json")])
    out = capsys.readouterr().out
    assert "pipeline plan: 8 layers on 2 stages" in out and "picked:" in out
    assert planner.Plan.load(tmp_path / "plan.json").best is not None
    with pytest.raises(SystemExit) as exit_info:
        planner.main([str(tmp_path / "profile.json"), "--stages", "2", "--memory-per-rank", "1000"])
    assert exit_info.value.code == 1 and "no plan fits" in capsys.readouterr().out


def test_the_default_row_is_deepspeeds_1f1b_on_its_parameters_partition():
    profile = synthetic_profile()
    profile = dataclasses.replace(profile, layers=[dataclasses.replace(layer, parameter_bytes=(i + 1) * 100)
                                                   for i, layer in enumerate(profile.layers)])
    plan = planner.plan(cost_profile=profile, num_stages=2, micro_batches=4)
    weights = [float(layer.parameter_bytes) for layer in profile.layers]
    assert plan.default.schedule == "1f1b" and plan.default.parts == _C.partition_balanced(weights, 2)
    assert "default: DeepSpeed's 1f1b, 'parameters' partition" in plan.describe()


def test_v_half_and_v_min_are_schedules():
    from deepspeed_pipe_ext import schedule
    for kind in ("v-half", "v-min"):
        result = schedule.simulate(kind, 16, 4, 2)
        assert result.makespan > schedule.simulate("zb-v", 16, 4, 2).makespan
        assert schedule.get_schedule(kind, 8, 4, 0, 2).kind == kind
    assert _C.v_activation_limit("v-half", 8) == 9 and _C.v_activation_limit("v-min", 8) == 7
    assert _C.v_activation_limit("zb-v", 8) == 16 and _C.v_activation_limit("1f1b", 8) == 0
