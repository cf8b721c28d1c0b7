#!/usr/bin/env python3
"""Times checkpoint saves of one or more `topcoat` binaries side by side.

Each binary runs `pretrain --preset gpt2-124m` for 3 steps with a checkpoint after every step
(B=1, T=64, no validation, CPU) on DATA (a prepared directory with the GPT-2 tokenizer); a
save's time is the gap between its step's progress line and the `saved` line after it.

  python3 scripts/checkpoint_save_time.py DATA BIN [BIN ...]
"""
import shutil
import subprocess
import sys
import tempfile
import time


def save_times(binary, data, out):
    args = [binary, "pretrain", "--data", data, "--out", out, "--preset", "gpt2-124m",
            "--batch-size", "1", "--seq-len", "64", "--max-steps", "3",
            "--checkpoint-every", "1", "--val-every", "0", "--device", "cpu"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    step_seen, saves = None, []
    for line in proc.stdout:
        now = time.monotonic()
        if "saved" in line and step_seen is not None:
            saves.append(now - step_seen)
        if " step " in line:
            step_seen = now
    if proc.wait() != 0:
        sys.exit(f"{binary} failed")
    return saves


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    data, binaries = sys.argv[1], sys.argv[2:]
    for binary in binaries:
        out = tempfile.mkdtemp(prefix="ckpt_time_")
        try:
            saves = save_times(binary, data, out)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        print(f"{binary}: saves of {', '.join(f'{s:.2f}' for s in saves)} s")


if __name__ == "__main__":
    main()
