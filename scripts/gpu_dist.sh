#!/usr/bin/env bash
# Builds, on the development machine, everything a GPU check needs into dist/ (ignored by git):
# the release binary and the CUDA parity tests with the kernels embedded, stripped (nvcc from the
# pinned PyPI wheels), plus the PyTorch baselines and the peft wheel. The GPU machine has no
# cargo: carry dist/.
#   bash scripts/gpu_dist.sh && (on the GPU machine) bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=$(bash scripts/install_nvcc.sh)
export NVCC
touch build.rs # make build.rs look for nvcc again after a CPU-only build
cargo build --release
rm -rf dist && mkdir -p dist
# The device machine takes at most 64 MiB: carry only what gpu_check.sh runs, stripped.
strip -o dist/topcoat target/release/topcoat
cargo test --release --test cuda_parity --test cuda_training --no-run --message-format=json 2>/dev/null |
  python3 -c '
import json, shutil, sys
for line in sys.stdin:
    m = json.loads(line)
    name = m.get("target", {}).get("name")
    if m.get("reason") == "compiler-artifact" and m.get("executable") and name in ("cuda_parity", "cuda_training"):
        shutil.copy(m["executable"], "dist/" + name)
'
strip dist/cuda_parity dist/cuda_training
cp scripts/bench_torch.py scripts/bench_peft.py dist/
# The PEFT baseline's wheels (scripts/fetch_bench_wheels.sh), installed there by gpu_lora_check.sh.
if compgen -G ".bench-wheels/*.whl" >/dev/null; then
  mkdir -p dist/wheels && cp .bench-wheels/*.whl dist/wheels/
else
  echo "no .bench-wheels/: bench_peft.py will use the GPU image's peft (bash scripts/fetch_bench_wheels.sh)"
fi
du -sh dist
ls -l dist
