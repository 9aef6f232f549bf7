#!/usr/bin/env bash
# Builds NCCL for the GPU check (make nccl): a release of 2.30 or later, for the H100/H200's
# architecture only (sm_90), so that the library fits in what a run on the lent GPU machine
# may carry (64 MiB). NCCL 2.30 is the first release that lets several ranks share one GPU
# (NCCL_MULTI_RANK_GPU_ENABLE=1); torch loads libnccl.so.2 dynamically, so gpu_check.sh puts
# this one in front of torch's with LD_PRELOAD.
#
# Output: build/nccl/libnccl.so.2 (stripped) and build/nccl/libnccl.so.2.xz (what travels),
# plus build/nccl/VERSION. A finished build is reused: delete build/nccl to redo it.
# About 18 minutes on 2 cores; NCCL's sources and binaries are never committed (build/ is ignored).
#
#   NCCL_REPO  where to clone NCCL from (default https://github.com/NVIDIA/nccl; a local clone works)
#   NCCL_TAG   the release tag (default v2.30.7-1)
#   NCCL_ARCH  the gencode (default compute_90 -> sm_90: H100, H200)
#   CUDA_HOME  the CUDA toolkit (default /usr/local/cuda-13.0, else the nvcc on PATH)
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=${NCCL_REPO:-https://github.com/NVIDIA/nccl}
TAG=${NCCL_TAG:-v2.30.7-1}
ARCH=${NCCL_ARCH:-90}
DEST=build/nccl
SRC=$DEST/src-$TAG
if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda-13.0/bin/nvcc ]; then CUDA_HOME=/usr/local/cuda-13.0
  else CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")"); fi
fi
if [ -f "$DEST/libnccl.so.2.xz" ] && [ "$(cat "$DEST/VERSION" 2>/dev/null)" = "$TAG sm_$ARCH" ]; then
  echo "NCCL $TAG for sm_$ARCH already built: $DEST/libnccl.so.2.xz ($(du -h "$DEST/libnccl.so.2.xz" | cut -f1))"
  exit 0
fi
mkdir -p "$DEST"
if [ ! -f "$SRC/makefiles/version.mk" ]; then
  rm -rf "$SRC"
  echo "cloning NCCL $TAG from $REPO"
  git -c advice.detachedHead=false clone -q --depth 1 --branch "$TAG" "$REPO" "$SRC"
fi
start=$(date +%s)
echo "building NCCL $TAG for sm_$ARCH with $CUDA_HOME/bin/nvcc (about 18 minutes on 2 cores)"
make -C "$SRC" -j"$(nproc)" src.build CUDA_HOME="$CUDA_HOME" \
  NVCC_GENCODE="-gencode=arch=compute_$ARCH,code=sm_$ARCH" > "$DEST/build.log" 2>&1 \
  || { tail -30 "$DEST/build.log"; exit 1; }
lib=$(readlink -f "$SRC/build/lib/libnccl.so.2")
cp "$lib" "$DEST/libnccl.so.2"
strip --strip-unneeded "$DEST/libnccl.so.2"
xz -T0 -9 -kf "$DEST/libnccl.so.2"
echo "$TAG sm_$ARCH" > "$DEST/VERSION"
echo "built in $(( $(date +%s) - start )) s: $DEST/libnccl.so.2 $(du -h "$DEST/libnccl.so.2" | cut -f1)," \
  "compressed $(du -h "$DEST/libnccl.so.2.xz" | cut -f1) ($(basename "$lib"))"
