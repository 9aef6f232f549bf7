"""The demo (README's first command), shortened: two stages launched with
torchrun (or DeepSpeed's launcher) train on the bundled digits and draw the
measured timeline (a picture and a Chrome/Perfetto trace)."""
import os
import subprocess
import sys

from .distributed import free_port

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples")
DEMO = os.path.join(EXAMPLES, "demo.py")
sys.path.insert(0, EXAMPLES)  # demo_gpt, here and in the spawned ranks


def run(cmd):
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "engine: deepspeed_pipe_ext.engine.PipelineEngine" in done.stdout
    return [float(line.split()[3]) for line in done.stdout.splitlines() if line.startswith("step ")]


def run_demo(tmp_path, schedule, *extra):
    picture = tmp_path / f"timeline-{schedule}.png"
    losses = run([sys.executable, DEMO, "--steps", "10", "--schedule", schedule,
                  "--timeline", str(picture), *extra])
    assert picture.stat().st_size > 10_000
    # The same timeline as a Chrome/Perfetto trace: both stages' passes, named as torch.profiler shows them.
    import json
    events = json.loads((tmp_path / f"timeline-{schedule}.json").read_text())["traceEvents"]
    slices = [e for e in events if e["ph"] == "X"]
    assert {e["tid"] for e in slices} == {0, 1}
    assert any(e["name"] == "pipe stage 1 forward mb 0" for e in slices)
    assert all(e["dur"] >= 0 for e in slices)
    return losses


def test_demo_trains_and_draws_its_timeline(tmp_path):
    losses = run_demo(tmp_path, "1f1b")
    assert len(losses) == 2 and losses[1] < losses[0]  # steps 1 and 10
    # The zero-bubble schedule splits the backward; the training is the same.
    assert run_demo(tmp_path, "zb-h1") == losses
    # Two model chunks per rank (other layers per rank, so other initial weights): it trains too.
    interleaved = run_demo(tmp_path, "interleaved-1f1b", "--virtual-stages", "2")
    assert len(interleaved) == 2 and interleaved[1] < interleaved[0]
    import json
    names = {e["name"] for e in json.loads((tmp_path / "timeline-interleaved-1f1b.json").read_text())["traceEvents"]}
    assert "pipe stage 0 forward mb 0 chunk 1" in names and "pipe stage 1 backward mb 0" in names
    # Two chunks per rank in a V under zb-v: the loss on stage 0's second chunk.
    zbv = run_demo(tmp_path, "zb-v")
    assert len(zbv) == 2 and zbv[1] < zbv[0]
    names = {e["name"] for e in json.loads((tmp_path / "timeline-zb-v.json").read_text())["traceEvents"]}
    assert "pipe stage 0 backward input mb 0 chunk 1" in names and "pipe stage 1 forward mb 0 chunk 1" in names


def test_deepspeed_launcher_runs_the_demo_workers(tmp_path):
    port = free_port()
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    losses = run([launcher, "--num_gpus", "2", "--master_port", str(port), DEMO,
                  "--worker", "--steps", "1", "--timeline", str(tmp_path / "t.png")])
    assert len(losses) == 1 and 2.0 < losses[0] < 2.6  # an untrained 10-class classifier: about ln(10)


def test_gpt_demo_trains_with_tensor_parallel_stages_and_writes_text():
    """PP=2 x TP=2 (4 processes): the character-level GPT's loss falls and it samples text."""
    done = subprocess.run([sys.executable, DEMO, "--model", "gpt", "--tensor-parallel", "2",
                           "--steps", "20"], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "2 stages x 2 tensor-parallel ranks" in done.stdout
    assert "engine: deepspeed_pipe_ext.engine.PipelineEngine" in done.stdout
    losses = [float(line.split()[3]) for line in done.stdout.splitlines() if line.startswith("step ")]
    assert len(losses) == 2 and losses[1] < losses[0] - 0.5, losses  # steps 1 and 20
    sample = done.stdout.split("sample:\n", 1)[1]
    assert sample.startswith("def ") and len(sample.strip()) > 100, sample


def _block_on_a_topology_without_tensor_parallelism(rank, world_size):
    import demo_gpt
    import torch
    import torch.distributed as dist
    block = demo_gpt.TransformerBlock(hidden=8, heads=2, tp=2)
    inputs = (torch.randn(1, 4, 8), torch.ones(1, 4, dtype=torch.bool))
    errors = []
    for group in (None, dist.group.WORLD):  # unset, then a tensor-parallel group of 1 rank
        demo_gpt.TensorParallel.group = group
        try:
            block(inputs)
            errors.append(None)
        except (RuntimeError, ValueError) as err:
            errors.append(str(err))
    return errors


def test_a_tensor_parallel_block_refuses_a_group_of_the_wrong_size():
    from .distributed import run_ranks
    (errors, ) = run_ranks(_block_on_a_topology_without_tensor_parallelism, 1)
    assert "TensorParallel.group is not set" in errors[0], errors
    assert "tp=2" in errors[1] and "has 1 rank(s)" in errors[1] and "num_mp=2" in errors[1], errors
