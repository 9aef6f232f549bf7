"""Runs dpe_suite_plugin.setup_process() at start-up of every Python process of a suite run.

DeepSpeed's DistributedTest starts its workers with multiprocessing's forkserver
or spawn: fresh interpreters that never load the pytest plugin. This file is on
their PYTHONPATH (run_deepspeed_pipe_suite.py puts it there) and acts only when
DPE_SUITE_ENGINE is set, so other processes are left alone.
"""
import os

if os.environ.get("DPE_SUITE_ENGINE"):
    import dpe_suite_plugin

    dpe_suite_plugin.setup_process()
