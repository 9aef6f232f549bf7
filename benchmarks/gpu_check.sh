#!/usr/bin/env bash
# The GPU check (make gpu-check): on a machine with one NVIDIA GPU and a CUDA
# build of torch already installed. DeepSpeed and its missing pure-Python
# dependencies may come as wheels in .whl/ (see README: "GPU check").
# Builds the extension in place, then runs benchmarks/gpu_check.py; its
# summary and files go to $OUT (default out/gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-out/gpu_check}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dpe-site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/dpe-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi | tee "$OUT_DIR/nvidia-smi.txt"
start=$(date +%s)
MAX_JOBS=${MAX_JOBS:-16} $PY setup.py -q build_ext --inplace > "$OUT_DIR/build.log" 2>&1 || { tail -40 "$OUT_DIR/build.log"; exit 1; }
echo "extension built in $(( $(date +%s) - start )) s"
# After the build (the compilers need no NCCL): NCCL 2.30+ (make nccl) in front of torch's own, so that several ranks can share the one GPU.
NCCL_XZ=build/nccl/libnccl.so.2.xz
if [ -f "$NCCL_XZ" ]; then
  mkdir -p build/nccl-run
  $PY -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" \
    "$NCCL_XZ" build/nccl-run/libnccl.so.2 || exit 1
  export LD_PRELOAD=$PWD/build/nccl-run/libnccl.so.2${LD_PRELOAD:+:$LD_PRELOAD}
  export NCCL_MULTI_RANK_GPU_ENABLE=1 NCCL_NVLS_ENABLE=0 NCCL_MAX_CTAS=${NCCL_MAX_CTAS:-2}
  echo "preloading NCCL $(cat build/nccl/VERSION 2>/dev/null) from $NCCL_XZ"
else
  echo "no $NCCL_XZ (make nccl): torch's own NCCL; the sections with several ranks on one GPU need 2.30+"
fi
PYTHONUNBUFFERED=1 $PY benchmarks/gpu_check.py --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log" | grep -v "^\[20"
