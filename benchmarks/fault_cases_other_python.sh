#!/usr/bin/env bash
# The fault-injection and transfer tests on another torch and Python, under CPython's debug allocator
# (PYTHONMALLOC=debug: an allocation made without the GIL aborts at once) and faulthandler. The crash on
# CUDA (a failed batch killing the other rank) ran on torch 2.11 with CPython 3.12, while the CPU tests
# use torch 2.13 with CPython 3.11: this runs the CPU side on the crash's software.
#
#   VENV=/path/to/venv bash benchmarks/fault_cases_other_python.sh [pytest args]
#
# VENV holds the other Python with torch, deepspeed==0.19.8 and pytest, e.g.
#   python3.12 -m venv /tmp/venv312 && /tmp/venv312/bin/pip install torch==2.11.0 deepspeed==0.19.8 pytest
# (the PyPI torch 2.11 wheel runs on the CPU). The extension is built for it into build/other-python
# (about 5 minutes on 2 cores), leaving the main build alone.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || set -- tests/distributed/test_faults.py tests/distributed/test_p2p.py tests/unit/test_executor.py
: "${VENV:?set VENV to the virtual environment of the other Python}"
PY=$VENV/bin/python
TAG=$($PY -c 'import sys, torch; print("py%d%d-torch%s" % (sys.version_info[0], sys.version_info[1], torch.__version__))')
DEST=build/other-python/$TAG
DPE_NO_CUDA=1 DPE_WERROR=1 MAX_JOBS=${MAX_JOBS:-2} $PY setup.py -q build_ext --build-temp "$DEST/temp" --build-lib "$DEST/lib"
rm -rf "$DEST/pkg" && mkdir -p "$DEST/pkg"
cp -r deepspeed_pipe_ext "$DEST/pkg/" && rm -f "$DEST"/pkg/deepspeed_pipe_ext/_C*.so
cp "$DEST"/lib/deepspeed_pipe_ext/_C*.so "$DEST/pkg/deepspeed_pipe_ext/"
$PY -c "import sys, torch; print('Python', sys.version.split()[0], 'torch', torch.__version__)"
# CUDA_VISIBLE_DEVICES="": DeepSpeed picks its CPU accelerator, as on the CPU machine.
PYTHONPATH=$PWD/$DEST/pkg:$PWD PYTHONMALLOC=debug PYTHONFAULTHANDLER=1 CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1 \
  "$VENV/bin/pytest" -q -p no:cacheprovider --import-mode=append "$@"
