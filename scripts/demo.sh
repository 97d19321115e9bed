#!/usr/bin/env bash
# The main job on a fresh machine: installs what is missing, builds kept, and runs
# `kept demo`, the embedded default job. Extra arguments go to `kept demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -d /usr/local/cuda/bin ]] && export PATH="/usr/local/cuda/bin:$PATH"
KEPT_SKIP_PYTHON=1 bash scripts/install_deps.sh  # the demo needs no Python
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DKEPT_CUDA=AUTO >/dev/null
cmake --build build -j "${KEPT_JOBS:-$(nproc)}" --target kept
exec ./build/reference/kept demo "$@"
