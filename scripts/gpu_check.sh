#!/usr/bin/env bash
# The one GPU check (run on the GPU machine from the repository root, with dist/ from
# scripts/gpu_dist.sh): every CUDA parity test (again with TOPCOAT_KERNELS=generic: the
# compute_80 PTX that pre-Hopper cards run, JIT-compiled here), the whole-model CUDA-vs-CPU training test, a
# short pretraining run on the GPU whose validation loss must fall, a reward-model run from
# it whose validation accuracy must reach 1, an imported Hugging Face Llama fine-tuned with
# sft --init (scripts/hf_sft_check.sh), the reduced demo (`topcoat demo --quick`), the
# per-kernel benchmark,
# and `topcoat bench` beside scripts/bench_torch.py (torch.compile) on gpt2-124m at B=64, T=1024;
# the Llama family: its ops' parity (llama_ops, gqa_attention), their `bench --kernels` rows, and
# `topcoat bench` beside `bench_torch.py --arch llama` on llama-3.2-1b at B=8, T=2048 (ratio);
# then the scale-out steps: NCCL at world size 1 vs no collective, two ranks on one GPU through
# the host collective vs one rank, and gpt2-1558m with --recompute 2 (tokens/s, MFU).
# Full logs go to $OUT (or ./gpu_check_logs); failures are summarised and a short table printed last.
#   GPU_CHECK_SKIP_TORCH=1 skips the PyTorch baseline (for a quick correctness-only pass);
#   GPU_CHECK_FULL_DEMO=1 adds the whole demo at its GPU sizes after the table.
#   GPU_CHECK_LORA=1 adds the LoRA rows (scripts/gpu_lora_check.sh: llama-3.2-1b LoRA r16 at
#   8 x 2048 beside PyTorch + PEFT, its peak at --recompute 2, the llama-3.1-8b fit check; about
#   5 minutes, so with the rest more than one 10-minute command: run that script alone for them).
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
# Every parity test again on the code pre-Hopper cards run: TOPCOAT_KERNELS=generic loads only
# the compute_80 PTX (src/backend/cuda/arch.rs), which the driver JIT-compiles for this card.
# Each test opens the backend, so the JIT results must be cached: a cache folder of our own.
CUDA_CACHE_PATH="${TMPDIR:-/tmp}/topcoat_jit_cache" TOPCOAT_KERNELS=generic \
  timeout 150 dist/cuda_parity --test-threads=1 --nocapture \
  >"$logs/parity_generic.log" 2>&1
parity_generic="$(status $?) ($(grep -E "^test result" "$logs/parity_generic.log" | tail -n 1); \
$(grep -m 1 -Eo "kernels: .*" "$logs/parity_generic.log" || echo "no kernel line"))"
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

# A downloaded model fine-tuned on the GPU: import of the committed Llama fixture (GQA, Llama 3
# RoPE scaling, sharded safetensors), prepare sft with its chat template, sft --init on cuda,
# export hf; the validation loss must fall.
TOPCOAT=dist/topcoat WORK="$run/hf_sft" timeout 90 bash scripts/hf_sft_check.sh cuda \
  >"$logs/hf_sft.log" 2>&1
hf_sft="$(status $?): $(tail -n 1 "$logs/hf_sft.log")"
echo "== import hf + sft --init ($((SECONDS - t0)) s): $hf_sft"

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

# The Llama family: its ops' parity on their own (also in the full run above), the per-op rows
# of llama-3.2-1b (rmsnorm, rope, swiglu, attention_gqa), then topcoat beside PyTorch at T=2048
# (B=8, or B=4 where B=8 does not fit), tokens/s ratio in the table.
timeout 100 dist/cuda_parity --test-threads=1 --nocapture llama_ops gqa_attention \
  >"$logs/parity_llama.log" 2>&1
parity_llama="$(status $?) ($(grep -E "^test result" "$logs/parity_llama.log" | tail -n 1))"
llama() {
  timeout 200 dist/topcoat bench --device cuda --preset llama-3.2-1b --vocab-size 128256 \
    --seq-len 2048 "$@"
}
llama --kernels --batch-size 8 --steps 2 --warmup 1 >"$logs/bench_kernels_llama.log" 2>&1
grep -E "^\| (op|rmsnorm|residual_rmsnorm|rope|swiglu|attention_gqa|embedding|total)" \
  "$logs/bench_kernels_llama.log"
llama_b=8
llama --batch-size 8 --steps 8 --warmup 3 --peak-tflops "$peak" >"$logs/bench_llama.log" 2>&1 ||
  { llama_b=4; llama --batch-size 4 --steps 8 --warmup 3 --peak-tflops "$peak" >"$logs/bench_llama.log" 2>&1; }
llama_st=$(status $?)
tail -n 4 "$logs/bench_llama.log"
llama_torch="skipped"
llama_ratio="n/a"
if [ -z "${GPU_CHECK_SKIP_TORCH:-}" ]; then
  PYTHONUNBUFFERED=1 timeout 300 python3 dist/bench_torch.py --arch llama --preset llama-3.2-1b \
    --vocab-size 128256 --batch-size "$llama_b" --seq-len 2048 --steps 12 --peak-tflops "$peak" \
    >"$logs/bench_torch_llama.log" 2>&1
  llama_torch="$(tail -n 1 "$logs/bench_torch_llama.log") ($(status $?))"
  tail -n 4 "$logs/bench_torch_llama.log"
  # tokens/s: column 2 of topcoat's table row, column 3 of PyTorch's (after the leading "|").
  llama_ratio=$(python3 - "$logs/bench_llama.log" "$logs/bench_torch_llama.log" <<'PY'
import sys
def field(path, i):
    rows = [l for l in open(path) if l.startswith("|")]
    return float(rows[-1].split("|")[i].replace(",", ""))
try:
    print(f"{field(sys.argv[1], 2) / field(sys.argv[2], 3):.2f}x")
except Exception as e:
    print(f"n/a ({e})")
PY
)
fi
echo "== llama-3.2-1b ($((SECONDS - t0)) s): $llama_st, topcoat/PyTorch tokens/s $llama_ratio"

# Scale-out (docs/DISTRIBUTED.md): (a) NCCL at world size 1 equals the run without a collective,
# bit for bit; (b) two ranks on this one GPU through the host collective (NCCL refuses two ranks
# on one GPU) equal one rank with the same global batch; (c) gpt2-1558m with --recompute 2.
# cudarc loads libnccl.so, NCCL ships libnccl.so.2: give it the name in a folder of our own.
ncclso=$(ldconfig -p | grep -Eo '/[^ ]*libnccl\.so\.2$' | head -n 1)
if [ -z "$ncclso" ]; then
  ncclso=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib", "libnccl.so.2"))' 2>/dev/null || true)
fi
[ -n "$ncclso" ] && ncclso=$(readlink -f "$ncclso")
mkdir -p "$run/ncclso" && [ -n "$ncclso" ] && ln -sf "$ncclso" "$run/ncclso/libnccl.so"
export LD_LIBRARY_PATH="$run/ncclso${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "libnccl.so.2: ${ncclso:-not found}"
# same_run A B MODE: "bitwise" when both runs' losses and final weights are equal to the bit;
# otherwise the largest loss difference, marked FAILED in MODE bitwise or beyond 1e-2 in MODE tol.
same_run() {
  python3 - "$1" "$2" "$3" <<'PY'
import hashlib, json, pathlib, sys
def run(d):
    d = pathlib.Path(d)
    losses = [(r["step"], r["loss"]) for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
              if "loss" in r and "step" in r]
    models = sorted(d.rglob("model.safetensors"), key=lambda p: p.stat().st_mtime)
    return losses, hashlib.sha256(models[-1].read_bytes()).hexdigest() if models else None
try:
    (la, wa), (lb, wb) = run(sys.argv[1]), run(sys.argv[2])
except Exception as e:
    print(f"FAILED: {e}"); sys.exit(1)
if not la or len(la) != len(lb) or wa is None or wb is None:
    print(f"FAILED: {len(la)} vs {len(lb)} losses, weights {wa is not None}/{wb is not None}"); sys.exit(1)
if la == lb and wa == wb:
    print(f"bitwise ({len(la)} losses, final loss {la[-1][1]:.4f})"); sys.exit(0)
dmax = max(abs(a[1] - b[1]) for a, b in zip(la, lb))
bad = sys.argv[3] == "bitwise" or dmax > 1e-2
print(f"{'FAILED: ' if bad else ''}max |dloss| {dmax:.2e} over {len(la)} steps, weights {'equal' if wa == wb else 'differ'}")
sys.exit(1 if bad else 0)
PY
}
# One prepared dataset for the three runs (the embedded corpus, a 4096-token BPE).
timeout 120 dist/topcoat prepare data/corpus --out "$run/dp_data" --tokenizer bpe \
  --vocab-size 4096 >"$logs/dp_prepare.log" 2>&1
dp() { dist/topcoat pretrain --device cuda --data "$run/dp_data" --max-steps 20 --batch-size 4 \
  --seq-len 64 --total-batch-tokens 512 --seed 7 "$@"; }
timeout 60 dp --out "$run/dp_solo" >"$logs/dp_solo.log" 2>&1
dp_solo=$(status $?)
NCCL_ALGO=Ring NCCL_PROTO=Simple timeout 60 dp --out "$run/dp_nccl1" --collective nccl \
  >"$logs/dp_nccl1.log" 2>&1
dp_nccl1="$(status $?): $(same_run "$run/dp_solo" "$run/dp_nccl1" bitwise 2>&1 | tail -n 1)"
# Two ranks, one micro-batch of 4x64 each per step = the solo run's two accumulated micro-batches.
CUDA_VISIBLE_DEVICES=0 timeout 90 dist/topcoat launch --nproc-per-node 2 -- pretrain --device cuda \
  --data "$run/dp_data" --max-steps 20 --batch-size 4 --seq-len 64 --total-batch-tokens 512 --seed 7 \
  --collective host --out "$run/dp_host2" >"$logs/dp_host2.log" 2>&1
dp_host2="$(status $?): $(same_run "$run/dp_solo" "$run/dp_host2" tol 2>&1 | tail -n 1)"
grep -hiE "error|nccl" "$logs"/dp_*.log | head -n 10
echo "== data parallel ($((SECONDS - t0)) s): $dp_solo / $dp_nccl1 / $dp_host2"
# gpt2-1558m on one GPU: recompute level 2 at B=8 (B=4 if that does not fit).
big() {
  timeout 150 dist/topcoat bench --device cuda --preset gpt2-1558m --vocab-size 50257 \
    --seq-len 1024 --recompute 2 --steps 5 --warmup 2 --peak-tflops "$peak" "$@"
}
big_b=8
big --batch-size 8 >"$logs/bench_1558m.log" 2>&1 || { big_b=4; big --batch-size 4 >"$logs/bench_1558m.log" 2>&1; }
big_st=$(status $?)
tail -n 6 "$logs/bench_1558m.log"
big_mem=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader | head -n 1)
echo "== gpt2-1558m ($((SECONDS - t0)) s): $big_st"
lora_rows=""
if [ -n "${GPU_CHECK_LORA:-}" ]; then
  GPU_CHECK_LORA_NESTED=1 bash scripts/gpu_lora_check.sh 2>&1 | tee "$logs/lora.log" | grep -E "^== "
  lora_rows="$logs/lora_rows.md"
fi
echo "== done ($((SECONDS - t0)) s)"

echo
echo "| check | result |"
echo "| --- | --- |"
echo "| CUDA parity tests | $parity ($parity_counts) |"
echo "| CUDA attention parity, cuda-cores kernels | $parity_cuda_cores |"
echo "| CUDA matmul+GELU parity, epilogue off | $parity_gelu_off |"
echo "| CUDA parity, TOPCOAT_KERNELS=generic (compute_80 PTX JIT) | $parity_generic |"
echo "| CUDA vs CPU, 10 training steps | $training |"
echo "| pretrain tiny on cuda, 60 steps | $pretrain: $val |"
echo "| its device line | $(grep -m 1 -Eo "device: .*" "$logs/pretrain.log" || echo "none") |"
echo "| sample (cpu) from the cuda checkpoint | $sample |"
echo "| reward tiny on cuda, 40 steps (val accuracy first, last) | $reward: ${rm_acc:-no result} |"
echo "| import hf (Llama fixture) + sft --init on cuda, 40 steps | $hf_sft |"
echo "| topcoat demo --quick on cuda | $demo: $(grep -Eo "demo finished in [0-9]+ s" "$logs/demo.log" || echo "no result") |"
echo "| topcoat bench gpt2-124m B=64 T=1024 | $bench: $(tail -n 1 "$logs/bench_topcoat.log") |"
echo "| same, GELU epilogue off | $(tail -n 1 "$logs/bench_topcoat_gelu_off.log") |"
echo "| PyTorch torch.compile, same config | $torch_line |"
echo "| CUDA parity, Llama ops and grouped-query attention | $parity_llama |"
echo "| topcoat bench llama-3.2-1b B=$llama_b T=2048 | $llama_st: $(tail -n 1 "$logs/bench_llama.log") |"
echo "| PyTorch torch.compile --arch llama, same config | $llama_torch |"
echo "| llama-3.2-1b tokens/s, topcoat / PyTorch (target >= 1.2x) | $llama_ratio |"
echo "| pretrain 20 steps, no collective | $dp_solo |"
echo "| same, --collective nccl at world size 1 (bitwise expected) | $dp_nccl1 |"
echo "| same, 2 ranks on 1 GPU, --collective host (tolerance 1e-2) | $dp_host2 |"
echo "| gpt2-1558m --recompute 2, B=$big_b T=1024 (card $big_mem; anchor: llm.c in PERF.md) | $big_st: $(tail -n 1 "$logs/bench_1558m.log") |"
[ -n "$lora_rows" ] && cat "$lora_rows"
# GPU_CHECK_FULL_DEMO=1: also the whole demo at its GPU sizes (not part of the 5-minute check).
if [ -n "${GPU_CHECK_FULL_DEMO:-}" ]; then
  timeout 100 dist/topcoat demo --device cuda --out "$run/demo_full" >"$logs/demo_full.log" 2>&1
  echo "| topcoat demo on cuda (full GPU sizes) | $(status $?): $(grep -Eo "demo finished in [0-9]+ s" "$logs/demo_full.log" || echo "no result") |"
  cp "$run/demo_full/report_card.json" "$logs/report_card_full.json" 2>/dev/null
  grep -E "^\| (base|sft|reward model|dpo|rl) \|" "$logs/demo_full.log"
fi
# Every log in one archive (sorted first, so it comes back even where only a few files do).
tar czf "$logs/0_logs.tgz" -C "$logs" --exclude 0_logs.tgz . 2>/dev/null || true
