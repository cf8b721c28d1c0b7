#!/usr/bin/env bash
# Data-parallel scaling on one node of several GPUs (NCCL; docs/DISTRIBUTED.md "## NCCL"): for
# gpt2-124m and gpt2-1558m, 1, 2, 4 and 8 ranks (as many as the node has) started by
# `topcoat launch`, each rank on its LOCAL_RANK's GPU with the same micro-batch, so the global
# batch grows with the ranks. Prints tokens/s per GPU, scaling efficiency against one rank
# (tokens/s per GPU at N ranks / at 1 rank) and the peak memory per rank (nvidia-smi
# --query-compute-apps, sampled every second), as a table last.
# Run from the repository root with dist/ from scripts/gpu_dist.sh. Logs go to $OUT (or
# ./gpu_multi_logs).
#   MULTI_STEPS=N (default 20) steps per run; MULTI_MODELS="gpt2-124m" to run one model.
# Target (docs/PERF.md): >= 95% efficiency at 8 GPUs for gpt2-124m.
set -uo pipefail
cd "$(dirname "$0")/.."
logs=${OUT:-gpu_multi_logs}
mkdir -p "$logs"
ngpu=$(nvidia-smi -L | wc -l)
nvidia-smi -L | tee "$logs/gpus.txt"
if [ "$ngpu" -lt 2 ]; then
  echo "this node has $ngpu GPU(s): NCCL needs one GPU per rank, so there is no scaling to measure"
  exit 2
fi
# cudarc loads libnccl.so, NCCL ships libnccl.so.2: give it that name in a folder of our own.
ncclso=$(ldconfig -p | grep -Eo '/[^ ]*libnccl\.so\.2$' | head -n 1)
if [ -z "$ncclso" ]; then
  ncclso=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib", "libnccl.so.2"))' 2>/dev/null || true)
fi
[ -n "$ncclso" ] && ncclso=$(readlink -f "$ncclso")
work=$(mktemp -d)
mkdir -p "$work/ncclso" && [ -n "$ncclso" ] && ln -sf "$ncclso" "$work/ncclso/libnccl.so"
export LD_LIBRARY_PATH="$work/ncclso${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "libnccl.so.2: ${ncclso:-not found}"
steps=${MULTI_STEPS:-20}
# The embedded corpus in GPT-2 tokens (the vocabulary of the llm.c runs).
dist/topcoat prepare data/corpus --out "$work/data" --tokenizer gpt2 >"$logs/prepare.log" 2>&1 ||
  { echo "prepare failed: $logs/prepare.log"; exit 1; }
models=${MULTI_MODELS:-gpt2-124m gpt2-1558m}

# Micro-batch per rank: gpt2-124m B=64 (llm.c's), gpt2-1558m B=8 with recompute 2.
flags_for() {
  case "$1" in
    gpt2-124m) echo "--batch-size 64 --seq-len 1024" ;;
    gpt2-1558m) echo "--batch-size 8 --seq-len 1024 --recompute 2" ;;
  esac
}

# peak_mem PID_FILE OUT: the largest per-process used memory (MiB) seen while PID runs.
peak_mem() {
  local pid=$1 out=$2
  echo 0 >"$out"
  while kill -0 "$pid" 2>/dev/null; do
    nvidia-smi --query-compute-apps=used_memory --format=csv,noheader,nounits 2>/dev/null |
      sort -n | tail -n 1 | awk -v f="$out" '{ getline old < f; close(f); if ($1 > old) print $1 > f; close(f) }'
    sleep 1
  done
}

# tokens_per_s RUN: the median tokens/s of the steps after the first three (metrics.jsonl's
# tokens_per_s: the whole job's tokens, all ranks), or 0.
tokens_per_s() {
  python3 - "$1/metrics.jsonl" <<'PY' 2>/dev/null || echo 0
import json, statistics, sys
v = [r["tokens_per_s"] for r in map(json.loads, open(sys.argv[1])) if "tokens_per_s" in r][3:]
print(f"{statistics.median(v):.0f}" if v else 0)
PY
}

results="$logs/results.tsv"
: >"$results"
for model in $models; do
  for n in 1 2 4 8; do
    [ "$n" -gt "$ngpu" ] && continue
    run="$work/$model-$n"
    log="$logs/${model}_${n}.log"
    # Each rank: its micro-batch once per step (total batch = n x micro-batch), no checkpoint
    # until the end, NCCL pinned to ring/simple so reruns compare.
    # shellcheck disable=SC2046
    NCCL_ALGO=Ring NCCL_PROTO=Simple timeout 600 dist/topcoat launch --nproc-per-node "$n" -- \
      pretrain --device cuda --collective nccl --preset "$model" --data "$work/data" \
      $(flags_for "$model") --total-batch-tokens $((n * $(flags_for "$model" | awk '{print $2 * $4}'))) \
      --max-steps "$steps" --val-every 100000 --checkpoint-every 100000 --out "$run" \
      >"$log" 2>&1 &
    pid=$!
    peak_mem "$pid" "$work/mem" &
    mon=$!
    wait "$pid"
    rc=$?
    wait "$mon"
    tps=$(tokens_per_s "$run")
    mem=$(cat "$work/mem")
    printf "%s\t%s\t%s\t%s\t%s\n" "$model" "$n" "$rc" "${tps:-0}" "$mem" >>"$results"
    echo "== $model, $n rank(s): exit $rc, ${tps:-0} tokens/s, peak ${mem} MiB per rank"
    grep -iE "error|nccl (warn|info)" "$log" | head -n 5
    rm -rf "$run"
  done
done

echo
python3 - "$results" <<'PY'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
print("| model | ranks | exit | tokens/s (all) | tokens/s per GPU | scaling efficiency | peak MiB per rank |")
print("| --- | --- | --- | --- | --- | --- | --- |")
base = {}
for model, n, rc, tps, mem in rows:
    n, tps = int(n), float(tps or 0)
    per = tps / n
    if n == 1:
        base[model] = per
    eff = f"{100 * per / base[model]:.1f}%" if base.get(model) else "n/a"
    print(f"| {model} | {n} | {rc} | {tps:,.0f} | {per:,.0f} | {eff} | {mem} |")
PY
