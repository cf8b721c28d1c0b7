#!/usr/bin/env bash
# Writes the fatbin fixtures of tests/kernel_arch.rs from kernels/fill.cu with build.rs's flags:
#   tests/fixtures/fatbin/fill.fatbin      SASS sm_80, sm_86, sm_89, sm_120 (from compute_80),
#                                          sm_90 (from compute_90), PTX compute_80
#   tests/fixtures/fatbin/fill_ptx.fatbin  nvcc's own PTX-only container of the same file, which
#                                          Fatbin::ptx_only of the first must equal byte for byte
# Needs nvcc 13.0 (scripts/install_nvcc.sh). Usage: bash scripts/make_fatbin_fixture.sh
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(bash scripts/install_nvcc.sh)}
out=tests/fixtures/fatbin
mkdir -p "$out"
flags=(-O3 --use_fast_math -std=c++17 -Xptxas -v --fatbin -I kernels)
"$NVCC" -gencode "arch=compute_80,code=[sm_80,sm_86,sm_89,sm_120,compute_80]" \
  -gencode arch=compute_90,code=sm_90 "${flags[@]}" -o "$out/fill.fatbin" kernels/fill.cu >/dev/null
"$NVCC" -gencode arch=compute_80,code=compute_80 "${flags[@]}" -o "$out/fill_ptx.fatbin" \
  kernels/fill.cu >/dev/null
ls -l "$out"
