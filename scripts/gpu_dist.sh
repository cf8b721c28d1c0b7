#!/usr/bin/env bash
# Builds, on the development machine, everything a GPU check needs into dist/ (ignored by git):
# the release binary and the test executables with the CUDA kernels embedded (nvcc from the
# pinned PyPI wheels), plus the PyTorch baseline. The GPU machine has no cargo: carry dist/.
#   bash scripts/gpu_dist.sh && (on the GPU machine) bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=$(bash scripts/install_nvcc.sh)
export NVCC
touch build.rs # make build.rs look for nvcc again after a CPU-only build
cargo build --release
rm -rf dist && mkdir -p dist
cp target/release/topcoat dist/
# Test executables: the newest build of each integration test.
cargo test --release --no-run --message-format=json 2>/dev/null |
  python3 -c '
import json, shutil, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        shutil.copy(m["executable"], "dist/" + m["target"]["name"])
'
cp scripts/bench_torch.py dist/
du -sh dist
ls dist
