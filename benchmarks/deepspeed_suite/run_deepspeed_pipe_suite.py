"""DeepSpeed's own pipeline unit tests, run on DeepSpeed's PipelineEngine and on ours.

    .venv/bin/python benchmarks/deepspeed_suite/run_deepspeed_pipe_suite.py --deepspeed-src /work/deepspeed-src
    (or DEEPSPEED_SRC=...; options: --engines ours, -k EXPR, --tests unit/pipe ..., --timeout, --test-timeout)

The DeepSpeed source (a checkout or `git archive` of deepspeedai/DeepSpeed, the
tag of the installed version where there is one) gives only the tests: pytest
runs from its tests/ folder, and the installed deepspeed package is the library
in every process (checked: each engine built records deepspeed.__file__). With
no source found it says so and exits 0.

Each engine gets one pytest run, CPU only: LOCAL_SIZE=4 (DeepSpeed's CPU
accelerator reports it as the device count; without it the multi-process tests
skip), gloo, OMP_NUM_THREADS=1. "ours" = the plugin dpe_suite_plugin.py (-p)
and stubs/sitecustomize.py (for DeepSpeed's forkserver/spawn workers) call
deepspeed_pipe_ext.run_deepspeed_pipelines_on_this_engine() in every process;
the run fails if any PipelineModule got DeepSpeed's engine there.

Stand-ins (stubs/, on PYTHONPATH of these runs only):
- torchvision: not installed (no CPU build here); TestPipeCifar10 needs only
  datasets.FakeData and four transforms, so a minimal import-only copy.
- sitecustomize: the per-process set-up above.
In dpe_suite_plugin.setup_process, for every process:
- torch.cpu.get_rng_state / set_rng_state: torch 2.13 still lacks them and
  train_cifar's torch.random.fork_rng(device_type="cpu") calls them.
- DeepSpeedEngine.sparse_tensor_module_names (empty), where the installed
  deepspeed dropped it and the tests' checkpoint comparison still reads it.

Fail on both engines on the CPU, by design: test_pipeline.py's
test_checkpoint_pipe_engine[1] (fp16: "Type fp16 is not supported on your device").

DeepSpeed JIT-builds its CPU ops (shm_comm in every process's init_distributed,
fused_adam for "Adam") into a TORCH_EXTENSIONS_DIR of its own under --out: once,
about a minute; a directory shared with other jobs gets rebuilt under them.

Bounds: DS_UNITTEST_TIMEOUT (DeepSpeed's own per-test limit; a hang ends that
pytest run, the tests it did not reach show as "not run") and --timeout for a
whole run. Prints per engine passed/failed/skipped/error, the tests that pass on
one engine and fail on the other, the slow tests; exits 1 if any test passes on
DeepSpeed's engine and not on ours, or if ours did not run.
"""
import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so a `kill` of this runner ends its pytest too
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

# Every DeepSpeed unit test that builds a PipelineModule / PipelineEngine or tests the pipeline schedule or
# topology (schedule and topology tests call DeepSpeed's modules directly: the same on both engines).
# On the CPU the configurable-PP and checkpointable-layers tests skip themselves (torch version, CPU). Left out:
# test_onebit.py's *FP16Pipeline (fp16 only, and deepspeed 0.19.8 no longer has runtime.fp16.onebit).
TESTS = [
    "unit/pipe/test_pipe_module.py",
    "unit/runtime/pipe/test_pipe.py",
    "unit/runtime/pipe/test_pipe_schedule.py",
    "unit/runtime/pipe/test_topology.py",
    "unit/checkpoint/test_pipeline.py",
    "unit/checkpoint/test_autotp_uc_checkpoint.py::TestRealCheckpointUniversalConversionTPxPP",
    "unit/v1/zero/test_zero_user_backward.py::TestUnmanagedGradientAccumulationPipelineValidation",
    "unit/runtime/activation_checkpointing/test_activation_checkpointing.py::TestCheckpointableLayersConfig",
    "unit/model_parallelism/test_configurable_parallel_pp.py",
]
OUR_ENGINE_PREFIX = "deepspeed_pipe_ext."


def run_pytest(engine, src, tests, args, out):
    """One pytest run; returns {nodeid: result} and whether it ended by itself."""
    results, record = os.path.join(out, f"{engine}.jsonl"), os.path.join(out, f"{engine}.engines.tsv")
    for path in (results, record):
        if os.path.exists(path):
            os.remove(path)
    env = dict(os.environ, DPE_SUITE_ENGINE=engine, DPE_SUITE_RESULTS=results, DPE_SUITE_RECORD=record,
               LOCAL_SIZE="4", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", DS_UNITTEST_TIMEOUT=str(args.test_timeout),
               TORCH_EXTENSIONS_DIR=os.path.join(args.out, "torch_extensions"),
               PYTHONPATH=os.pathsep.join([os.path.join(HERE, "stubs"), HERE, os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "pytest", "-p", "dpe_suite_plugin", "-p", "no:cacheprovider", "-rN",
               "-W", "ignore::pytest.PytestAssertRewriteWarning", *tests]
    if args.k:
        command += ["-k", args.k]
    log = os.path.join(out, f"{engine}.log")
    print(f"[{engine}] running {len(tests)} test paths, log: {log}", flush=True)
    start, finished = time.time(), True
    with open(log, "w") as f:
        proc = subprocess.Popen(command, cwd=os.path.join(src, "tests"), env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            finished = False
        finally:  # a timeout, or this runner interrupted: end pytest and its workers
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    print(f"[{engine}] pytest exit {proc.returncode} after {time.time() - start:.0f} s"
          f"{'' if finished else ' (killed: --timeout)'}", flush=True)
    tests_run = {}
    if os.path.exists(results):
        with open(results) as f:
            for line in f:
                test = json.loads(line)
                tests_run[test["nodeid"]] = test
    return tests_run, finished and "Test hanged" not in open(log).read()


def check_engines(engine, tests_run, installed):
    """Problems with the engines recorded: ours must build ours, DeepSpeed's its own, both the installed package."""
    problems, built = [], 0
    for test in tests_run.values():
        for pid, what, ds_file in test["engines"]:
            built += not what.startswith("raised")
            if os.path.dirname(os.path.realpath(ds_file)) != installed:
                problems.append(f"{test['nodeid']}: deepspeed imported from {ds_file}, not {installed}")
            ours = what.startswith(OUR_ENGINE_PREFIX)
            if not what.startswith("raised") and ours != (engine == "ours"):
                problems.append(f"{test['nodeid']}: pid {pid} built {what} on the {engine} run")
    if engine == "ours" and built == 0 and tests_run:
        problems.append("no test built our engine")
    return problems


def report(runs):
    """Prints the counts, the slow tests and the tests whose outcome differs; returns the tests that pass on
    DeepSpeed's engine and not on ours."""
    print("\n== summary")
    outcomes = ["passed", "failed", "error", "skipped"]
    for engine, tests_run in runs.items():
        counts = {o: sum(t["outcome"] == o for t in tests_run.values()) for o in outcomes}
        ours = sum(any(e[1].startswith(OUR_ENGINE_PREFIX) for e in t["engines"]) for t in tests_run.values())
        print(f"{engine:>9}: " + ", ".join(f"{counts[o]} {o}" for o in outcomes) +
              (f"; {ours} tests built our engine" if engine == "ours" else ""))
    slow = sorted({(t["duration"], t["nodeid"]) for r in runs.values() for t in r.values() if t["duration"] >= 60})
    for duration, nodeid in reversed(slow):
        print(f"slow: {duration:.0f} s {nodeid}")
    if "deepspeed" not in runs or "ours" not in runs:
        return []
    regressions = []
    for a, b, label in (("deepspeed", "ours", "pass on DeepSpeed's engine, not on ours"),
                        ("ours", "deepspeed", "pass on ours, not on DeepSpeed's engine")):
        differ = [n for n, t in runs[a].items()
                  if t["outcome"] == "passed" and runs[b].get(n, {}).get("outcome") != "passed"]
        print(f"\n{len(differ)} tests {label}:")
        for nodeid in differ:
            other = runs[b].get(nodeid, {"outcome": "not run"})
            lines = other.get("message", "").strip().splitlines() or [""]
            why = ([line[1:] for line in lines if line.startswith("E ")] or lines)[-1].strip()
            in_log = other["outcome"] != "not run" and "E " not in other["message"]
            where = f" (workers' tracebacks: {b}.log)" if in_log else ""
            print(f"  {nodeid}: {other['outcome']}  {why[:200]}{where}")
        if a == "deepspeed":
            regressions = differ
    return regressions


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--deepspeed-src", default=os.environ.get("DEEPSPEED_SRC"))
    parser.add_argument("--engines", default="deepspeed,ours")
    parser.add_argument("--tests", nargs="+", default=TESTS, help="paths relative to DeepSpeed's tests/")
    parser.add_argument("-k", default=None, help="pytest -k expression")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds for one engine's whole run")
    parser.add_argument("--test-timeout", type=int, default=300, help="DS_UNITTEST_TIMEOUT: seconds for one test")
    parser.add_argument("--out", default=os.path.join(REPO, "out", "deepspeed_suite"))
    args = parser.parse_args()

    src = args.deepspeed_src
    if not src or not os.path.isfile(os.path.join(src, "tests", "unit", "common.py")):
        why = "no --deepspeed-src or DEEPSPEED_SRC given" if not src else f"{src}/tests/unit/common.py not found"
        print(f"SKIPPED: DeepSpeed's pipeline tests need a DeepSpeed source tree ({why}); "
              "e.g. a clone of https://github.com/deepspeedai/DeepSpeed at the installed version's tag, else master")
        return 0
    installed = os.path.realpath(os.path.dirname(importlib.util.find_spec("deepspeed").origin))
    version = subprocess.run([sys.executable, "-c", "import importlib.metadata as m; print(m.version('deepspeed'))"],
                             capture_output=True, text=True).stdout.strip()
    src_version = open(os.path.join(src, "version.txt")).read().strip() if os.path.exists(
        os.path.join(src, "version.txt")) else "?"
    print(f"DeepSpeed {version} installed ({installed}); tests from {src} (version.txt {src_version})")
    os.makedirs(args.out, exist_ok=True)

    engines = args.engines.split(",")
    runs, failed_checks = {}, False
    for engine in engines:
        tests_run, finished = run_pytest(engine, src, args.tests, args, args.out)
        problems = check_engines(engine, tests_run, installed)
        if not finished:
            problems.append("the run did not finish (a hang or --timeout): later tests not run")
        for problem in problems:
            print(f"[{engine}] CHECK FAILED: {problem}")
        failed_checks |= bool(problems)
        runs[engine] = tests_run

    regressions = report(runs)
    return 1 if regressions or failed_checks else 0


if __name__ == "__main__":
    sys.exit(main())
