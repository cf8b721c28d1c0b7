#!/usr/bin/env bash
# Fine-tuning a downloaded model, end to end: `import hf` of a Hugging Face directory (default:
# the committed Llama fixture, tests/fixtures/hf/llama: GQA, Llama 3 RoPE scaling, sharded),
# `prepare sft` with the model's own tokenizer and chat template, `sft --init` on DEVICE, then
# `export hf`. Prints one line last: "hf sft: validation loss A -> B" and exits non-zero unless
# the loss fell.
#   usage: scripts/hf_sft_check.sh [cpu|cuda] [HF_DIR]   (TOPCOAT=path/to/topcoat, WORK=dir)
set -euo pipefail
cd "$(dirname "$0")/.."
device=${1:-cpu}
model=${2:-tests/fixtures/hf/llama}
topcoat=${TOPCOAT:-target/release/topcoat}
work=${WORK:-$(mktemp -d)}
mkdir -p "$work"

# 96 short conversations whose replies follow one pattern the model can learn in a few steps.
python3 - "$work/chats.jsonl" <<'PY'
import json, sys
names = ["cats", "dogs", "rain", "bread", "music", "trees", "the sea", "the moon"]
with open(sys.argv[1], "w") as f:
    for i in range(96):
        t = names[i % len(names)]
        msgs = [{"role": "user", "content": f"Say something about {t}."},
                {"role": "assistant", "content": f"Here is a fact about {t}: {t} are {t}."}]
        if i % 3 == 0:
            msgs.insert(0, {"role": "system", "content": "Be brief."})
        f.write(json.dumps({"messages": msgs}) + "\n")
PY
"$topcoat" import hf "$model" --out "$work/base"
"$topcoat" prepare sft "$work/chats.jsonl" --out "$work/sft_data" --tokenizer "$work/base"
"$topcoat" sft --device "$device" --init "$work/base" --data "$work/sft_data" \
  --out "$work/sft" --max-steps 40 --batch-size 8 --seq-len 64 --lr 3e-3 --warmup-steps 4 \
  --val-every 20 | tee "$work/sft.log"
"$topcoat" export hf "$work/sft" --out "$work/exported"
line=$(grep -Eo "validation loss [0-9.]+ -> [0-9.]+" "$work/sft.log" | tail -n 1)
echo "hf sft: $line"
python3 - "$line" <<'PY'
import sys
a, b = (float(x) for x in sys.argv[1].split()[-3::2])
sys.exit(0 if b < a else 1)
PY
