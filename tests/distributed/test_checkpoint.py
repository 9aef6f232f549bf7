"""Pipeline checkpoints in DeepSpeed's layout: interop with DeepSpeed's
PipelineEngine both ways, exact resume in fresh processes, reshaped weights,
parallel writes, frozen parameters, deployment, and clear errors for bad files."""
import os
import subprocess
import sys

import pytest
import torch

from deepspeed_pipe_ext._checkpoint_files import CheckpointError, to_sequential_state_dict

from . import checkpoint_cases as cases
from .distributed import run_ranks

TAG = f"global_step{cases.SAVED_STEPS}"


def assert_close(a, b, what):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert torch.all((a - b).abs() <= 1e-6 * b.abs().clamp(min=1e-12)), f"{what}: {a} != {b}"


def assert_same_weights(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        assert_close(a[k], b[k], f"{what} {k}")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """2 ranks x 2 stages: both engines save (DIR/deepspeed, DIR/ours) and cross-load."""
    root = str(tmp_path_factory.mktemp("checkpoints"))
    return root, run_ranks(cases.interop_and_save, 2, root, timeout=300)


@pytest.fixture(scope="module")
def resumed(saved):
    """Fresh processes load DIR/ours, then try broken copies of it."""
    root, _ = saved
    return run_ranks(cases.resume, 2, root, timeout=300)


def test_checkpoints_interoperate_with_deepspeeds_engine(saved):
    _, per_rank = saved
    for rank, out in enumerate(per_rank):
        # Both engines trained alike before saving, so each continuation is a reference for both loads.
        assert_close(out["ours"]["first"], out["deepspeed"]["first"], f"rank {rank} losses before saving")
        for kind, other in (("ours", "deepspeed"), ("deepspeed", "ours")):
            loaded = out[f"{kind}_from_{other}"]
            assert loaded["path"].endswith(os.path.join(other, TAG, f"mp_rank_{rank:02d}_model_states.pt"))
            assert loaded["loaded"]["global_steps"] == cases.SAVED_STEPS
            assert_close(loaded["more"], out[other]["more"], f"rank {rank}: {kind} continuing {other}'s save")
            assert_same_weights(loaded["weights"], out[other]["weights"], f"rank {rank}: {kind} from {other}")
            assert loaded["weights"].keys() == out[other]["weights"].keys()
    # The schedule warmed the LR past the saved steps and the loss moved: the states mattered.
    assert per_rank[0]["ours"]["more"][-1] != per_rank[0]["ours"]["first"][-1]


def test_resume_in_fresh_processes_is_exact(saved, resumed):
    _, uninterrupted = saved
    for rank, (before, after) in enumerate(zip(uninterrupted, resumed)):
        assert after["loaded"]["global_steps"] == cases.SAVED_STEPS
        # Bitwise: same weights, momentum buffers, LR schedule and data give the same floats on the CPU.
        assert after["more"] == before["ours"]["more"], f"rank {rank}"
        for k, v in before["ours"]["weights"].items():
            assert torch.equal(after["weights"][k], v), f"rank {rank} weight {k}"
        assert after["weights"].keys() == before["ours"]["weights"].keys()


def _sequential_outputs(state):
    model = cases.sequential_layers()
    model.load_state_dict(state)  # strict: every parameter of the Sequential came from the checkpoint
    with torch.no_grad():
        return model(cases.EVAL_INPUT)


def test_deployment_state_dict_and_cli(saved, resumed, tmp_path):
    root, _ = saved
    logits = resumed[1]["eval"][1]  # the last stage's output on EVAL_INPUT after loading DIR/ours
    state = to_sequential_state_dict(os.path.join(root, "ours"))
    assert sorted(state) == ["0.weight", "2.bias", "2.weight", "4.bias", "4.weight", "5.weight"]
    assert torch.equal(state["0.weight"], state["5.weight"])  # the tied weight at both of its indices
    assert_close(_sequential_outputs(state), logits, "nn.Sequential against the pipeline's eval")
    assert to_sequential_state_dict(os.path.join(root, "deepspeed"), tag=TAG).keys() == state.keys()

    output = tmp_path / "model.pt"
    done = subprocess.run([sys.executable, "-m", "deepspeed_pipe_ext.export", os.path.join(root, "ours"),
                           "--tag", TAG, "--output", str(output)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "wrote 6 tensors of layers 0, 2, 4, 5" in done.stdout
    from_cli = torch.load(output, weights_only=True)
    assert from_cli.keys() == state.keys() and all(torch.equal(from_cli[k], state[k]) for k in state)

    failed = subprocess.run([sys.executable, "-m", "deepspeed_pipe_ext.export",
                             os.path.join(root, "bad_layer_truncated"), "--output", str(tmp_path / "x.pt")],
                            capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1 and "layer_02-model_states.pt" in failed.stderr, failed.stderr
    assert "truncated or corrupt" in failed.stderr and not (tmp_path / "x.pt").exists()


def test_deployment_of_tensor_parallel_shards(saved, tmp_path):
    """Files of a topology with a 'model' axis (layer_XX-model_MM-...): one rank's shard on request."""
    root, _ = saved
    sharded = tmp_path / "sharded"
    os.makedirs(sharded / TAG)
    (sharded / "latest").write_text(TAG)
    source = os.path.join(root, "ours", TAG)
    for name in os.listdir(source):
        if name.startswith("layer_"):
            layer = name.split("-")[0]
            for model_rank in (0, 1):
                data = torch.load(os.path.join(source, name), weights_only=True)
                torch.save({k: v + model_rank for k, v in data.items()},
                           sharded / TAG / f"{layer}-model_{model_rank:02d}-model_states.pt")
    with pytest.raises(CheckpointError, match=r"layer 0 has 2 tensor-parallel shards .*model_rank"):
        to_sequential_state_dict(str(sharded))
    plain = to_sequential_state_dict(os.path.join(root, "ours"))
    second = to_sequential_state_dict(str(sharded), model_rank=1)
    assert second.keys() == plain.keys() and all(torch.equal(second[k], plain[k] + 1) for k in plain)
    with pytest.raises(FileNotFoundError, match="no shard of model rank 2"):
        to_sequential_state_dict(str(sharded), model_rank=2)
    with pytest.raises(FileNotFoundError, match="latest is missing"):
        to_sequential_state_dict(str(tmp_path))


def test_bad_files_fail_on_every_rank_naming_the_file(resumed):
    for rank, out in enumerate(resumed):
        errors = out["bad_files"]
        for name, (filename, _) in cases.BREAKAGES.items():
            assert filename in errors[name], f"rank {rank} {name}: {errors[name]}"
            assert errors[name].split(":")[0] in ("CheckpointError", "CheckpointFileMissingError"), errors[name]
        assert "is missing" in errors["layer_missing"] and "layer 4" in errors["layer_missing"]
        assert "stage 1" in errors["layer_missing"]
        assert "truncated or corrupt" in errors["layer_truncated"] and "layer 2" in errors["layer_truncated"]
        assert "weight has shape (4, 4) in the file and (16, 8) in the model" in errors["layer_other_model"]
        assert "missing keys ['weight', 'bias']" in errors["layer_other_keys"]
        assert "unexpected keys ['w', 'b']" in errors["layer_other_keys"]
        assert "mp_rank_01_model_states.pt is missing" in errors["mp_rank_missing"]
        assert "global_step999 does not exist" in errors["no_tag"], errors["no_tag"]
        assert errors["no_latest"] == "loaded: (None, None)"  # DeepSpeed's behaviour without a `latest` file
    # The rank that owns a broken layer raises its own error; its peer reports it.
    assert resumed[1]["bad_files"]["layer_missing"].startswith("CheckpointFileMissingError: stage 1")
    assert "other ranks cannot read it" in resumed[0]["bad_files"]["layer_missing"]
    assert "other ranks cannot read it" in resumed[1]["bad_files"]["layer_truncated"]


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("four_ranks"))
    return root, run_ranks(cases.reshape_parallel_write_frozen, 4, root, timeout=400)


def _union(per_rank, *keys):
    merged = {}
    for out in per_rank:
        value = out
        for key in keys:
            value = value[key]
        merged.update(value)
    return merged


def test_reshape_loads_the_weights_and_refuses_the_optimizer_state(four_ranks):
    _, per_rank = four_ranks
    saved = _union(per_rank, "s4", "weights")
    for stages, load in ((2, "load_optimizer_states=False"), (1, "load_module_only=True")):
        assert_same_weights(_union(per_rank, f"s{stages}", "weights"), saved, f"{stages} stages")
        for rank, out in enumerate(per_rank):
            assert_close(out[f"s{stages}"]["eval"], out["s4"]["eval"], f"rank {rank} eval loss, {stages} stages")
            refused = out[f"s{stages}"]["refused"]
            assert refused.startswith("CheckpointError: "), refused
            assert f"cannot follow a change from 4 to {stages} stages" in refused, refused
            assert "load_optimizer_states=False" in refused and "load_module_only=True" in refused
    # load_optimizer_states=False still loads the step counter and the LR schedule; module-only does not.
    assert per_rank[0]["s2"]["state"]["global_steps"] == per_rank[0]["s4"]["state"]["global_steps"]
    # As in DeepSpeed: WarmupLR's restored position reaches the optimizer's LR only at its next step(),
    # so until then the LR is the fresh scheduler's (warmup_min_lr) when the optimizer state is not loaded.
    assert per_rank[0]["s2"]["state"]["lr"] == 0.0 < per_rank[0]["s4"]["state"]["lr"]
    assert per_rank[0]["s1"]["state"]["global_steps"] == 0


def test_parallel_write_spreads_layer_files_over_data_parallel_ranks(four_ranks):
    root, per_rank = four_ranks
    layer_files = sorted(f for f in os.listdir(os.path.join(root, "parallel", "global_step1"))
                         if f.startswith("layer_"))
    assert layer_files == [f"layer_{i:02d}-model_states.pt" for i in range(6)]  # activations too (empty)
    written = {}
    for out in per_rank:
        p = out["parallel"]
        layers = [f for f in p["written"] if f.startswith("layer_")]
        assert layers, f"data-parallel rank {p['dp_id']} of stage {p['stage']} wrote no layer file"
        written.setdefault(p["stage"], []).extend(layers)
        assert_same_weights(p["loaded"], p["saved"], "loaded after a parallel write")
    assert sorted(written[0] + written[1]) == layer_files  # every layer exactly once


def test_exclude_frozen_parameters(four_ranks):
    root, per_rank = four_ranks
    frozen_file = os.path.join(root, "frozen", "global_step1", "layer_02-model_states.pt")
    assert torch.load(frozen_file, weights_only=True) == {}
    stage0 = per_rank[0]["frozen"]
    assert "missing keys ['weight', 'bias']" in stage0["strict"] and "load_module_strict=False" in stage0["strict"]
    for out in per_rank:
        f = out["frozen"]
        for k, v in f["saved"].items():
            expected = f["fresh"][k] if k.startswith("2.") else v  # the frozen layer keeps its own weights
            assert torch.equal(f["loaded"][k], expected), k
