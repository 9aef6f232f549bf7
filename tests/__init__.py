"""The Python tests, one folder per tier: unit (single process, seconds),
distributed (real processes over gloo), gpu (the GPU check, a CPU dry run
here). Packages, so that a file name may repeat across tiers and every
module has one importable name, in spawned ranks too."""
