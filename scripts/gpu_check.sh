#!/usr/bin/env bash
# The one GPU check (run on the GPU machine from the repository root, with dist/ from
# scripts/gpu_dist.sh): every CUDA parity test, a short pretraining run on the GPU whose
# validation loss must fall, and `topcoat bench` beside scripts/bench_torch.py (torch.compile)
# on gpt2-124m at B=64, T=1024. Logs go to $OUT (or ./gpu_check_logs); a short table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
logs=${OUT:-gpu_check_logs}
mkdir -p "$logs"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$logs/gpu.txt"

parity="FAILED"
if timeout 120 dist/cuda_parity --test-threads=1 >"$logs/parity.log" 2>&1; then parity="passed"; fi
parity_counts=$(grep -E "^test result" "$logs/parity.log" | tail -n 1)

run=$(mktemp -d)
timeout 120 dist/topcoat pretrain --device cuda --out "$run" --max-steps 60 --val-every 30 \
  >"$logs/pretrain.log" 2>&1
val=$(grep -Eo "validation loss [0-9.]+ -> [0-9.]+" "$logs/pretrain.log" || echo "no result")

timeout 150 dist/topcoat bench --device cuda --preset gpt2-124m --vocab-size 50257 \
  --batch-size 64 --seq-len 1024 --steps 10 --warmup 3 >"$logs/bench_topcoat.log" 2>&1
timeout 200 python3 dist/bench_torch.py --preset gpt2-124m --batch-size 64 --seq-len 1024 \
  --steps 30 >"$logs/bench_torch.log" 2>&1

echo
echo "| check | result |"
echo "| --- | --- |"
echo "| CUDA parity tests | $parity ($parity_counts) |"
echo "| pretrain tiny on cuda, 60 steps | $val |"
echo "| topcoat bench gpt2-124m B=64 T=1024 | $(tail -n 1 "$logs/bench_topcoat.log") |"
echo "| PyTorch torch.compile, same config | $(tail -n 1 "$logs/bench_torch.log") |"
