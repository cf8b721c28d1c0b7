#!/usr/bin/env bash
# Installs nvcc 13.0 from PyPI wheels into <repo>/.nvcc (a Python venv) and prints its path.
#
# For machines without a CUDA toolkit (development, CI). Idempotent: a venv that already holds
# the pinned versions is left alone. All five wheels are pinned, since pinning nvcc alone pulls
# a newer crt/nvvm, and PTX from nvcc 13.5 does not JIT on driver 580 (docs/BUILD.md).
# Usage: scripts/install_nvcc.sh    then    export NVCC=<printed path>
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
venv="$repo/.nvcc"
pins=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
)

find_nvcc() {
  local f
  for f in "$venv"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc; do
    [[ -x $f ]] && { echo "$f"; return 0; }
  done
  return 1
}

installed_ok() {
  [[ -x $venv/bin/python ]] || return 1
  local frozen
  frozen=$("$venv/bin/python" -m pip freeze 2>/dev/null) || return 1
  local p
  for p in "${pins[@]}"; do
    grep -qix "$p" <<<"$frozen" || return 1
  done
  find_nvcc >/dev/null
}

if ! installed_ok; then
  echo "installing nvcc 13.0 wheels into $venv" >&2
  [[ -x $venv/bin/python ]] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${pins[@]}" >&2
fi

nvcc=$(find_nvcc) || { echo "error: nvcc not found under $venv after install" >&2; exit 1; }
"$nvcc" --version | grep -q "release 13.0" || { echo "error: $nvcc is not release 13.0" >&2; exit 1; }
echo "$nvcc"
