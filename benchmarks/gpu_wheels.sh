#!/usr/bin/env bash
# Fills .whl/ (ignored) with what the GPU machine lacks for the GPU check: it has torch 2.11 on
# Python 3.12 and nothing can be downloaded there. A deepspeed wheel built here, and its
# dependencies as wheels for CPython 3.12 on x86-64 Linux; gpu_check.sh installs them with
# --no-deps into a folder of its own. About 10 MB: with build/nccl/libnccl.so.2.xz (30 MB) and the
# working tree, a run carries about 42 MB of the 64 MiB a run may take.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p .whl
$PY -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .whl \
  einops hjson msgpack ninja packaging psutil py-cpuinfo pydantic pydantic-core annotated-types \
  typing-inspection typing-extensions tqdm nvidia-ml-py
du -sh .whl && ls .whl
