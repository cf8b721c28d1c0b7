#!/usr/bin/env python3
"""Check that an adapter topcoat writes loads in PEFT and gives topcoat's logits.

Run by hand with the reference libraries (CI has no torch):

    /work/main/.venv-ref/bin/python scripts/check_peft_export.py

(needs torch, transformers, peft, safetensors; CPU only, no network; builds and runs
`cargo run --release --example peft_export`, honouring CARGO_TARGET_DIR).

For each case (a tiny fixture model of tests/fixtures/hf and a --lora-targets list) the
example writes a random adapter with topcoat's `hf::write_adapter_with_base` and topcoat's f32
logits with it on seeded ids; this script loads the base with `from_pretrained` in float64,
the adapter with `PeftModel.from_pretrained`, and checks
- that PEFT put adapters on exactly the modules topcoat trained (GPT-2's `o` and `down` are
  both `c_proj` there: each alone must not catch the other),
- that every adapter weight PEFT loaded equals the file's (nothing left at PEFT's init),
- that PEFT's logits equal topcoat's, both with the adapters merged and with the live
  adapter forward, within 5e-6 of the largest logit (the f32 tolerance of
  tests/hf_import.rs), while the base model alone is far off.
It prints the measured errors; the exit status is non-zero if any check fails.
"""

import os
import subprocess
import sys
import tempfile
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", category=FutureWarning)

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "hf")
LOGIT_TOL_F32 = 5e-6

LLAMA = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
         "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
         "down": "mlp.down_proj"}
GPT2 = {"qkv": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"}

CASES = [
    ("llama", "all"),
    ("llama", "k,up"),
    ("qwen2", "q,v,down"),
    ("gpt2", "all"),
    ("gpt2", "o"),
    ("gpt2", "down"),
]


def expected_modules(base, targets, n_layer):
    table = GPT2 if base == "gpt2" else LLAMA
    names = list(table) if targets == "all" else targets.split(",")
    prefix = "transformer.h" if base == "gpt2" else "model.layers"
    return sorted("%s.%d.%s" % (prefix, l, table[t]) for l in range(n_layer) for t in names)


def main():
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["cargo", "build", "--release", "--quiet", "--example", "peft_export"],
                       cwd=ROOT, check=True)
        for i, (base, targets) in enumerate(CASES):
            base_dir = os.path.join(FIXTURES, base)
            out = os.path.join(tmp, "case%d" % i)
            subprocess.run(["cargo", "run", "--release", "--quiet", "--example", "peft_export",
                            "--", base_dir, out, targets, str(100 + i)],
                           cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
            ours = load_file(os.path.join(out, "logits.safetensors"))
            ids, logits = ours["input_ids"], ours["logits"].to(torch.float64)
            live = ours["logits_live"].to(torch.float64)
            adapter = os.path.join(out, "adapter")
            model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float64)
            model.eval()
            with torch.no_grad():
                base_logits = model(input_ids=ids).logits
            peft = PeftModel.from_pretrained(model, adapter)
            peft.eval()
            got = sorted(n[len("base_model.model."):] for n, m in peft.named_modules()
                         if hasattr(m, "lora_A") and "default" in m.lora_A)
            want = expected_modules(base, targets, model.config.num_hidden_layers)
            modules_ok = got == want
            stored = load_file(os.path.join(adapter, "adapter_model.safetensors"))
            params = dict(peft.named_parameters())
            weights_ok = len(stored) == 2 * len(want) and all(
                torch.equal(params[k.replace(".weight", ".default.weight")].to(torch.float32), v)
                for k, v in stored.items())
            with torch.no_grad():
                theirs = peft(input_ids=ids).logits
            scale = theirs.abs().max().item()
            err = (theirs - logits).abs().max().item() / scale
            live_err = (theirs - live).abs().max().item() / scale
            base_err = (base_logits - logits).abs().max().item() / scale
            ok = (modules_ok and weights_ok and max(err, live_err) <= LOGIT_TOL_F32
                  and base_err > 1e-2)
            failed |= not ok
            print("%-6s %-9s %2d modules %s, weights %s, logits error merged %.2e live %.2e "
                  "(base alone %.2e): %s"
                  % (base, targets, len(got), "as trained" if modules_ok else "DIFFER",
                     "equal" if weights_ok else "DIFFER", err, live_err, base_err,
                     "ok" if ok else "FAILED"))
            if not modules_ok:
                print("  PEFT:    %s\n  topcoat: %s" % (got, want))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
