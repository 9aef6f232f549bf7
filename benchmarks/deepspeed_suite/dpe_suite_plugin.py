"""pytest plugin of run_deepspeed_pipe_suite.py (`-p dpe_suite_plugin`), and the set-up of every process.

setup_process() runs in the pytest process (pytest_configure) and in DeepSpeed's
test workers (stubs/sitecustomize.py). It
- gives torch.cpu the get_rng_state / set_rng_state that torch.random.fork_rng
  (device_type="cpu", used by DeepSpeed's tests/unit/alexnet_model.py) calls
  and torch 2.13 does not have: a stand-in over torch's one CPU generator;
- gives DeepSpeedEngine an empty `sparse_tensor_module_names` where the
  installed deepspeed (0.19.8) dropped it: tests/unit/checkpoint/common.py of
  older test trees compares it first, before the checkpoint contents;
- imports the installed deepspeed first, before DeepSpeed's tests/conftest.py
  puts the source tree (which has its own deepspeed/) on sys.path;
- with DPE_SUITE_ENGINE=ours, imports deepspeed_pipe_ext and calls
  run_deepspeed_pipelines_on_this_engine(), so deepspeed.initialize builds our
  engine for DeepSpeed's own PipelineModule;
- wraps deepspeed.initialize to append, for every PipelineModule, the engine
  class it built (or the exception it raised) to the file DPE_SUITE_RECORD.
The hooks write one JSON line per test to DPE_SUITE_RESULTS: outcome, duration,
the engines recorded while it ran (by any process), the end of the failure text.
"""
import functools
import json
import os
import time

_set_up = False


def setup_process():
    global _set_up
    engine = os.environ.get("DPE_SUITE_ENGINE")
    if _set_up or engine not in ("deepspeed", "ours"):
        return
    _set_up = True
    import torch
    if not hasattr(torch.cpu, "get_rng_state"):
        torch.cpu.get_rng_state = lambda device="cpu": torch.get_rng_state()
        torch.cpu.set_rng_state = lambda new_state, device="cpu": torch.set_rng_state(new_state)
    import deepspeed
    from deepspeed.runtime.engine import DeepSpeedEngine
    if not hasattr(DeepSpeedEngine, "sparse_tensor_module_names"):
        DeepSpeedEngine.sparse_tensor_module_names = frozenset()
    if engine == "ours":
        import deepspeed_pipe_ext
        deepspeed_pipe_ext.run_deepspeed_pipelines_on_this_engine()
    original = deepspeed.initialize

    @functools.wraps(original)
    def initialize(*args, **kwargs):
        model = kwargs.get("model", args[1] if len(args) > 1 else None)
        try:
            result = original(*args, **kwargs)
        except BaseException as e:
            _record(model, f"raised {type(e).__name__}")
            raise
        _record(model, f"{type(result[0]).__module__}.{type(result[0]).__qualname__}")
        return result

    deepspeed.initialize = initialize


def _record(model, what):
    import deepspeed
    from deepspeed.runtime.pipe.module import PipelineModule
    path = os.environ.get("DPE_SUITE_RECORD")
    if path and isinstance(model, PipelineModule):
        with open(path, "a") as f:  # one short append per line: atomic across processes
            f.write(f"{os.getpid()}\t{what}\t{deepspeed.__file__}\n")


def _record_size():
    path = os.environ.get("DPE_SUITE_RECORD")
    return os.path.getsize(path) if path and os.path.exists(path) else 0


_tests = {}


def pytest_configure(config):
    setup_process()


def pytest_runtest_logstart(nodeid, location):
    _tests[nodeid] = {"nodeid": nodeid, "outcome": "passed", "start": time.time(), "offset": _record_size()}


def pytest_runtest_logreport(report):
    test = _tests[report.nodeid]
    if report.failed:
        test["outcome"] = "failed" if report.when == "call" else "error"
        test["message"] = report.longreprtext[-4000:]
    elif report.skipped and test["outcome"] == "passed":
        test["outcome"] = "skipped"
        test["message"] = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else ""


def pytest_runtest_logfinish(nodeid, location):
    test = _tests.pop(nodeid)
    engines = []
    path = os.environ.get("DPE_SUITE_RECORD")
    if path and os.path.exists(path):
        with open(path) as f:
            f.seek(test.pop("offset"))
            engines = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    test.update(duration=round(time.time() - test.pop("start"), 1), engines=engines)
    with open(os.environ["DPE_SUITE_RESULTS"], "a") as f:
        f.write(json.dumps(test) + "\n")
