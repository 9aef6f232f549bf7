"""Tests that spawn ranks (distributed.run_ranks) or training processes, with
the per-rank bodies they run (*_cases.py), imported by name in every rank."""
