#!/usr/bin/env python3
"""PyTorch baseline for `topcoat bench`: the same GPT-2 at the same config, timed the same way.

    python3 scripts/bench_torch.py --preset gpt2-124m --batch-size 64 --seq-len 1024 --steps 40
    python3 scripts/bench_torch.py --device cpu --preset tiny --vocab-size 4096 --batch-size 8 \
        --seq-len 256 --steps 20 --no-compile --threads 2      # the CPU anchor of docs/PERF.md

On CUDA: torch.compile, bf16 autocast, SDPA (flash) attention, fused AdamW, random tokens.
On the CPU: float32, eager with --no-compile. Both: AdamW (decay on matrices), clipping at 1.0.
Prints the median step time of the last half of the steps, tokens/s, MFU against a measured
bf16 matmul peak (or --peak-tflops), and peak device memory, as one table row.
Model FLOPs per token = 6 N + 12 L C T, N = all parameters but the position embedding (the
tied head counted once), the convention of docs/PERF.md.
"""
import argparse
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PRESETS = {"tiny": (4, 4, 128, 256), "small": (6, 6, 384, 512), "gpt2-124m": (12, 12, 768, 1024)}


class Block(nn.Module):
    def __init__(self, c, nh):
        super().__init__()
        self.nh = nh
        self.ln_1 = nn.LayerNorm(c)
        self.c_attn = nn.Linear(c, 3 * c)
        self.c_proj = nn.Linear(c, c)
        self.ln_2 = nn.LayerNorm(c)
        self.c_fc = nn.Linear(c, 4 * c)
        self.mlp_proj = nn.Linear(4 * c, c)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        heads = lambda z: z.view(b, t, self.nh, c // self.nh).transpose(1, 2)
        y = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, vocab, padded, n_layer, n_head, c, max_t):
        super().__init__()
        self.vocab = vocab
        self.wte = nn.Embedding(padded, c)
        self.wpe = nn.Embedding(max_t, c)
        self.h = nn.ModuleList(Block(c, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(c)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") or "mlp_proj" in name else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx, targets):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.T
        logits = logits[..., : self.vocab].float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def matmul_peak_tflops(device):
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    reps = 20
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2-124m", choices=PRESETS)
    ap.add_argument("--vocab-size", type=int, default=50257)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-compile", action="store_true", help="eager mode")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="MFU denominator; 0 measures it")
    args = ap.parse_args()

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    n_layer, n_head, c, max_t = PRESETS[args.preset]
    padded = (args.vocab_size + 63) // 64 * 64
    cuda = args.device.startswith("cuda")
    dev = torch.device(args.device)
    model = GPT(args.vocab_size, padded, n_layer, n_head, c, max_t).to(dev)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-4, betas=(0.9, 0.95), eps=1e-8, fused=cuda,
    )
    step_fn = model if args.no_compile else torch.compile(model)
    n = sum(p.numel() for p in model.parameters()) - model.wpe.weight.numel()
    flops_per_token = 6 * n + 12 * n_layer * c * args.seq_len
    tokens = args.batch_size * args.seq_len

    times = []
    for step in range(args.steps):
        data = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len + 1), device=dev)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=cuda):
            loss = step_fn(data[:, :-1], data[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    med = statistics.median(times[len(times) // 2 :])
    tok_s = tokens / med
    peak = args.peak_tflops or (matmul_peak_tflops(dev) if cuda else 0.0)
    mfu = f"{100 * flops_per_token * tok_s / (peak * 1e12):.1f}%" if peak else "n/a"
    mem = f"{torch.cuda.max_memory_allocated(dev) / 2**30:.1f} GiB" if cuda else "n/a"
    mode = "eager" if args.no_compile else "torch.compile"
    print(f"torch {torch.__version__} {mode}, {args.preset}, B={args.batch_size} T={args.seq_len}, final loss {loss.item():.3f}")
    print("| trainer | step ms | tokens/s | MFU | peak TFLOP/s | peak mem |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| PyTorch ({mode}) | {med * 1e3:.1f} | {tok_s:,.0f} | {mfu} | {peak:.0f} | {mem} |")


if __name__ == "__main__":
    main()
