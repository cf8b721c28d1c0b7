#!/usr/bin/env python3
"""Checks `topcoat export hf` against the reference library (by hand; CI cannot run it).

For every model fixture in tests/fixtures/hf: `topcoat import hf` it, `topcoat export hf` the
checkpoint (in f32, and in the fixture's own dtype), then load the exported directory with
transformers' `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`, and
compare with the fixture's reference.safetensors:

- logits on `input_ids` (model loaded in float64): max |diff| / max |ref| <= LOGIT_TOL
  (the stock library computes RMSNorm in float32, ~3e-7 from the float64 reference);
- loss for labels=input_ids, and the 6 greedy tokens of `generate` after `prompt_ids`;
- where the export has a tokenizer: the ids of a few texts and, where the fixture has a chat
  template, `apply_chat_template` equal to the fixture tokenizer's.

Usage (from the repository root, after `cargo build --release`):

    /work/main/.venv-ref/bin/python scripts/check_hf_export.py [--topcoat target/release/topcoat]

Then a trained model: the Llama fixture imported, fine-tuned with `topcoat sft` for 20 steps,
exported; `topcoat eval loss` of the SFT checkpoint on the first two 32-token windows of a
prepared text equals the loss transformers computes on the same tokens with the export
(`eval loss` prints 4 decimals: TRAINED_LOSS_TOL absolute).

Prints one line per check and exits non-zero on any mismatch.
"""

import argparse
import os
import subprocess
import sys
import tempfile

import json
import re

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

LOGIT_TOL = 1e-5
LOSS_TOL = 1e-6
TRAINED_LOSS_TOL = 2e-4
FIXTURES = {
    "gpt2": "f32",
    "llama": "f32",
    "llama_mqa_bf16": "bf16",
    "qwen2": "f16",
    "mistral": "f32",
}
TEXTS = ["Hello world", "The cat sat on the mat.\n", "  spaces  and\ttabs ", "caf\u00e9 \u4f60\u597d"]
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
]


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stdout}{r.stderr}")
    return r.stdout + r.stderr


def check(topcoat, fixture, dtype, tmp):
    name = os.path.basename(fixture)
    run_dir = os.path.join(tmp, f"{name}-{dtype}-run")
    out = os.path.join(tmp, f"{name}-{dtype}-hf")
    run([topcoat, "import", "hf", fixture, "--out", run_dir])
    run([topcoat, "export", "hf", run_dir, "--out", out, "--dtype", dtype])
    ref = load_file(os.path.join(fixture, "reference.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64)
    model.eval()
    ids = ref["input_ids"]
    with torch.no_grad():
        res = model(ids, labels=ids)
    logits = res.logits
    rel = ((logits - ref["logits"]).abs().max() / ref["logits"].abs().max()).item()
    loss_rel = abs(res.loss.item() - ref["loss"].item()) / ref["loss"].item()
    prompt = ref["prompt_ids"].unsqueeze(0)
    gen = model.generate(
        prompt, max_new_tokens=len(ref["greedy"]), do_sample=False, pad_token_id=0
    )[0, prompt.shape[1]:]
    problems = []
    # A bf16/f16 export of f32 weights is rounded, so only the fixture's own dtype is exact.
    if rel > LOGIT_TOL:
        problems.append(f"logits off by {rel:.2e}")
    if loss_rel > LOSS_TOL:
        problems.append(f"loss {res.loss.item()} vs {ref['loss'].item()}")
    if gen.tolist() != ref["greedy"].tolist():
        problems.append(f"greedy {gen.tolist()} vs {ref['greedy'].tolist()}")
    tok_note = "no tokenizer exported"
    if os.path.exists(os.path.join(out, "tokenizer.json")):
        got, want = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(fixture)
        for t in TEXTS:
            if got(t)["input_ids"] != want(t)["input_ids"]:
                problems.append(f"tokenizer ids differ on {t!r}")
        if want.chat_template:
            a = got.apply_chat_template(CHAT, tokenize=False)
            b = want.apply_chat_template(CHAT, tokenize=False)
            if a != b:
                problems.append("chat template renders differ")
            tok_note = "tokenizer and chat template equal"
        else:
            tok_note = "tokenizer equal"
    status = "ok" if not problems else "FAIL: " + "; ".join(problems)
    print(
        f"{name} ({dtype}): logits {rel:.2e}, loss {loss_rel:.1e}, greedy "
        f"{'equal' if gen.tolist() == ref['greedy'].tolist() else 'differ'}, {tok_note}: {status}"
    )
    return not problems


def check_trained(topcoat, fixtures, tmp):
    """SFT from an imported model, exported: the reference library's loss is topcoat's."""
    d = os.path.join(tmp, "trained")
    os.makedirs(d)
    run([topcoat, "import", "hf", os.path.join(fixtures, "llama"), "--out", f"{d}/run"])
    with open(f"{d}/chats.jsonl", "w") as f:
        for i in range(40):
            msgs = [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"It is {2 * i}."},
            ]
            f.write(json.dumps({"messages": msgs}) + "\n")
    run([topcoat, "prepare", "sft", f"{d}/chats.jsonl", "--out", f"{d}/sft-data",
         "--tokenizer", f"{d}/run"])
    run([topcoat, "sft", "--init", f"{d}/run", "--data", f"{d}/sft-data", "--out", f"{d}/sft",
         "--max-steps", "20", "--batch-size", "4", "--seq-len", "32", "--lr", "3e-3"])
    run([topcoat, "export", "hf", f"{d}/sft", "--out", f"{d}/sft-hf"])
    with open(f"{d}/text.txt", "w") as f:
        for doc in ["README.md", "docs/FORMATS.md"]:
            f.write(open(doc, encoding="utf-8").read())
    run([topcoat, "prepare", f"{d}/text.txt", "--out", f"{d}/text", "--tokenizer", f"{d}/sft"])
    out = run([topcoat, "eval", "loss", "--checkpoint", f"{d}/sft", "--data", f"{d}/text",
               "--split", "train", "--batch-size", "1", "--seq-len", "32", "--max-batches", "2"])
    ours = float(re.findall(r"\| train \| 2 \| 64 \| ([0-9.]+) \|", out)[0])
    shard = sorted(f for f in os.listdir(f"{d}/text") if f.startswith("train_"))[0]
    ids = np.fromfile(f"{d}/text/{shard}", dtype=np.uint16, offset=1024)[:65].astype(np.int64)
    ids = torch.tensor(ids)
    model = AutoModelForCausalLM.from_pretrained(f"{d}/sft-hf", dtype=torch.float64).eval()
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss.item() for w in (ids[:33], ids[32:65])]
    theirs = sum(losses) / 2
    good = abs(ours - theirs) <= TRAINED_LOSS_TOL
    print(f"llama after 20 sft steps: topcoat eval loss {ours:.4f}, reference {theirs:.6f}: "
          f"{'ok' if good else 'FAIL'}")
    return good


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--topcoat", default="target/release/topcoat")
    p.add_argument("--fixtures", default="tests/fixtures/hf")
    a = p.parse_args()
    good = True
    with tempfile.TemporaryDirectory() as tmp:
        for name, dtype in FIXTURES.items():
            fixture = os.path.join(a.fixtures, name)
            for d in sorted({"f32", dtype}):
                good &= check(a.topcoat, fixture, d, tmp)
        good &= check_trained(a.topcoat, a.fixtures, tmp)
    sys.exit(0 if good else 1)


if __name__ == "__main__":
    main()
