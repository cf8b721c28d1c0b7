#!/usr/bin/env python3
"""Write the PyTorch reference fixture for topcoat's GPT-2 model on a tiny config.

Run:   pip install torch safetensors numpy && python3 scripts/make_fixture.py
Writes tests/fixtures/gpt_tiny.safetensors and tests/fixtures/gpt_tiny.json.
Both files are committed: the Rust tests read them, and neither CI nor `cargo test` needs torch.
Rerun this only to change the fixture (the output is deterministic for a given torch version).

The model is written in plain torch ops (no nn.Module) in float64. Parameters are drawn with a
seeded torch.Generator, rounded to float32 (that is what the file stores), and the reference is
computed in float64 from those float32 values cast up, so the Rust side sees exactly the inputs.

Config: vocab 61 padded to 64, 2 layers, 4 heads, 32 channels, max_seq_len 16; batch 2 x 12.
Every matmul weight is [out, in] like nn.Linear. Forward (pre-LN GPT-2):
  x = wte[ids] + wpe[:T]
  per block: a = LN(x; ln_1); qkv = a @ c_attn.W^T + b -> q | k | v (each C wide, head h =
    columns h*hs..h*hs+hs); causal softmax(q k^T / sqrt(hs)) v; heads concatenated;
    x = x + c_proj(y); m = LN(x; ln_2); x = x + c_proj(gelu_tanh(c_fc(m)))
  LN(x; ln_f); logits = x @ wte^T, [B, T, 64]; the first 61 columns enter the loss;
  loss = mean cross-entropy over positions whose target != -1.
LayerNorm: eps 1e-5, biased variance. GELU: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

Saved tensors: every parameter under its name (F32); input_ids, targets (I32 [2, 12], three
targets are -1 = ignored); loss (F32 [1]); grad.<name> for every parameter (F32, computed in
float64). The gradient of wte rows 61..63 is exactly zero: the padded logit columns are excluded
from the loss and no input id is >= 61.
The file is about 229 KB: 28,032 parameters and as many gradients, 4 bytes each.

As a check, the same loss and gradients are recomputed with torch.nn.functional building blocks
(layer_norm, gelu(approximate="tanh"), scaled_dot_product_attention, cross_entropy with
ignore_index) and must agree to 1e-12.
"""

import json
import math
import os

import torch
from safetensors.torch import save_file

V, VP, L, NH, C, MAXT = 61, 64, 2, 4, 32, 16
B, T = 2, 12
HS = C // NH
EPS = 1e-5
SEED = 1234


def param_shapes():
    shapes = [("wte.weight", (VP, C)), ("wpe.weight", (MAXT, C))]
    for l in range(L):
        p = f"h.{l}."
        shapes += [
            (p + "ln_1.weight", (C,)), (p + "ln_1.bias", (C,)),
            (p + "attn.c_attn.weight", (3 * C, C)), (p + "attn.c_attn.bias", (3 * C,)),
            (p + "attn.c_proj.weight", (C, C)), (p + "attn.c_proj.bias", (C,)),
            (p + "ln_2.weight", (C,)), (p + "ln_2.bias", (C,)),
            (p + "mlp.c_fc.weight", (4 * C, C)), (p + "mlp.c_fc.bias", (4 * C,)),
            (p + "mlp.c_proj.weight", (C, 4 * C)), (p + "mlp.c_proj.bias", (C,)),
        ]
    shapes += [("ln_f.weight", (C,)), ("ln_f.bias", (C,))]
    return shapes


def make_params(gen):
    params = {}
    for name, shape in param_shapes():
        noise = torch.randn(shape, generator=gen, dtype=torch.float64)
        if name.endswith("weight") and name.split(".")[-2].startswith("ln"):
            value = 1.0 + 0.1 * noise  # layernorm gain
        else:
            value = 0.1 * noise  # matmul weights, embeddings, all biases
        params[name] = value.to(torch.float32)
    return params


def layernorm(x, w, b):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased
    return (x - mean) / torch.sqrt(var + EPS) * w + b


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def linear(x, w, b):
    return x @ w.t() + b


def attention(x, w_attn, b_attn):
    qkv = linear(x, w_attn, b_attn)
    q, k, v = qkv.split(C, dim=-1)
    # [B, T, C] -> [B, NH, T, HS]: head h takes columns h*HS..h*HS+HS
    q, k, v = (t.view(B, T, NH, HS).transpose(1, 2) for t in (q, k, v))
    att = (q @ k.transpose(-2, -1)) / math.sqrt(HS)
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    att = att.masked_fill(~mask, float("-inf"))
    att = torch.softmax(att, dim=-1)
    y = att @ v
    return y.transpose(1, 2).reshape(B, T, C)


def forward(p, ids, targets):
    x = p["wte.weight"][ids] + p["wpe.weight"][:T]
    for l in range(L):
        h = f"h.{l}."
        a = layernorm(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"])
        y = attention(a, p[h + "attn.c_attn.weight"], p[h + "attn.c_attn.bias"])
        x = x + linear(y, p[h + "attn.c_proj.weight"], p[h + "attn.c_proj.bias"])
        m = layernorm(x, p[h + "ln_2.weight"], p[h + "ln_2.bias"])
        f = gelu_tanh(linear(m, p[h + "mlp.c_fc.weight"], p[h + "mlp.c_fc.bias"]))
        x = x + linear(f, p[h + "mlp.c_proj.weight"], p[h + "mlp.c_proj.bias"])
    x = layernorm(x, p["ln_f.weight"], p["ln_f.bias"])
    logits = (x @ p["wte.weight"].t())[:, :, :V]
    logp = torch.log_softmax(logits, dim=-1)
    keep = targets != -1
    nll = -logp[keep].gather(-1, targets[keep].long().unsqueeze(-1)).squeeze(-1)
    return nll.mean()


def forward_functional(p, ids, targets):
    F = torch.nn.functional
    x = F.embedding(ids, p["wte.weight"]) + p["wpe.weight"][:T]
    for l in range(L):
        h = f"h.{l}."
        a = F.layer_norm(x, (C,), p[h + "ln_1.weight"], p[h + "ln_1.bias"], EPS)
        q, k, v = F.linear(a, p[h + "attn.c_attn.weight"], p[h + "attn.c_attn.bias"]).split(C, -1)
        q, k, v = (t.reshape(B, T, NH, HS).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + F.linear(y, p[h + "attn.c_proj.weight"], p[h + "attn.c_proj.bias"])
        m = F.layer_norm(x, (C,), p[h + "ln_2.weight"], p[h + "ln_2.bias"], EPS)
        f = F.gelu(F.linear(m, p[h + "mlp.c_fc.weight"], p[h + "mlp.c_fc.bias"]), approximate="tanh")
        x = x + F.linear(f, p[h + "mlp.c_proj.weight"], p[h + "mlp.c_proj.bias"])
    x = F.layer_norm(x, (C,), p["ln_f.weight"], p["ln_f.bias"], EPS)
    logits = F.linear(x, p["wte.weight"])[:, :, :V]
    return F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-1)


def check_against_functional(params32, ids, targets, loss, p64):
    q64 = {k: v.to(torch.float64).requires_grad_(True) for k, v in params32.items()}
    loss2 = forward_functional(q64, ids, targets)
    loss2.backward()
    assert abs(loss.item() - loss2.item()) < 1e-12, (loss.item(), loss2.item())
    for k in p64:
        err = (p64[k].grad - q64[k].grad).abs().max().item()
        assert err < 1e-12, (k, err)


def main():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out_dir = os.path.join(repo, "tests", "fixtures")
    os.makedirs(out_dir, exist_ok=True)
    gen = torch.Generator().manual_seed(SEED)

    params32 = make_params(gen)
    ids = torch.randint(0, V, (B, T), generator=gen, dtype=torch.int64)
    targets = torch.randint(0, V, (B, T), generator=gen, dtype=torch.int64)
    ignored = torch.randperm(B * T, generator=gen)[:3]
    targets.view(-1)[ignored] = -1

    p64 = {k: v.to(torch.float64).requires_grad_(True) for k, v in params32.items()}
    loss = forward(p64, ids, targets)
    loss.backward()

    assert torch.all(p64["wte.weight"].grad[V:] == 0), "padded wte rows must get zero gradient"
    check_against_functional(params32, ids, targets, loss, p64)

    tensors = dict(params32)
    tensors["input_ids"] = ids.to(torch.int32)
    tensors["targets"] = targets.to(torch.int32)
    tensors["loss"] = loss.detach().to(torch.float32).reshape(1)
    for k, v in p64.items():
        tensors["grad." + k] = v.grad.to(torch.float32)
    tensors = {k: v.contiguous() for k, v in sorted(tensors.items())}
    st_path = os.path.join(out_dir, "gpt_tiny.safetensors")
    save_file(tensors, st_path, metadata={"generator": "scripts/make_fixture.py"})

    grad_norms = {k: float(v.grad.norm()) for k, v in p64.items()}
    meta = {
        "config": {"vocab_size": V, "padded_vocab_size": VP, "n_layer": L, "n_head": NH,
                   "n_embd": C, "max_seq_len": MAXT, "batch_size": B, "seq_len": T,
                   "layernorm_eps": EPS, "gelu": "tanh", "seed": SEED},
        "loss": loss.item(),
        "ignored_positions": sorted(int(i) for i in ignored),
        "grad_norms": {k: grad_norms[k] for k in ("wte.weight", "wpe.weight",
                                                   "h.0.attn.c_attn.weight", "ln_f.weight")},
        "torch_version": torch.__version__,
    }
    with open(os.path.join(out_dir, "gpt_tiny.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")

    print(f"loss (float64) = {loss.item():.12f}")
    for k, v in meta["grad_norms"].items():
        print(f"|grad {k}| = {v:.9f}")
    print(f"{st_path}: {os.path.getsize(st_path)} bytes, {len(tensors)} tensors")


if __name__ == "__main__":
    main()
