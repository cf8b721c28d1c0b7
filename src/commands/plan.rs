//! The configuration summary `info` and `bench` print before anything runs: parameters,
//! FLOPs per token and the memory plan ([`MemoryPlan`]) by part, with what activation
//! recompute 1 and 2 would save and the per-rank bytes under ZeRO-1.

use crate::backend::Role;
use crate::config::ModelConfig;
use crate::model::{MemoryPlan, PlanOptions};
use std::fmt::Write as _;

/// Element bytes of a backend's storage, by name: `cpu` (f32 everywhere) or `cuda` (bf16
/// weights and activations; fp32 master, gradients, moments and statistics).
pub fn storage_bytes(backend: &str) -> Option<fn(Role) -> usize> {
    match backend {
        "cpu" => Some(|_| 4),
        "cuda" => Some(|r| match r {
            Role::Param | Role::Activation => 2,
            Role::Grad | Role::State | Role::Stat => 4,
        }),
        _ => None,
    }
}

/// The summary of training `cfg` (called `name`) on `b x t` micro-batches at `recompute` on a
/// backend storing a role in `bytes(role)` bytes (`storage` describes it).
pub fn describe(
    name: &str,
    cfg: &ModelConfig,
    (b, t): (usize, usize),
    recompute: u8,
    bytes: &dyn Fn(Role) -> usize,
    storage: &str,
) -> String {
    let mut s = String::new();
    let plan = |recompute, zero, world_size| {
        let opts = PlanOptions {
            recompute,
            zero,
            world_size,
        };
        MemoryPlan::training_with(cfg, b, t, opts, bytes)
    };
    let p = plan(recompute, 0, 1);
    let _ = writeln!(
        s,
        "model: {name}, {} layers, {} heads, d={}, context {}, vocab {} (padded {})",
        cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.max_seq_len, cfg.vocab_size, cfg.padded_vocab_size
    );
    if let Some(line) = family_line(cfg) {
        let _ = writeln!(s, "{line}");
    }
    let n = cfg.num_params();
    let _ = writeln!(s, "  parameters: {n} ({:.2} M)", n as f64 / 1e6);
    let _ = writeln!(
        s,
        "  FLOPs per token: {:.3e} (6N + 12LCT at T={t}, training)",
        cfg.flops_per_token(t)
    );
    let _ = writeln!(
        s,
        "  memory plan ({storage}), B={b}, T={t}, recompute {recompute}:"
    );
    for (part, v) in [
        ("weights", p.weights),
        ("master", p.master),
        ("moments", p.moments),
        ("gradients", p.grads),
    ] {
        let _ = writeln!(s, "    {part:<12}{:>10}", gib(v));
    }
    let others: Vec<String> = (0..=2u8)
        .filter(|&l| l != recompute)
        .map(|l| {
            let a = plan(l, 0, 1).activations;
            let (verb, d) = if a <= p.activations {
                ("saves", p.activations - a)
            } else {
                ("adds", a - p.activations)
            };
            format!("recompute {l}: {}, {verb} {}", gib(a), gib(d))
        })
        .collect();
    let _ = writeln!(
        s,
        "    {:<12}{:>10} ({})",
        "activations",
        gib(p.activations),
        others.join("; ")
    );
    let _ = writeln!(s, "    {:<12}{:>10}", "total", gib(p.total()));
    let ranks: Vec<String> = [2, 4, 8]
        .iter()
        .map(|&w| format!("{w} ranks {}", gib(plan(recompute, 1, w).total())))
        .collect();
    let _ = writeln!(
        s,
        "  per rank with ZeRO-1 (--zero 1; master and moments sharded): {}",
        ranks.join(", ")
    );
    s
}

/// The Llama family's own settings on one line (`None` for GPT-2, which has none):
/// `  family: llama, 8 KV heads of 64, SwiGLU 8192, RoPE theta 500000 (llama3 scaling x32),
/// RMSNorm eps 1e-5, tied head`.
pub fn family_line(cfg: &ModelConfig) -> Option<String> {
    let l = cfg.llama()?;
    let scaling = l
        .rope_scaling
        .as_ref()
        .map(|r| format!(" (llama3 scaling x{})", r.factor))
        .unwrap_or_default();
    Some(format!(
        "  family: llama, {} KV heads of {}, SwiGLU {}, RoPE theta {}{scaling}, RMSNorm eps {:e}, \
         {} head{}",
        l.n_kv_head,
        cfg.head_size(),
        l.intermediate_size,
        l.rope_theta,
        l.rms_eps,
        if l.tie_embeddings { "tied" } else { "untied" },
        if l.qkv_bias { ", q/k/v biases" } else { "" },
    ))
}

/// `bytes` in GiB with two decimals, or MiB below 0.1 GiB.
pub fn gib(bytes: u128) -> String {
    let g = bytes as f64 / (1u64 << 30) as f64;
    if g >= 0.1 || bytes == 0 {
        format!("{g:.2} GiB")
    } else {
        format!("{:.2} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}
