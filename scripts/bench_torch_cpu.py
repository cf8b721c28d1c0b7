#!/usr/bin/env python3
"""PyTorch eager baseline for topcoat's CPU pretraining step (docs/PERF.md).

A GPT-2 with the `tiny` preset's shapes (vocab 4096, d=128, 4 layers, 4 heads, context 256,
tied embedding/head, tanh GELU, pre-norm blocks, causal SDPA attention), trained with AdamW on
random tokens in [0, 4096) at B=8, T=256 on 2 threads. Prints the median step time of the last
10 of 20 steps and the tokens/s it implies.

Run: python3 scripts/bench_torch_cpu.py [--steps 20] [--threads 2]
"""

import argparse
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, d, nh):
        super().__init__()
        self.nh = nh
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.fc_proj = nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.nh, d // self.nh).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).contiguous().view(b, t, d))
        return x + self.fc_proj(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, vocab, ctx, d, layers, nh):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, nh) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers))
            elif p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx, targets):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t))
        for blk in self.blocks:
            x = blk(x)
        logits = self.ln_f(x) @ self.wte.weight.T
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vocab, ctx, d, layers, nh, b, t = 4096, 256, 128, 4, 4, 8, 256
    model = GPT(vocab, ctx, d, layers, nh)
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=3e-3,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    times = []
    for step in range(args.steps):
        x = torch.randint(0, vocab, (b, t))
        y = torch.randint(0, vocab, (b, t))
        t0 = time.perf_counter()
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        times.append(time.perf_counter() - t0)
    last = times[-10:]
    med = statistics.median(last)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"torch {torch.__version__} eager, {args.threads} threads, {n_params} params, "
        f"B={b} T={t}: median step {med * 1e3:.1f} ms over the last {len(last)} of "
        f"{args.steps} steps -> {b * t / med:.0f} tokens/s (final loss {loss.item():.3f})"
    )


if __name__ == "__main__":
    main()
