"""Every private torch or DeepSpeed name this package uses still exists in
the installed versions (deepspeed_pipe_ext/_deepspeed_compat.py lists them)."""
from deepspeed_pipe_ext import _deepspeed_compat


def test_every_private_name_still_exists():
    missing = [f"{module.__name__}.{name}" for module, name in _deepspeed_compat.PRIVATE_NAMES
               if not hasattr(module, name)]
    assert not missing, f"gone from the installed version: {missing}"
    assert len(_deepspeed_compat.PRIVATE_NAMES) >= 12
