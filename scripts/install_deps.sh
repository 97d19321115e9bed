#!/usr/bin/env bash
# Installs what kept needs on Debian 12: the build toolchain and libraries (apt), the text
# corpora the demo trains on (apt), and the Python venv used by the third-party parity tests
# (PyPI, cached outside the repo by scripts/python_env.sh). Idempotent and quick when
# everything is already there. Set KEPT_SKIP_PYTHON=1 to skip the venv.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  build-essential cmake ninja-build pkg-config
  catch2 libopenblas-openmp-dev nlohmann-json3-dev libcli11-dev
  libsentencepiece-dev sentencepiece libgd-dev
  coq                              # checks proofs/opm.v
  clang libclang-rt-14-dev         # the libFuzzer target
  openmpi-bin libopenmpi-dev       # the MPI communicator and its mpirun tests
  python3-venv python3-pip
  bible-kjv-text bible-kjv fortunes fortunes-zh   # demo corpora
)

missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
  echo "kept: installing Debian packages: ${missing[*]}"
  as_root=()
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || { echo "kept: need root (or sudo) to apt-get install ${missing[*]}" >&2; exit 1; }
    as_root=(sudo)
  fi
  export DEBIAN_FRONTEND=noninteractive
  "${as_root[@]}" apt-get update -qq
  "${as_root[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "kept: Debian packages present"
fi

if command -v nvcc >/dev/null || [[ -x /usr/local/cuda/bin/nvcc ]]; then
  echo "kept: CUDA toolkit found ($( (command -v nvcc || echo /usr/local/cuda/bin/nvcc) ))"
else
  echo "kept: no CUDA toolkit: building the CPU library only"
fi

if [[ "${KEPT_SKIP_PYTHON:-0}" != 1 ]]; then
  bash scripts/python_env.sh
fi
