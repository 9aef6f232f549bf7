"""Loads the compiled extension with an error that says how to build it."""
import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

try:
    from . import _C  # noqa: F401
except ImportError as err:  # pragma: no cover - only when the build is missing
    raise ImportError(
        "deepspeed_pipe_ext._C is not built or was built against another torch "
        f"({err}). Build it with `pip install --no-build-isolation -e .` in the repo "
        "(or `make build`), using the same torch you run with."
    ) from err
