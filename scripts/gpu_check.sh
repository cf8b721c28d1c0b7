#!/usr/bin/env bash
# The one GPU check (run on the GPU machine from the repository root, with dist/ from
# scripts/gpu_dist.sh): every CUDA parity test, the whole-model CUDA-vs-CPU training test, a
# short pretraining run on the GPU whose validation loss must fall, a reward-model run from
# it whose validation accuracy must reach 1, the reduced demo (`topcoat demo --quick`), the
# per-kernel benchmark,
# and `topcoat bench` beside scripts/bench_torch.py (torch.compile) on gpt2-124m at B=64, T=1024.
# Full logs go to $OUT (or ./gpu_check_logs); failures are summarised and a short table printed last.
#   GPU_CHECK_SKIP_TORCH=1 skips the PyTorch baseline (for a quick correctness-only pass);
#   GPU_CHECK_FULL_DEMO=1 adds the whole demo at its GPU sizes after the table.
set -uo pipefail
cd "$(dirname "$0")/.."
logs=${OUT:-gpu_check_logs}
mkdir -p "$logs"
export RUST_BACKTRACE=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader | tee "$logs/gpu.txt"
ldconfig -p | grep -E "libcublasLt|libcuda\.so" | head -n 4

# status NAME: "passed" or "FAILED (exit N)" from the exit code of the last command.
status() { if [ "$1" -eq 0 ]; then echo "passed"; else echo "FAILED (exit $1)"; fi; }
t0=$SECONDS

timeout 100 dist/cuda_parity --test-threads=1 --nocapture >"$logs/parity.log" 2>&1
parity=$(status $?)
parity_counts=$(grep -E "^test result" "$logs/parity.log" | tail -n 1)
timeout 60 dist/cuda_training --nocapture >"$logs/training.log" 2>&1
training=$(status $?)
# The CUDA-core attention kernels pass too (the parity harness reads TOPCOAT_ATTENTION into
# CudaOptions, src/backend/cuda/options.rs).
TOPCOAT_ATTENTION=cuda-cores timeout 60 dist/cuda_parity --test-threads=1 --nocapture attention \
  >"$logs/parity_cuda_cores.log" 2>&1
parity_cuda_cores=$(status $?)
# And the unfused matmul + GELU path (TOPCOAT_GELU_EPILOGUE, CudaOptions::gelu_epilogue).
TOPCOAT_GELU_EPILOGUE=off timeout 60 dist/cuda_parity --test-threads=1 --nocapture matmul_gelu \
  >"$logs/parity_gelu_off.log" 2>&1
parity_gelu_off=$(status $?)
echo "== parity + training tests ($((SECONDS - t0)) s): $parity / $training"
# What failed, briefly: the failing tests' names and their panic lines.
grep -hE "^test .*FAILED|panicked at|rel err .*>|skipped" "$logs"/parity*.log "$logs/training.log" | head -n 40
grep -hE "^step" "$logs/training.log" | head -n 10

run=$(mktemp -d)
timeout 60 dist/topcoat pretrain --device cuda --out "$run" --max-steps 60 --val-every 30 \
  >"$logs/pretrain.log" 2>&1
pretrain=$(status $?)
val=$(grep -Eo "validation loss [0-9.]+ -> [0-9.]+" "$logs/pretrain.log" || echo "no result")
tail -n 4 "$logs/pretrain.log"
timeout 20 dist/topcoat sample --checkpoint "$run" --prompt "A cat is" \
  --max-new-tokens 24 >"$logs/sample.log" 2>&1
sample=$(status $?)
tail -n 3 "$logs/sample.log"
echo "== pretrain + sample ($((SECONDS - t0)) s)"

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
timeout 60 dist/topcoat reward --device cuda --init "$run" --data "$run/prefs" --out "$run/rm" \
  --max-steps 40 --batch-size 16 --seq-len 64 --lr 1e-3 --val-every 20 >>"$logs/reward.log" 2>&1
reward=$(status $?)
rm_acc=$(grep -Eo "val accuracy [0-9.]+" "$logs/reward.log" | sed -n '1p;$p' | paste -sd' ' || true)

echo "== reward ($((SECONDS - t0)) s): $reward, $rm_acc"

# The reduced demo on the GPU (all five stages, the `small` preset); its card and page are kept.
timeout 120 dist/topcoat demo --quick --device cuda --out "$run/demo" >"$logs/demo.log" 2>&1
demo=$(status $?)
cp "$run/demo/report_card.json" "$run/demo/report.html" "$logs/" 2>/dev/null
grep -E "^\| (base|sft|reward model|dpo|rl) \|" "$logs/demo.log"
echo "== demo --quick ($((SECONDS - t0)) s): $demo"

# Per-op times: the default options, then the alternative the A/B row below compares.
kernels() {
  timeout 60 dist/topcoat bench --device cuda --kernels --preset gpt2-124m \
    --vocab-size 50257 --batch-size 64 --seq-len 1024 --steps 2 --warmup 1 "$@"
}
kernels --attention mma >"$logs/bench_kernels.log" 2>&1
tail -n 20 "$logs/bench_kernels.log"
kernels --gelu-epilogue off >"$logs/bench_kernels_gelu_off.log" 2>&1
grep -E "^\| (matmul_gelu|total)" "$logs/bench_kernels_gelu_off.log" | sed 's/^/GELU epilogue off: /'

timeout 100 dist/topcoat bench --device cuda --preset gpt2-124m --vocab-size 50257 \
  --batch-size 64 --seq-len 1024 --steps 10 --warmup 3 >"$logs/bench_topcoat.log" 2>&1
bench=$(status $?)
tail -n 6 "$logs/bench_topcoat.log"
# The same with the GELU epilogues off (A/B in one call), against the peak measured above.
peak=$(grep -Eo "measured peak: [0-9.]+" "$logs/bench_topcoat.log" | grep -Eo "[0-9.]+$" || echo 0)
bench_with() {
  timeout 100 dist/topcoat bench --device cuda --preset gpt2-124m --vocab-size 50257 \
    --batch-size 64 --seq-len 1024 --steps 10 --warmup 3 --peak-tflops "$peak" "$@"
}
bench_with --gelu-epilogue off >"$logs/bench_topcoat_gelu_off.log" 2>&1
echo "== topcoat bench ($((SECONDS - t0)) s)"
torch_line="skipped"
if [ -z "${GPU_CHECK_SKIP_TORCH:-}" ]; then
  PYTHONUNBUFFERED=1 timeout 150 python3 dist/bench_torch.py --preset gpt2-124m --batch-size 64 \
    --seq-len 1024 --steps 20 >"$logs/bench_torch.log" 2>&1
  torch_line="$(tail -n 1 "$logs/bench_torch.log") ($(status $?))"
  tail -n 6 "$logs/bench_torch.log"
fi
echo "== done ($((SECONDS - t0)) s)"

echo
echo "| check | result |"
echo "| --- | --- |"
echo "| CUDA parity tests | $parity ($parity_counts) |"
echo "| CUDA attention parity, cuda-cores kernels | $parity_cuda_cores |"
echo "| CUDA matmul+GELU parity, epilogue off | $parity_gelu_off |"
echo "| CUDA vs CPU, 10 training steps | $training |"
echo "| pretrain tiny on cuda, 60 steps | $pretrain: $val |"
echo "| sample (cpu) from the cuda checkpoint | $sample |"
echo "| reward tiny on cuda, 40 steps (val accuracy first, last) | $reward: ${rm_acc:-no result} |"
echo "| topcoat demo --quick on cuda | $demo: $(grep -Eo "demo finished in [0-9]+ s" "$logs/demo.log" || echo "no result") |"
echo "| topcoat bench gpt2-124m B=64 T=1024 | $bench: $(tail -n 1 "$logs/bench_topcoat.log") |"
echo "| same, GELU epilogue off | $(tail -n 1 "$logs/bench_topcoat_gelu_off.log") |"
echo "| PyTorch torch.compile, same config | $torch_line |"
# GPU_CHECK_FULL_DEMO=1: also the whole demo at its GPU sizes (not part of the 5-minute check).
if [ -n "${GPU_CHECK_FULL_DEMO:-}" ]; then
  timeout 100 dist/topcoat demo --device cuda --out "$run/demo_full" >"$logs/demo_full.log" 2>&1
  echo "| topcoat demo on cuda (full GPU sizes) | $(status $?): $(grep -Eo "demo finished in [0-9]+ s" "$logs/demo_full.log" || echo "no result") |"
  cp "$run/demo_full/report_card.json" "$logs/report_card_full.json" 2>/dev/null
  grep -E "^\| (base|sft|reward model|dpo|rl) \|" "$logs/demo_full.log"
fi
# Every log in one archive (sorted first, so it comes back even where only a few files do).
tar czf "$logs/0_logs.tgz" -C "$logs" --exclude 0_logs.tgz . 2>/dev/null || true
