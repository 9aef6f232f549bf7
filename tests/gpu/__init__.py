"""Tests of the GPU check (benchmarks/gpu_check.py): on the CPU, its dry run."""
