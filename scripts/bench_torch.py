#!/usr/bin/env python3
"""PyTorch baseline for `topcoat bench`: the same model at the same config, timed the same way.

    python3 scripts/bench_torch.py --preset gpt2-124m --batch-size 64 --seq-len 1024 --steps 40
    python3 scripts/bench_torch.py --device cpu --preset tiny --vocab-size 4096 --batch-size 8 \
        --seq-len 256 --steps 20 --no-compile --threads 2      # the CPU anchor of docs/PERF.md
    python3 scripts/bench_torch.py --arch llama --preset llama-3.2-1b --vocab-size 128256 \
        --batch-size 8 --seq-len 2048 --steps 20

--arch gpt2 (the default) is GPT-2; --arch llama a plain-PyTorch Llama block stack with the
shapes of topcoat's llama presets: RMSNorm (F.rms_norm), rotary embeddings (Hugging Face's
rotate-half, theta and Llama 3 scaling as the preset), a SwiGLU MLP, grouped-query attention
through scaled_dot_product_attention (enable_gqa=True where this torch takes it, else the
key/value heads repeat_interleave'd to all query heads), the head tied or not as the preset.
Like topcoat, q/k/v and gate/up are each one fused projection (same FLOPs as separate ones,
fewer launches), without biases.

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
# Llama presets as in src/config/mod.rs: layers, heads, KV heads, width, MLP width, RoPE theta,
# Llama 3 scaling (factor, low, high, original context) or None, tied head.
LLAMA_PRESETS = {
    "llama-tiny": (4, 4, 2, 128, 384, 10_000.0, None, False),
    "smollm2-135m": (30, 9, 3, 576, 1536, 100_000.0, None, True),
    "llama-3.2-1b": (16, 32, 8, 2048, 8192, 500_000.0, (32.0, 1.0, 4.0, 8192), True),
}
DEFAULT_VOCAB = {"gpt2": 50257, "llama-3.2-1b": 128256, "smollm2-135m": 49152, "llama-tiny": 50257}


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


def rope_inv_freq(hs, theta, scaling):
    """Hugging Face's default and Llama 3 inverse frequencies, in float32."""
    inv = 1.0 / (theta ** (torch.arange(0, hs, 2, dtype=torch.int64).float() / hs))
    if scaling is None:
        return inv
    factor, low, high, old = scaling
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def sdpa_takes_gqa(device):
    """True where this torch's SDPA takes enable_gqa (and runs it) on `device`, bf16."""
    try:
        q = torch.randn(1, 4, 8, 64, device=device, dtype=torch.bfloat16)
        kv = torch.randn(1, 2, 8, 64, device=device, dtype=torch.bfloat16)
        F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
        return True
    except (TypeError, RuntimeError):
        return False


class LlamaBlock(nn.Module):
    def __init__(self, c, nh, nkv, inter, eps, gqa):
        super().__init__()
        self.nh, self.nkv, self.hs, self.inter, self.eps, self.gqa = nh, nkv, c // nh, inter, eps, gqa
        self.input_layernorm = nn.Parameter(torch.ones(c))
        self.qkv_proj = nn.Linear(c, (nh + 2 * nkv) * self.hs, bias=False)
        self.o_proj = nn.Linear(c, c, bias=False)
        self.post_attention_layernorm = nn.Parameter(torch.ones(c))
        self.gate_up_proj = nn.Linear(c, 2 * inter, bias=False)
        self.down_proj = nn.Linear(inter, c, bias=False)

    def forward(self, x, cos, sin):
        b, t, c = x.shape
        hs = self.hs
        h = F.rms_norm(x, (c,), self.input_layernorm, self.eps)
        q, k, v = self.qkv_proj(h).split([self.nh * hs, self.nkv * hs, self.nkv * hs], dim=2)
        q = q.view(b, t, self.nh, hs).transpose(1, 2)
        k = k.view(b, t, self.nkv, hs).transpose(1, 2)
        v = v.view(b, t, self.nkv, hs).transpose(1, 2)

        def rot(z):  # rotate-half RoPE; cos/sin [T, hs] (fp32 tables) in z's precision
            z1, z2 = z[..., : hs // 2], z[..., hs // 2 :]
            return z * cos.to(z.dtype) + torch.cat((-z2, z1), dim=-1) * sin.to(z.dtype)

        q, k = rot(q), rot(k)
        if self.gqa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            rep = self.nh // self.nkv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(y.transpose(1, 2).contiguous().view(b, t, c))
        gate, up = self.gate_up_proj(F.rms_norm(x, (c,), self.post_attention_layernorm, self.eps)).split(
            self.inter, dim=2
        )
        return x + self.down_proj(F.silu(gate) * up)


class Llama(nn.Module):
    def __init__(self, vocab, padded, preset, max_t, gqa, eps=1e-5):
        super().__init__()
        n_layer, nh, nkv, c, inter, theta, scaling, tied = preset
        self.vocab, self.eps = vocab, eps
        self.embed_tokens = nn.Embedding(padded, c)
        self.layers = nn.ModuleList(LlamaBlock(c, nh, nkv, inter, eps, gqa) for _ in range(n_layer))
        self.norm = nn.Parameter(torch.ones(c))
        self.lm_head = None if tied else nn.Linear(c, padded, bias=False)
        freqs = torch.outer(torch.arange(max_t).float(), rope_inv_freq(c // nh, theta, scaling))
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx, targets):
        t = idx.shape[1]
        cos, sin = self.cos[:t], self.sin[:t]
        x = self.embed_tokens(idx)
        for block in self.layers:
            x = block(x, cos, sin)
        x = F.rms_norm(x, (x.shape[-1],), self.norm, self.eps)
        logits = x @ self.embed_tokens.weight.T if self.lm_head is None else self.lm_head(x)
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
    ap.add_argument("--arch", default="gpt2", choices=["gpt2", "llama"])
    ap.add_argument("--preset", default=None, help="gpt2: %s; llama: %s" % (", ".join(PRESETS), ", ".join(LLAMA_PRESETS)))
    ap.add_argument("--vocab-size", type=int, default=None, help="default: the preset's tokenizer's")
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
    presets = PRESETS if args.arch == "gpt2" else LLAMA_PRESETS
    args.preset = args.preset or ("gpt2-124m" if args.arch == "gpt2" else "llama-3.2-1b")
    if args.preset not in presets:
        ap.error(f"--preset {args.preset} is not a {args.arch} preset ({', '.join(presets)})")
    args.vocab_size = args.vocab_size or DEFAULT_VOCAB.get(args.preset, DEFAULT_VOCAB["gpt2"])
    padded = (args.vocab_size + 63) // 64 * 64
    cuda = args.device.startswith("cuda")
    dev = torch.device(args.device)
    attn = ""
    if args.arch == "gpt2":
        n_layer, n_head, c, max_t = PRESETS[args.preset]
        model = GPT(args.vocab_size, padded, n_layer, n_head, c, max_t).to(dev)
        positions = model.wpe.weight.numel()
    else:
        n_layer, c = LLAMA_PRESETS[args.preset][0], LLAMA_PRESETS[args.preset][3]
        gqa = sdpa_takes_gqa(dev)
        attn = ", GQA by " + ("SDPA enable_gqa" if gqa else "repeat_interleave")
        model = Llama(args.vocab_size, padded, LLAMA_PRESETS[args.preset], args.seq_len, gqa).to(dev)
        positions = 0
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-4, betas=(0.9, 0.95), eps=1e-8, fused=cuda,
    )
    step_fn = model if args.no_compile else torch.compile(model)
    n = sum(p.numel() for p in model.parameters()) - positions
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
    print(f"torch {torch.__version__} {mode}, {args.preset}{attn}, B={args.batch_size} T={args.seq_len}, final loss {loss.item():.3f}")
    print("| trainer | step ms | tokens/s | MFU | peak TFLOP/s | peak mem |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| PyTorch ({mode}) | {med * 1e3:.1f} | {tok_s:,.0f} | {mfu} | {peak:.0f} | {mem} |")


if __name__ == "__main__":
    main()
