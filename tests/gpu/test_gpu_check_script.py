"""The GPU check (benchmarks/gpu_check.py) must be ready to run in one call
on a GPU machine: its --cpu-dry-run runs the same code on the CPU over gloo."""
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gpu_check_runs_every_section_on_the_cpu(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--cpu-dry-run", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = {k: v for k, v in results.items() if k != "environment"}
    assert len(sections) == 14
    failed = {k: v.get("error") for k, v in sections.items() if not v["ok"]}
    assert not failed, failed
    s1 = next(v for k, v in sections.items() if k.startswith("S=1"))
    assert s1["all_equal"] and all(s1[p]["weights_bitwise_equal"] for p in ("fp32", "bf16", "fp16", "bf16-zero1"))
    s2 = next(v for k, v in sections.items() if k.startswith("S=2"))
    assert s2["losses_equal"] and s2["loss_falls"] and all(s2["gpipe_zbh1_losses_equal"].values())
    tp = next(v for k, v in sections.items() if k.startswith("PP=2 x TP=2"))
    assert tp["split_equals_unsplit"] and all(tp["gpipe_zbh1_equal"].values()) and tp["loss_falls"]
    split_bytes, unsplit_bytes = (tp["stage0_activation_send_bytes"]["split"],
                                  tp["stage0_activation_send_bytes"]["unsplit"])
    assert min(split_bytes) * 2 == max(unsplit_bytes), tp["stage0_activation_send_bytes"]  # the share, and its shape
    faults = next(v for k, v in sections.items() if k.startswith("a failed batch"))
    assert faults["all_stopped_within_5s"], faults
    assert any("send activation" in n for n in s2["profiled_labels"]["0"])
    assert (tmp_path / "s2_stage0_trace.json").stat().st_size > 1000
    assert "==== summary ====" in done.stdout and "FAIL" not in done.stdout
    # The sections with several ranks on one GPU over NCCL (over gloo in the dry run).
    by_start = lambda prefix: next(v for k, v in sections.items() if k.startswith(prefix))  # noqa: E731
    schedules = by_start("S=2 over NCCL")
    assert schedules["all_equal"] and schedules["fp16_overflow_step_skipped"]
    assert set(schedules["fp32"]) >= {"1f1b", "gpipe", "zb-h1"} and set(schedules["bf16"]) >= {"1f1b", "gpipe"}
    virtual = by_start("virtual stages at S=2")
    assert virtual["all_ok"] and virtual["zb-v/transformer dynamic"]["replay_ok"]
    assert virtual["interleaved-1f1b/transformer dynamic"]["operations"] > 0
    four = by_start("S=4 over NCCL")
    assert four["admitted"] and four["all_ok"]
    assert by_start("PP=2 x TP=2 over NCCL")["split_equals_unsplit"]
    assert by_start("a failed batch at S=2 over NCCL")["all_stopped_within_5s"]
    overlap = by_start("a compute-bound S=2 step")
    assert set(overlap["by_rank"]) == {"0", "1"} and overlap["trace_bytes"] > 1000
    assert by_start("overhead-bound train_batch at S=2")["speedup_rank0"] > 0
    packing = by_start("a tuple activation over NCCL")["receiver"]
    assert packing and all(row["three_us"] > 0 and row["packed_us"] > 0 for row in packing.values())


def test_hidden_fraction_counts_transfer_time_under_any_compute_kernel():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import gpu_check_nccl
    # Compute [2, 6] (two overlapping kernels, counted once) and [8, 20] cover 4 + 2 of the transfer's 10.
    assert gpu_check_nccl.hidden_fraction([(0, 10)], [(2, 4), (3, 6), (8, 20)]) == (0.6, 10)
    assert gpu_check_nccl.hidden_fraction([(0, 4), (10, 12)], [(11, 30)]) == (1 / 6, 6)
    assert gpu_check_nccl.hidden_fraction([], [(0, 1)]) == (None, 0)


def test_a_section_past_the_budget_is_skipped_and_reported_as_not_passed(monkeypatch):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import gpu_check
    ran = []

    @gpu_check.section("a section for the test")
    def body():
        ran.append(1)
        return {"figure": 1}

    monkeypatch.setattr(gpu_check, "DEADLINE", time.monotonic() + 60)
    body()
    assert ran == [1] and gpu_check.RESULTS["a section for the test"]["ok"]
    monkeypatch.setattr(gpu_check, "DEADLINE", time.monotonic() - 1)
    body()
    result = gpu_check.RESULTS.pop("a section for the test")
    assert ran == [1] and not result["ok"] and "--budget-s" in result["error"]
