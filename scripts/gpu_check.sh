#!/usr/bin/env bash
# The one GPU check (run on the GPU machine from the repository root, with dist/ from
# scripts/gpu_dist.sh): every CUDA parity test, a short pretraining run on the GPU whose
# validation loss must fall, a reward-model run from it whose validation accuracy must reach 1,
# and `topcoat bench` beside scripts/bench_torch.py (torch.compile)
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

# Reward model from that checkpoint on a toy preference set (the chosen reply is always the
# kind one): validation accuracy must reach 1.
python3 - "$run/prefs.jsonl" <<'PY'
import json, sys
topics = ["cats", "dogs", "the sea", "rain", "bread", "music", "trees", "the moon"]
with open(sys.argv[1], "w") as f:
    for i in range(160):
        t = topics[i % len(topics)]
        f.write(json.dumps({"prompt": f"Tell me about {t}. ({i})",
                            "chosen": f"Of course! A kind, clear answer about {t}. Thanks for asking.",
                            "rejected": f"No. {t} is boring."}) + "\n")
PY
dist/topcoat prepare prefs "$run/prefs.jsonl" --out "$run/prefs" --tokenizer "$run" >"$logs/reward.log" 2>&1
timeout 120 dist/topcoat reward --device cuda --init "$run" --data "$run/prefs" --out "$run/rm" \
  --max-steps 40 --batch-size 16 --seq-len 64 --lr 1e-3 --val-every 20 >>"$logs/reward.log" 2>&1
rm_acc=$(grep -Eo "val accuracy [0-9.]+" "$logs/reward.log" | sed -n '1p;$p' | paste -sd' ' || true)

timeout 150 dist/topcoat bench --device cuda --preset gpt2-124m --vocab-size 50257 \
  --batch-size 64 --seq-len 1024 --steps 10 --warmup 3 >"$logs/bench_topcoat.log" 2>&1
timeout 200 python3 dist/bench_torch.py --preset gpt2-124m --batch-size 64 --seq-len 1024 \
  --steps 30 >"$logs/bench_torch.log" 2>&1

echo
echo "| check | result |"
echo "| --- | --- |"
echo "| CUDA parity tests | $parity ($parity_counts) |"
echo "| pretrain tiny on cuda, 60 steps | $val |"
echo "| reward tiny on cuda, 40 steps (val accuracy first, last) | ${rm_acc:-no result} |"
echo "| topcoat bench gpt2-124m B=64 T=1024 | $(tail -n 1 "$logs/bench_topcoat.log") |"
echo "| PyTorch torch.compile, same config | $(tail -n 1 "$logs/bench_torch.log") |"
