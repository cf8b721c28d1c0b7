//! The memory plan: how many bytes a training run of one model shape and batch shape needs
//! (frozen and trained weights, master copy, gradients, optimizer moments, activations,
//! logits and a chunked head's staging, LoRA's own activations, and the models a stage holds
//! beside the trained one), checked against what the device has before anything is
//! allocated, so that a batch too large for the machine is a named error rather than an
//! allocator abort minutes later. The weights' rows come from the model's [`ParamLayout`]
//! (frozen or trained per tensor), so the plan of a LoRA model counts what is allocated.
//! What would make a run fit is `fit.rs`.
//!
//! All arithmetic is in `u128`: no batch or sequence length a user can type overflows it.

use super::head::logit_chunk_rows;
use super::{LoraSlot, ParamLayout};
use crate::backend::Role;
use crate::config::ModelConfig;
use thiserror::Error;

/// The run does not fit: what it needs, by part, what the device has, and what would fit.
#[derive(Debug, Error)]
#[error(
    "the run needs about {need} (weights, gradients and optimizer {fixed}; activations {acts} at \
     batch_size {b} x seq_len {t}) but {device} has {have} available; {what}",
    need = gib(plan.total()),
    fixed = gib(plan.fixed()),
    acts = gib(plan.activation_total()),
    b = plan.batch_size,
    t = plan.seq_len,
    have = gib(*available),
    what = advice.clone().unwrap_or_else(|| generic_hint(plan.recompute)),
)]
pub struct OutOfMemory {
    pub plan: MemoryPlan,
    pub device: String,
    pub available: u128,
    /// What would fit, by the same arithmetic (`fit::advise`), when the caller knows the
    /// command's flags; else a generic hint is printed.
    pub advice: Option<String>,
}

fn generic_hint(recompute: u8) -> String {
    let hint = if recompute < 2 {
        "; or raise --recompute (1 or 2)"
    } else {
        ""
    };
    format!(
        "lower --batch-size (or --seq-len), and use --total-batch-tokens to keep the tokens per \
         step{hint}"
    )
}
/// What besides the shapes decides a plan: the activation recompute level and ZeRO-1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanOptions {
    /// 0 keeps every activation, 1 recomputes the GELU, 2 also the layernorms (`--recompute`).
    pub recompute: u8,
    /// 1: the AdamW moments and the fp32 master copy are sharded over `world_size` ranks.
    pub zero: u8,
    pub world_size: usize,
    /// Rows per chunk of the LM head forced by `Gpt::set_logit_chunk_rows` (`None`: the
    /// default rule, [`logit_chunk_rows`]).
    pub logit_rows: Option<usize>,
}

impl Default for PlanOptions {
    fn default() -> Self {
        Self {
            recompute: 0,
            zero: 0,
            world_size: 1,
            logit_rows: None,
        }
    }
}

/// Bytes one rank needs, by part (each `u128`, so never overflowing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryPlan {
    /// Rows of a micro-batch (what the model sees: a DPO pair is two rows).
    pub batch_size: usize,
    pub seq_len: usize,
    pub recompute: u8,
    pub zero: u8,
    pub world_size: usize,
    /// Elements of the frozen and of the trained tensors (a full fine-tune freezes none).
    pub frozen_params: u128,
    pub trainable_params: u128,
    /// The frozen tensors' one working copy (a LoRA model's base): no master, moments or
    /// gradients.
    pub frozen: u128,
    /// The trained tensors' working copy.
    pub weights: u128,
    /// The fp32 master copy of the trained tensors where the working copy is narrower (CUDA's
    /// bf16), else 0; this rank's shard under ZeRO-1.
    pub master: u128,
    /// AdamW's two moments of the trained tensors (this rank's shard under ZeRO-1).
    pub moments: u128,
    /// Gradients of the trained tensors.
    pub grads: u128,
    /// The forward pass's saved activations and the backward's scratch at `recompute`
    /// (without the logits and LoRA's own, below).
    pub activations: u128,
    /// [`Self::activations`] at recompute 0, 1 and 2.
    pub activations_at: [u128; 3],
    /// The logits buffer: one chunk of rows of the chunked classifier (`model/head.rs`), and
    /// when it runs in several chunks, their staging (a chunk's rows of `lnf` and `dlnf`, and
    /// its fp32 losses).
    pub logits: u128,
    /// LoRA: each adapter's `x A^T` (`N x rank`) saved for the backward pass.
    pub lora_kept: u128,
    /// LoRA: the buffers the adapters share (model/lora/pass.rs): the forward's `t` per
    /// distinct output width (and with dropout, `xd` per distinct input width), the
    /// backward's `du` (`N x rank`) and `dxl` per distinct input width, and GPT-2 with a
    /// `down` adapter the GELU's output gradient (`N x 4C`).
    pub lora_scratch: u128,
    /// Models held beside the trained one (RL's reward model, and its reference without
    /// LoRA): their frozen weights and forward-only activations ([`MemoryPlan::held_model`]).
    pub held: u128,
}

impl MemoryPlan {
    /// The plan of training `cfg` on micro-batches of `b` rows of `t` tokens, on a backend
    /// storing an element of each role in `bytes(role)` bytes (`Backend::element_bytes`),
    /// every activation kept and no sharding.
    pub fn training(cfg: &ModelConfig, b: usize, t: usize, bytes: impl Fn(Role) -> usize) -> Self {
        Self::training_with(cfg, b, t, PlanOptions::default(), bytes)
    }

    /// [`MemoryPlan::training`] at a recompute level and a ZeRO stage over `world_size` ranks.
    pub fn training_with(
        cfg: &ModelConfig,
        b: usize,
        t: usize,
        opts: PlanOptions,
        bytes: impl Fn(Role) -> usize,
    ) -> Self {
        let w = |role: Role| bytes(role) as u128;
        // The layout is what `Gpt` allocates: LoRA's adapters appended, the base frozen.
        let layout = ParamLayout::new(cfg);
        let all = layout.num_params() as u128;
        let trainable = layout.num_trainable() as u128;
        // Under ZeRO-1 each rank holds ceil(trainable / W) elements of the sharded state.
        let sharded = if opts.zero >= 1 {
            trainable.div_ceil(opts.world_size.max(1) as u128)
        } else {
            trainable
        };
        // A narrow working copy (CUDA's bf16) comes with an fp32 master copy (DESIGN.md).
        let master = if w(Role::Param) < 4 { 4 } else { 0 };
        let activations_at = [0, 1, 2].map(|level| activation_bytes(cfg, b, t, level, &w));
        let n = b as u128 * t as u128; // < 2^128: two factors below 2^64
        let (lora_kept, lora_scratch) = lora_bytes(cfg, &layout, n, w(Role::Activation));
        let rows = opts.logit_rows.map_or_else(
            || logit_chunk_rows(b.saturating_mul(t), cfg.padded_vocab_size),
            |r| r.clamp(1, b.saturating_mul(t).max(1)),
        );
        Self {
            batch_size: b,
            seq_len: t,
            recompute: opts.recompute,
            zero: opts.zero,
            world_size: opts.world_size,
            frozen_params: all - trainable,
            trainable_params: trainable,
            frozen: (all - trainable) * w(Role::Param),
            weights: trainable * w(Role::Param),
            master: sharded * master,
            moments: 2 * sharded * w(Role::State),
            grads: trainable * w(Role::Grad),
            activations: activations_at[usize::from(opts.recompute.min(2))],
            activations_at,
            logits: logit_bytes(cfg, n, rows as u128, &w),
            lora_kept,
            lora_scratch,
            held: 0,
        }
    }

    /// Bytes of a model of `cfg` held beside the trained one for forward passes of `b x t`
    /// (RL's reference and reward model): its weights frozen (one working copy, no master,
    /// gradients or moments), its activations at recompute 0 without the backward's scratch,
    /// and its logits at the default chunk rule.
    pub fn held_model(
        cfg: &ModelConfig,
        b: usize,
        t: usize,
        bytes: impl Fn(Role) -> usize,
    ) -> u128 {
        let w = |role: Role| bytes(role) as u128;
        let params = ParamLayout::new(cfg).num_params() as u128;
        let n = b as u128 * t as u128;
        let acts = activation_bytes(cfg, b, t, 0, &w).saturating_sub(scratch_bytes(cfg, n, &w));
        let rows = logit_chunk_rows(b.saturating_mul(t), cfg.padded_vocab_size) as u128;
        // A forward pass stages no chunk of a gradient: its logits alone, plus its staging.
        let kept = lora_bytes(cfg, &ParamLayout::new(cfg), n, w(Role::Activation)).0;
        sum(&[
            prod(&[params, w(Role::Param)]),
            acts,
            logit_bytes(cfg, n, rows, &w),
            kept,
            forward_lora_scratch(cfg, &ParamLayout::new(cfg).lora, n, w(Role::Activation)),
        ])
    }

    /// This plan with `bytes` of models held beside the trained one ([`Self::held`]).
    pub fn with_held(self, bytes: u128) -> Self {
        Self {
            held: bytes,
            ..self
        }
    }

    /// The same shape's activations alone (a model whose weights already live on the device).
    pub fn activations_only(self) -> Self {
        Self {
            frozen: 0,
            weights: 0,
            master: 0,
            moments: 0,
            grads: 0,
            held: 0,
            ..self
        }
    }

    /// The weights, their master copy, gradients and moments, and the models held beside
    /// (whose own batch shape is the stage's): what the run's micro-batch does not change.
    pub fn fixed(&self) -> u128 {
        sum(&[
            self.frozen,
            self.weights,
            self.master,
            self.moments,
            self.grads,
            self.held,
        ])
    }

    /// Everything the batch shape decides: activations, logits and LoRA's activations.
    pub fn activation_total(&self) -> u128 {
        sum(&[
            self.activations,
            self.logits,
            self.lora_kept,
            self.lora_scratch,
        ])
    }

    pub fn total(&self) -> u128 {
        sum(&[self.fixed(), self.activation_total()])
    }

    /// Refuses the plan when it needs more than `available` bytes (`None`: the device cannot
    /// tell, and only a plan past the address space is refused). `device` names it.
    pub fn check(&self, device: &str, available: Option<u64>) -> Result<(), Box<OutOfMemory>> {
        let available = available_bytes(available);
        if self.total() <= available {
            return Ok(());
        }
        Err(Box::new(OutOfMemory {
            plan: *self,
            device: device.to_string(),
            available,
            advice: None,
        }))
    }
}

/// What a device that cannot tell its free memory is taken to have: the address space.
pub fn available_bytes(available: Option<u64>) -> u128 {
    available.map_or(usize::MAX as u128, u128::from)
}

/// The logits buffer of an `n`-position pass run `rows` rows at a time (`model/head.rs`):
/// `rows x VP` logits, and with several chunks their staging (`lnf` and `dlnf` rows,
/// `logit_staging_elements`) and `rows` fp32 losses.
fn logit_bytes(cfg: &ModelConfig, n: u128, rows: u128, w: &impl Fn(Role) -> u128) -> u128 {
    let (c, vp) = (cfg.n_embd as u128, cfg.padded_vocab_size as u128);
    let act = w(Role::Activation);
    let logits = prod(&[act, rows, vp]);
    if rows >= n {
        return logits;
    }
    sum(&[
        logits,
        prod(&[act, 2, rows, c]),
        prod(&[w(Role::State), rows]),
    ])
}

/// LoRA's activations over `n` positions (model/lora/pass.rs `LoraActs`, `LoraGrads` and
/// `GradScratch::dgelu`): per adapter its `x A^T` (`n x rank`), kept for the backward pass;
/// and the scratch all adapters share (see [`MemoryPlan::lora_scratch`]).
fn lora_bytes(cfg: &ModelConfig, layout: &ParamLayout, n: u128, act: u128) -> (u128, u128) {
    let Some(lora) = &cfg.lora else {
        return (0, 0);
    };
    let r = lora.rank as u128;
    let slots = &layout.lora;
    let kept = prod(&[act, slots.len() as u128, n, r]);
    let forward = forward_lora_scratch(cfg, slots, n, act);
    let ins = distinct_sum(slots.iter().map(|s| s.in_dim));
    // GPT-2's `down` adapter: the gradient on the GELU's output, apart from its input's.
    let down = cfg.llama().is_none() && lora.targets.contains(&crate::config::LoraTarget::Down);
    let dgelu = if down { cfg.mlp_width() as u128 } else { 0 };
    let backward = prod(&[act, n, sum(&[r, ins, dgelu])]);
    (kept, sum(&[forward, backward]))
}

/// The forward's LoRA scratch (`LoraActs`'s pool): one buffer per distinct length among the
/// output widths and, with dropout, the input widths.
fn forward_lora_scratch(cfg: &ModelConfig, slots: &[LoraSlot], n: u128, act: u128) -> u128 {
    let Some(lora) = &cfg.lora else {
        return 0;
    };
    let ins = slots
        .iter()
        .filter(|_| lora.dropout > 0.0)
        .map(|s| s.in_dim);
    prod(&[
        act,
        n,
        distinct_sum(slots.iter().map(|s| s.width).chain(ins)),
    ])
}

/// The sum of the distinct values of `xs` (one pooled buffer per distinct width).
fn distinct_sum(xs: impl Iterator<Item = usize>) -> u128 {
    let mut v: Vec<usize> = xs.collect();
    v.sort_unstable();
    v.dedup();
    v.iter().map(|&x| x as u128).sum()
}

/// The backward's scratch (`GradScratch` without LoRA's) over `n` positions: dresidual, dln,
/// datty (3 C), dqkv, dfch (GPT-2 4C; Llama 2I) and Llama's dswiglu (I).
fn scratch_bytes(cfg: &ModelConfig, n: u128, w: &impl Fn(Role) -> u128) -> u128 {
    let (c, qkv, i) = (
        cfg.n_embd as u128,
        cfg.qkv_width() as u128,
        cfg.mlp_width() as u128,
    );
    let mlp = if cfg.llama().is_some() { 3 * i } else { i };
    prod(&[w(Role::Activation), n, sum(&[3 * c, qkv, mlp])])
}

/// Activation bytes of a `b x t` pass at recompute `level` (activations.rs `Activations` and
/// `GradScratch`), each role in `w(role)` bytes.
fn activation_bytes(
    cfg: &ModelConfig,
    b: usize,
    t: usize,
    level: u8,
    w: &impl Fn(Role) -> u128,
) -> u128 {
    if cfg.llama().is_some() {
        return llama_activation_bytes(cfg, b, t, level, w);
    }
    let n = b as u128 * t as u128; // < 2^128: two factors below 2^64
    let (c, l) = (cfg.n_embd as u128, cfg.n_layer as u128);
    let nh = cfg.n_head as u128;
    let (act, nc) = (w(Role::Activation), prod(&[n, c]));
    // Per block (`LayerActs`): ln1, atty, attproj, residual2, ln2, fcproj, residual3 (7 NC),
    // qkv (3 NC), fch and fch_gelu (8 NC): 18 NC; level 1 drops fch_gelu (4 NC), level 2 also
    // ln1 and ln2 (2 NC). Four [N] statistics; the attention's log-sum-exps [N NH] in fp32.
    let per_layer_nc = match level {
        0 => 18,
        1 => 14,
        _ => 12,
    };
    let per_layer = sum(&[
        prod(&[act, sum(&[prod(&[per_layer_nc, nc]), prod(&[4, n])])]),
        prod(&[w(Role::Stat), n, nh]),
    ]);
    // The buffers shared by every layer (`Shared`): the GELU output (4 NC) from level 1, a
    // layernorm output (NC) at level 2.
    let shared_nc = match level {
        0 => 0,
        1 => 4,
        _ => 5,
    };
    // encoded, lnf (2 NC), lnf statistics (2 N); losses [N] in fp32; the backward's
    // scratch (`GradScratch`: 3 NC + 3 NC + 4 NC). The logits are `logit_bytes`.
    let rest = sum(&[
        prod(&[act, sum(&[prod(&[12 + shared_nc, nc]), prod(&[2, n])])]),
        prod(&[w(Role::State), n]),
    ]);
    sum(&[prod(&[l, per_layer]), rest])
}

/// [`activation_bytes`] of the Llama family (model/llama/activations.rs `LlamaLayerActs`,
/// `Activations::new_llama`, and `GradScratch`).
fn llama_activation_bytes(
    cfg: &ModelConfig,
    b: usize,
    t: usize,
    level: u8,
    w: &impl Fn(Role) -> u128,
) -> u128 {
    let n = b as u128 * t as u128;
    let (c, l) = (cfg.n_embd as u128, cfg.n_layer as u128);
    let nh = cfg.n_head as u128;
    let (qkv, i) = (cfg.qkv_width() as u128, cfg.mlp_width() as u128);
    let (act, stat) = (w(Role::Activation), w(Role::Stat));
    // Per block: atty, attproj, residual2, down, residual3 (5 C), ln1 and ln2 (2 C, dropped
    // at level 2), qkv (qkv_width), gate_up (2 I), swiglu (I, dropped from level 1); in fp32
    // the two RMSNorm rstd [N] and the attention's log-sum-exps [N NH].
    let ln = if level >= 2 { 0 } else { 2 * c };
    let swiglu = if level >= 1 { 0 } else { i };
    let per_layer = sum(&[
        prod(&[act, n, sum(&[5 * c, ln, qkv, 2 * i, swiglu])]),
        prod(&[stat, n, 2 + nh]),
    ]);
    // Shared by every layer: the SwiGLU output (I) from level 1, an RMSNorm output (C) at
    // level 2. Around the blocks: encoded and lnf (2 C), lnf_mean [N] (unused by RMSNorm);
    // lnf_rstd [N] fp32, losses [N] fp32. The backward's scratch: dresidual, dln, datty
    // (3 C), dqkv (qkv_width), dgate_up (2 I), dswiglu (I). The logits are `logit_bytes`.
    let shared = sum(&[
        if level >= 1 { i } else { 0 },
        if level >= 2 { c } else { 0 },
    ]);
    let rest = sum(&[
        prod(&[act, n, sum(&[shared, 2 * c, 1, 3 * c, qkv, 3 * i])]),
        prod(&[stat, n]),
        prod(&[w(Role::State), n]),
    ]);
    sum(&[prod(&[l, per_layer]), rest])
}

/// Products and sums saturate: a plan past `u128::MAX` bytes is refused all the same.
fn prod(xs: &[u128]) -> u128 {
    xs.iter().fold(1, |a, &x| a.saturating_mul(x))
}

fn sum(xs: &[u128]) -> u128 {
    xs.iter().fold(0, |a, &x| a.saturating_add(x))
}

/// `bytes` in GiB with one decimal, or as bytes below 0.1 GiB.
pub(crate) fn gib(bytes: u128) -> String {
    let g = bytes as f64 / (1u64 << 30) as f64;
    if g >= 0.1 {
        format!("{g:.1} GiB")
    } else {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

#[cfg(test)]
#[path = "memory_tests.rs"]
mod tests;
