"""The demo (README's first command), shortened: two stages launched with
torchrun train on the bundled digits and draw the measured timeline."""
import os
import subprocess
import sys


def run_demo(tmp_path, schedule):
    picture = tmp_path / f"timeline-{schedule}.png"
    run = subprocess.run([sys.executable, "-m", "deepspeed_pipe_ext.demo", "--steps", "10", "--schedule", schedule,
                          "--timeline", str(picture)], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "engine: deepspeed_pipe_ext.engine.PipelineEngine" in run.stdout
    assert picture.stat().st_size > 10_000
    return [float(line.split()[3]) for line in run.stdout.splitlines() if line.startswith("step ")]


def test_demo_trains_and_draws_its_timeline(tmp_path):
    losses = run_demo(tmp_path, "1f1b")
    assert len(losses) == 2 and losses[1] < losses[0]  # steps 1 and 10
    # The zero-bubble schedule splits the backward; the training is the same.
    assert run_demo(tmp_path, "zb-h1") == losses
