import os
import pathlib

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

TESTS = pathlib.Path(__file__).resolve().parent
TIERS = ("unit", "distributed", "gpu")  # the markers pyproject.toml registers


def pytest_collection_modifyitems(config, items):
    """Marks every test with its tier, the folder it lives in (tests/unit ->
    `unit`, ...), so `-m unit` or `-m "not distributed"` select by tier."""
    for item in items:
        try:
            folder = item.path.resolve().relative_to(TESTS).parts[0]
        except ValueError:
            continue  # not under tests/
        if folder not in TIERS:
            raise pytest.UsageError(f"{item.nodeid}: put the test in tests/unit (one process), tests/distributed "
                                    f"(spawns ranks or training processes) or tests/gpu")
        item.add_marker(getattr(pytest.mark, folder))
