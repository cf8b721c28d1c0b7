#!/usr/bin/env python3
"""PyTorch + PEFT baseline for `topcoat bench --lora-rank`: the same LoRA step, timed the same way.

    python3 scripts/bench_peft.py --preset llama-3.2-1b --batch-size 8 --seq-len 2048 --steps 12
    python3 scripts/bench_peft.py --preset llama-3.1-8b --batch-size 1 --seq-len 2048 \
        --gradient-checkpointing --steps 3                    # the 8B-on-24-GiB shape
    python3 scripts/bench_peft.py --device cpu --tiny          # seconds, a check of the script

The model is transformers' LlamaForCausalLM built from a config with the shapes of topcoat's
presets (random init, SDPA attention), its weights in bf16 and frozen, wrapped by PEFT's
get_peft_model with a LoraConfig of rank 16, alpha 32 on q,k,v,o,gate,up,down (q_proj, k_proj,
v_proj, o_proj, gate_proj, up_proj, down_proj): what TRL + PEFT train. PEFT keeps the adapters
in float32 beside a bf16 base (autocast_adapter_dtype), so, as in topcoat, the adapters have an
fp32 master; AdamW (fused on CUDA, decay 0.1 on the adapter matrices) steps them alone, after
clipping their norm at 1.0. Unlike topcoat's q/k/v and gate/up, Hugging Face's projections are
separate matrices (same FLOPs, more launches).

On CUDA: torch.compile of the forward + loss (eager, with the reason printed, where the compile
fails), bf16 autocast, SDPA (flash) attention, random tokens; the loss is a plain cross-entropy
of the float32 logits, as bench_torch.py computes it (all B x T x V of them: what PyTorch does
without a fused or chunked head). On the CPU: eager, same dtypes.
`--gradient-checkpointing` recomputes each decoder layer in the backward pass (transformers'
gradient_checkpointing_enable, non-reentrant), the counterpart of topcoat's `--recompute`.

Prints the median step time of the last half of the steps, tokens/s, model TFLOP/s (6N + 12 L C T
per token with N all base parameters, the convention `topcoat bench` prints, also with LoRA;
MFU only with --peak-tflops), and two peaks: `torch.cuda.max_memory_allocated` (tensors only)
and the device's used memory (total - free from cudaMemGetInfo, sampled after every step: the
process, its CUDA context and the allocator's cache, as `topcoat bench` measures its own peak).
"""
import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# layers, heads, KV heads, width, MLP width, RoPE theta, Llama 3 scaling factor (None: none),
# tied head: topcoat's presets (src/config/presets.rs).
PRESETS = {
    "llama-tiny": (4, 4, 2, 128, 384, 10_000.0, None, False),
    "llama-3.2-1b": (16, 32, 8, 2048, 8192, 500_000.0, 32.0, True),
    "llama-3.1-8b": (32, 32, 8, 4096, 14336, 500_000.0, 8.0, False),
}
TARGET_MODULES = {
    "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
    "gate": "gate_proj", "up": "up_proj", "down": "down_proj",
}


def llama_config(preset, vocab, max_t):
    from transformers import LlamaConfig

    n_layer, nh, nkv, c, inter, theta, factor, tied = PRESETS[preset]
    scaling = None
    if factor is not None:
        scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    kw = dict(
        vocab_size=vocab, hidden_size=c, intermediate_size=inter, num_hidden_layers=n_layer,
        num_attention_heads=nh, num_key_value_heads=nkv, hidden_act="silu", rms_norm_eps=1e-5,
        max_position_embeddings=max(max_t, 131072 if factor else 2048), tie_word_embeddings=tied,
        attention_bias=False, mlp_bias=False, initializer_range=0.02, use_cache=False,
    )
    # transformers 5 takes RoPE as rope_parameters, 4.x as rope_theta + rope_scaling.
    try:
        cfg = LlamaConfig(rope_parameters=dict(scaling or {"rope_type": "default"}, rope_theta=theta), **kw)
        if getattr(cfg, "rope_parameters", None) is None:
            raise TypeError("no rope_parameters")
    except TypeError:
        cfg = LlamaConfig(rope_theta=theta, rope_scaling=scaling, **kw)
    cfg._attn_implementation = "sdpa"
    return cfg


def build(preset, vocab, max_t, dev):
    """LlamaForCausalLM in bf16, initialised on `dev` (no float32 copy on the host)."""
    from transformers import LlamaForCausalLM

    cfg = llama_config(preset, vocab, max_t)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with dev:
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.to(dtype=torch.bfloat16)


class LossOf(nn.Module):
    """forward(inputs, targets) -> mean cross-entropy of the float32 logits (bench_torch.py's)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx, targets):
        logits = self.model(input_ids=idx, use_cache=False).logits.float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def device_used(dev):
    free, total = torch.cuda.mem_get_info(dev)
    return total - free


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-3.2-1b", choices=sorted(PRESETS))
    ap.add_argument("--tiny", action="store_true",
                    help="llama-tiny, vocab 512, B=2, T=64, 4 steps (each unless given): a quick check")
    ap.add_argument("--vocab-size", type=int, default=None, help="default 128256 (512 with --tiny)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 8")
    ap.add_argument("--seq-len", type=int, default=None, help="default 2048")
    ap.add_argument("--steps", type=int, default=None, help="default 20")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--lora-alpha", type=float, default=None, help="default 2 x rank")
    ap.add_argument("--lora-dropout", type=float, default=0.0)
    ap.add_argument("--lora-targets", default="q,k,v,o,gate,up,down", help="a list of q,k,v,o,gate,up,down, or all")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="recompute each layer in the backward")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-compile", action="store_true", help="eager mode")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="MFU denominator (0: no MFU)")
    args = ap.parse_args()

    tiny = {"preset": "llama-tiny", "vocab_size": 512, "batch_size": 2, "seq_len": 64, "steps": 4}
    full = {"vocab_size": 128256, "batch_size": 8, "seq_len": 2048, "steps": 20}
    for key, value in (tiny if args.tiny else full).items():
        if key == "preset" or getattr(args, key) is None:
            setattr(args, key, value)
    names = list(TARGET_MODULES) if args.lora_targets == "all" else args.lora_targets.split(",")
    unknown = [n for n in names if n not in TARGET_MODULES]
    if unknown:
        ap.error(f"--lora-targets: unknown {','.join(unknown)} (expected q,k,v,o,gate,up,down or all)")
    alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_rank

    import peft
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    dev = torch.device(args.device)
    model = build(args.preset, args.vocab_size, args.seq_len, dev)
    n_base = sum(p.numel() for p in model.parameters())
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lcfg = LoraConfig(r=args.lora_rank, lora_alpha=alpha, lora_dropout=args.lora_dropout,
                      target_modules=[TARGET_MODULES[n] for n in names], bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    trained = [p for p in model.parameters() if p.requires_grad]
    n_trained = sum(p.numel() for p in trained)
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in trained})
    opt = torch.optim.AdamW(trained, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=cuda)
    model.train()
    loss_of = LossOf(model)
    compiled = cuda and not args.no_compile
    step_fn = torch.compile(loss_of) if compiled else loss_of
    mode = "torch.compile" if compiled else "eager"

    n_layer, c = PRESETS[args.preset][0], PRESETS[args.preset][3]
    flops_per_token = 6 * n_base + 12 * n_layer * c * args.seq_len
    tokens = args.batch_size * args.seq_len
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    used_peak = 0
    times = []
    for step in range(args.steps):
        data = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len + 1), device=dev)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=cuda):
            try:
                loss = step_fn(data[:, :-1], data[:, 1:])
            except Exception as e:  # a compile PEFT does not allow: say so, run eager
                if step_fn is loss_of:
                    raise
                print(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); eager instead")
                step_fn, mode = loss_of, "eager (compile failed)"
                loss = step_fn(data[:, :-1], data[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
            used_peak = max(used_peak, device_used(dev))
        times.append(time.perf_counter() - start)
        print(f"step {step + 1:3d}: {times[-1] * 1e3:9.1f} ms, loss {loss.item():.4f}", flush=True)
    med = statistics.median(times[len(times) // 2 :])
    tok_s = tokens / med
    tflops = flops_per_token * tok_s / 1e12
    mfu = f"{100 * tflops / args.peak_tflops:.1f}%" if args.peak_tflops else "n/a"
    if cuda:
        alloc = f"{torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB"
        used = f"{used_peak / 2**30:.2f} GiB"
    else:
        alloc = used = "n/a"
    ckpt = ", gradient checkpointing" if args.gradient_checkpointing else ""
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; "
          f"{mode}, {args.preset} (vocab {args.vocab_size}), LoRA r={args.lora_rank} alpha={alpha:g} on "
          f"{','.join(names)}: {n_trained:,} trained ({'/'.join(dtypes)}) of {n_base:,}{ckpt}; "
          f"B={args.batch_size} T={args.seq_len}, final loss {loss.item():.3f}")
    print("| trainer | step ms | tokens/s | model TFLOP/s | MFU | peak allocated | peak device used |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(f"| PyTorch + PEFT ({mode}) | {med * 1e3:.1f} | {tok_s:,.0f} | {tflops:.4g} | {mfu} | {alloc} | {used} |")


if __name__ == "__main__":
    main()
