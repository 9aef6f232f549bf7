"""Single-process tests: no ranks, no training subprocesses (`make test-fast`)."""
