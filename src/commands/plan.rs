//! The configuration summary `plan`, `info` and `bench` print before anything runs:
//! parameters, FLOPs per token and the memory plan ([`MemoryPlan`]) row by row (frozen and
//! trainable weights, master copy, moments, gradients, activations at every recompute level,
//! logits, LoRA's activations, the total against the device's free memory), the per-rank
//! bytes under ZeRO-1; the compact budget every training run prints at its start
//! ([`budget`]), and the measured peak it prints at its end ([`peak_line`]).

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

/// How a backend stores each role, in words: `bf16 weights and activations, fp32 state` or
/// `f32 everywhere`.
pub fn storage_name(bytes: &dyn Fn(Role) -> usize) -> String {
    let (p, a) = (bytes(Role::Param), bytes(Role::Activation));
    let name = |b: usize| match b {
        2 => "bf16".to_string(),
        4 => "f32".to_string(),
        n => format!("{n}-byte"),
    };
    if p == 4 && a == 4 && bytes(Role::State) == 4 {
        return "f32 everywhere".into();
    }
    let kept = if p == a {
        format!("{} weights and activations", name(p))
    } else {
        format!("{} weights, {} activations", name(p), name(a))
    };
    format!("{kept}, fp32 master, gradients and moments")
}

/// `LoRA r16 (alpha 32) on q,k,v,o,gate,up,down`, or `full fine-tune` without adapters.
pub fn lora_words(cfg: &ModelConfig) -> String {
    match &cfg.lora {
        Some(l) => format!(
            "LoRA r{} (alpha {}) on {}",
            l.rank,
            l.alpha,
            l.targets
                .iter()
                .map(|t| t.name())
                .collect::<Vec<_>>()
                .join(",")
        ),
        None => "every weight trained".into(),
    }
}

/// `9.10 GiB (recompute 0), 6.20 GiB (1), 4.00 GiB (2)`.
pub fn activations_by_level(plan: &MemoryPlan) -> String {
    let [a0, a1, a2] = plan.activations_at;
    format!(
        "{} (recompute 0), {} (1), {} (2)",
        gib(a0),
        gib(a1),
        gib(a2)
    )
}

/// `of 79.10 GiB free: fits` (or `does not fit`), or `` where the device cannot tell.
fn against(total: u128, available: Option<u64>) -> String {
    available.map_or_else(String::new, |a| {
        let verdict = if total <= a as u128 {
            "fits"
        } else {
            "does not fit"
        };
        format!(" of {} free: {verdict}", gib(a as u128))
    })
}

/// The compact budget a training run prints at its start (three lines, a fourth for the
/// models a stage holds beside the trained one).
pub fn budget(
    cfg: &ModelConfig,
    plan: &MemoryPlan,
    storage: &str,
    available: Option<u64>,
) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "memory plan ({storage}), {} rows x {} tokens, recompute {}, {}: total {}{}",
        plan.batch_size,
        plan.seq_len,
        plan.recompute,
        lora_words(cfg),
        gib(plan.total()),
        against(plan.total(), available)
    );
    let _ = writeln!(
        s,
        "  weights: frozen {} ({} parameters), trainable {} ({} parameters); fp32 master {}; \
         AdamW moments {}; gradients {}",
        gib(plan.frozen),
        plan.frozen_params,
        gib(plan.weights),
        plan.trainable_params,
        gib(plan.master),
        gib(plan.moments),
        gib(plan.grads)
    );
    let lora = if cfg.lora.is_some() {
        format!(
            "; LoRA activations {} (kept {}, scratch {})",
            gib(plan.lora_kept + plan.lora_scratch),
            gib(plan.lora_kept),
            gib(plan.lora_scratch)
        )
    } else {
        String::new()
    };
    let _ = writeln!(
        s,
        "  activations {}; logits {}{lora}",
        activations_by_level(plan),
        gib(plan.logits),
    );
    if plan.held > 0 {
        let _ = writeln!(
            s,
            "  models held beside (frozen weights and forward buffers): {}",
            gib(plan.held)
        );
    }
    s
}

/// The line a run or a bench ends with: the measured peak beside the plan's total.
pub fn peak_line(peak: Option<u64>, plan: &MemoryPlan) -> String {
    match peak {
        Some(p) => format!(
            "peak memory: {} measured, {} planned ({:+.1}%)",
            gib(p as u128),
            gib(plan.total()),
            100.0 * (p as f64 / plan.total().max(1) as f64 - 1.0)
        ),
        None => format!(
            "peak memory: not measurable on this backend ({} planned)",
            gib(plan.total())
        ),
    }
}

/// The summary of training `cfg` (called `name`) on `b x t` micro-batches at `recompute` on a
/// backend storing a role in `bytes(role)` bytes (`storage` describes it), against
/// `available` bytes where known.
pub fn describe(
    name: &str,
    cfg: &ModelConfig,
    (b, t): (usize, usize),
    recompute: u8,
    bytes: &dyn Fn(Role) -> usize,
    storage: &str,
    available: Option<u64>,
) -> String {
    let mut s = String::new();
    let plan = |recompute, zero, world_size| {
        let opts = PlanOptions {
            recompute,
            zero,
            world_size,
            logit_rows: None,
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
    if cfg.lora.is_some() {
        let _ = writeln!(
            s,
            "  {}: {} adapter parameters ({:.3}% of the base)",
            lora_words(cfg),
            p.trainable_params,
            100.0 * p.trainable_params as f64 / n.max(1) as f64
        );
    }
    let _ = writeln!(
        s,
        "  FLOPs per token: {:.3e} (6N + 12LCT at T={t}, training)",
        cfg.flops_per_token(t)
    );
    let _ = writeln!(
        s,
        "  memory plan ({storage}), B={b}, T={t}, recompute {recompute}:"
    );
    let frozen_note = format!("{} parameters, one working copy", p.frozen_params);
    let trained_note = format!("{} parameters", p.trainable_params);
    let logits_rows =
        crate::model::head::logit_chunk_rows(b.saturating_mul(t), cfg.padded_vocab_size);
    let logits_note = format!(
        "{logits_rows} of {} rows x {} per chunk",
        b.saturating_mul(t),
        cfg.padded_vocab_size
    );
    let lora_note = format!("kept {}, scratch {}", gib(p.lora_kept), gib(p.lora_scratch));
    let others: Vec<String> = (0..=2u8)
        .filter(|&l| l != recompute)
        .map(|l| {
            let a = p.activations_at[usize::from(l)];
            let (verb, d) = if a <= p.activations {
                ("saves", p.activations - a)
            } else {
                ("adds", a - p.activations)
            };
            format!("recompute {l}: {}, {verb} {}", gib(a), gib(d))
        })
        .collect();
    let total_note = against(p.total(), available);
    for (part, v, note) in [
        ("frozen weights", p.frozen, frozen_note.as_str()),
        ("trainable weights", p.weights, trained_note.as_str()),
        ("fp32 master", p.master, "trainable only"),
        ("AdamW moments", p.moments, "trainable only"),
        ("gradients", p.grads, "trainable only"),
        ("activations", p.activations, &others.join("; ")),
        ("logits", p.logits, logits_note.as_str()),
        (
            "LoRA activations",
            p.lora_kept + p.lora_scratch,
            lora_note.as_str(),
        ),
        ("total", p.total(), total_note.trim_start()),
    ] {
        let note = if note.is_empty() {
            String::new()
        } else {
            format!(" ({note})")
        };
        let _ = writeln!(s, "    {part:<18}{:>11}{note}", gib(v));
    }
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
