"""The crash aid (_C.print_native_stack_on_crash): a segmentation fault
prints the native stack, then Python's faulthandler its stacks, and the
process still dies of the signal."""
import os
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CRASH = """
import ctypes, faulthandler
faulthandler.enable()
from deepspeed_pipe_ext._native import _C
_C.print_native_stack_on_crash()
_C.print_native_stack_on_crash()  # a second call changes nothing
ctypes.string_at(0)  # reads address 0
"""


def test_a_segmentation_fault_prints_the_native_and_python_stacks():
    done = subprocess.run([sys.executable, "-c", CRASH], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT)
    assert done.returncode == -signal.SIGSEGV, (done.returncode, done.stderr[-2000:])
    native = done.stderr.find("deepspeed_pipe_ext: fatal signal; native stack")
    python = done.stderr.find("Fatal Python error: Segmentation fault")
    assert 0 <= native < python, done.stderr[-3000:]
    assert "libc.so" in done.stderr[native:python]  # frames, not just the header
