#!/usr/bin/env bash
# Every GPU check in one script, for the lent GPU machine (about 15 minutes a session, machine start included):
# builds with only what tools/gpu_prepare.sh carried, runs the C++ and Python GPU tests, then G1-G4
# (benchmarks/gpu.py), writing JSON into OUT_DIR (default benchmarks/results/). Target: under 5 minutes.
#
#   TS_CARRY=/path/to/carry tools/gpu_check.sh [OUT_DIR]            on the GPU machine
#   TS_CARRY=build-gpu-carry tools/gpu_check.sh --dry-run [OUT_DIR]  here: the same steps, the CUDA double instead
#                                                                     of a GPU (rehearsal; timings meaningless)
# Run it under `timeout 420` so that a hang leaves time for one rerun. Exit status: the first failing step's.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
OUT=${1:-benchmarks/results}
CARRY=$(cd "${TS_CARRY:-build-gpu-carry}" && pwd)
PY=${PYTHON:-python3}
step() { printf '\n== %s (%ss)\n' "$1" "$SECONDS"; }

step "unpack the carried Debian packages into $CARRY/prefix"
PREFIX=$CARRY/prefix
if [ ! -d "$PREFIX/usr" ]; then
  for deb in "$CARRY"/debs/*.deb; do dpkg -x "$deb" "$PREFIX"; done
  # .pc files name /usr; point them at the prefix (the folder may have moved since it was unpacked elsewhere).
  find "$PREFIX" -name '*.pc' -exec sed -i "s|^prefix=/usr|prefix=$PREFIX/usr|" {} +
fi
MULTIARCH=x86_64-linux-gnu
export PATH=$PREFIX/usr/bin:$PATH
export LD_LIBRARY_PATH=$PREFIX/usr/lib/$MULTIARCH${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
# Only the carried .pc files: a build that works here then works where no -dev package exists.
export PKG_CONFIG_LIBDIR=$PREFIX/usr/lib/$MULTIARCH/pkgconfig:$PREFIX/usr/share/pkgconfig
export CMAKE_PREFIX_PATH=$PREFIX/usr${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}
command -v pkg-config >/dev/null || ln -sf pkgconf "$PREFIX/usr/bin/pkg-config"

step "Python packages (installed from the carried wheels only when missing)"
SITE=$CARRY/site
export PYTHONPATH=$PWD/python:$SITE${PYTHONPATH:+:$PYTHONPATH}
for module in pytest transformers safetensors numpy; do
  if ! "$PY" -c "import $module" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --find-links "$CARRY/wheels" --target "$SITE" "$module"
  fi
done
"$PY" - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY

step "build (Release, tests on)"
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DTS_PYTHON_INPLACE=ON \
      -DPython_EXECUTABLE="$(command -v "$PY")" >/dev/null
cmake --build build-gpu -j "$(nproc)"
grep -q "$PREFIX" build-gpu/CMakeCache.txt && echo "build: dependencies from $PREFIX"

step "C++ GPU tests (ctest -L gpu) and the CUDA suites"
ctest --test-dir build-gpu -L gpu --output-on-failure
ctest --test-dir build-gpu -R 'Cuda|EngineOnCuda' --output-on-failure

step "Python GPU tests (pytest -m gpu) and the device suite"
"$PY" -m pytest -q -m gpu python/tests -rs
"$PY" -m pytest -q python/tests/torch/test_device.py python/tests/test_cuda.py

step "G1-G4 (benchmarks/gpu.py)"
if [ "$DRY_RUN" = 1 ]; then
  "$PY" benchmarks/gpu.py --dry-run --out "$OUT"
else
  "$PY" benchmarks/gpu.py --out "$OUT"
fi
step "done"
