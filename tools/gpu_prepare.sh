#!/usr/bin/env bash
# Prepares what tools/gpu_check.sh carries to the lent GPU machine, which has Python 3.12, CUDA torch, nvcc, CMake,
# ninja, nanobind, scikit-build-core and the nvidia-cufile wheel, but no Debian -dev packages and no network.
# Run here (network to the package registries), as root:   tools/gpu_prepare.sh [CARRY_DIR]   (default build-gpu-carry)
#
#   CARRY_DIR/src.tar        this commit of the repository (git archive HEAD)
#   CARRY_DIR/debs/*.deb     the -dev packages the build needs (and pkgconf), unpacked by gpu_check.sh with dpkg -x
#   CARRY_DIR/wheels/*.whl   pytest and transformers for CPython 3.12, installed by gpu_check.sh only if missing
#
# The folder is a build output: never committed (/build*/ is ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=${1:-build-gpu-carry}
rm -rf "$CARRY"
mkdir -p "$CARRY/debs" "$CARRY/wheels"

git archive --format=tar -o "$CARRY/src.tar" HEAD

# Headers, static/shared libraries and .pc files of everything CMakeLists.txt finds, plus pkg-config itself.
debs=(liburing-dev liburing2 libzstd-dev libzstd1 liblz4-dev liblz4-1 libxxhash-dev libxxhash0 nlohmann-json3-dev
      libgtest-dev pkgconf pkgconf-bin libpkgconf3)
apt-get update -qq
(cd "$CARRY/debs" && apt-get download -qq "${debs[@]}")

# Wheels for the GPU image's Python (3.12, manylinux x86_64); torch is there already and is not carried.
python3 -m pip download -q -d "$CARRY/wheels" --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --platform any "pytest>=7" "transformers>=4.40,<5" "safetensors" "numpy"

du -sh "$CARRY"
echo "gpu_prepare: carry $CARRY to the GPU machine, unpack src.tar, run: TS_CARRY=<carry dir> tools/gpu_check.sh"
