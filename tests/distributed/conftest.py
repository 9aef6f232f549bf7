"""The `shared_results` fixture: tests marked with distributed.shared_ranks get
the per-rank results of their cases, run with the module's other selected
cases of the same world size in one process group."""
import pytest

from .distributed import SharedRuns


@pytest.fixture(scope="module")
def _shared_runs(request, tmp_path_factory):
    items = [item for item in request.session.items if getattr(item, "module", None) is request.module]
    return SharedRuns(items, lambda: tmp_path_factory.mktemp("shared"))


@pytest.fixture
def shared_results(request, _shared_runs):
    """This test's per-rank results of the case(s) its `shared_ranks` mark names (distributed.py)."""
    return _shared_runs.results_for(request.node.nodeid)
