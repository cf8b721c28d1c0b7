#!/usr/bin/env bash
# Downloads, on the development machine (PyPI), the wheels scripts/bench_peft.py needs on the GPU
# machine beyond what its image holds, into .bench-wheels/ (ignored by git; it travels with the
# working tree, inside the 64 MiB the device machine takes with dist/'s ~34 MB).
#   bash scripts/fetch_bench_wheels.sh && bash scripts/gpu_dist.sh
# The GPU machine: Python 3.12 (/opt/torch/.venv), PyTorch 2.11, and already transformers,
# accelerate, huggingface_hub, safetensors, numpy, packaging, psutil, pyyaml and tqdm
# (/work/.library/device/KINDS.md, its package list). peft requires exactly those, so the one
# wheel carried is peft itself, pinned to the version the PEFT fixtures and parity tests were
# made with (scripts/make_hf_fixtures.py), fetched without its dependencies. gpu_check.sh
# installs it into a venv over the image's packages with --no-index, so a requirement the image
# lacks fails there by name instead of silently.
#   BENCH_WHEELS="peft==0.21.2 other==1.0" overrides the list (each pure-python or abi3 for 3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.bench-wheels
wheels=${BENCH_WHEELS:-peft==0.21.2}
py=${PYTHON:-python3}
rm -rf "$dest" && mkdir -p "$dest"
# shellcheck disable=SC2086 # the list is meant to split into names
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$dest" $wheels
# What each wheel requires (extras left out), for comparing with the image's package list.
for w in "$dest"/*.whl; do
  echo "$(basename "$w"): requires $("$py" - "$w" <<'PY'
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
reqs = [l.split(":", 1)[1].strip() for l in z.read(meta).decode().splitlines()
        if l.startswith("Requires-Dist:") and "extra ==" not in l]
print(", ".join(reqs) or "nothing")
PY
)"
done
du -ch "$dest"/*.whl | tail -n 1
