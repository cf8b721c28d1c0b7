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
mod tests {
    use super::PlanOptions;
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::backend::Backend;
    use crate::model::Activations;

    fn cpu_bytes(_: Role) -> usize {
        4
    }

    /// The plan's activation count is the one `Activations::new` allocates (plus the scratch)
    /// at every recompute level, and each level saves what the plan says.
    #[test]
    fn activations_match_the_allocation() {
        let cfg = ModelConfig::preset("tiny", 300).unwrap();
        let be = CpuBackend::new();
        let (b, t) = (3, 17);
        let (n, c) = (b * t, cfg.n_embd);
        let mut bytes = Vec::new();
        for level in 0..=2 {
            let acts = Activations::new(&be, &cfg, b, t, level).unwrap();
            let stats =
                be.len(&acts.losses) + acts.layers.iter().map(|l| be.len(&l.lse)).sum::<usize>();
            let scratch = 10 * n * c;
            let elems = acts.activation_elements(&be) + stats + scratch;
            let opts = PlanOptions {
                recompute: level,
                ..PlanOptions::default()
            };
            let plan = MemoryPlan::training_with(&cfg, b, t, opts, cpu_bytes);
            // At this size one logit chunk holds every row: the logits are N x VP.
            assert_eq!(plan.logits, 4 * (n * cfg.padded_vocab_size) as u128);
            assert_eq!(
                plan.activations + plan.logits,
                4 * elems as u128,
                "level {level}"
            );
            assert_eq!(plan.activations_at[level as usize], plan.activations);
            bytes.push(plan.activations);
        }
        // Level 1: 4 NC per layer, less one shared 4 NC; level 2: 2 NC more, less a shared NC.
        let (l, nc) = (cfg.n_layer as u128, (n * c) as u128);
        assert_eq!(bytes[0] - bytes[1], 4 * (4 * nc * (l - 1)));
        assert_eq!(bytes[1] - bytes[2], 4 * (2 * nc * l - nc));
        let plan = MemoryPlan::training(&cfg, b, t, cpu_bytes);
        assert_eq!(plan.weights, 4 * cfg.num_params() as u128);
        assert_eq!(plan.moments, 2 * plan.grads);
        assert_eq!(plan.master, 0);
    }

    /// The same for the Llama family (grouped KV heads, untied head, q/k/v biases), with the
    /// fp32 statistics by role: each level drops what it says.
    #[test]
    fn llama_activations_match_the_allocation() {
        use crate::config::{Family, LlamaShape};
        let mut cfg = ModelConfig::preset("llama-tiny", 300).unwrap();
        cfg.family = Family::Llama(LlamaShape {
            qkv_bias: true,
            ..LlamaShape::new(2, 96)
        });
        let be = CpuBackend::new();
        let (b, t) = (3, 17);
        let (n, c, i) = (b * t, cfg.n_embd, 96);
        let stat_bytes = |r: Role| if r == Role::Stat { 8 } else { 4 };
        let mut acts_at = Vec::new();
        for level in 0..=2 {
            let acts = Activations::new(&be, &cfg, b, t, level).unwrap();
            let stats: usize = acts
                .llama
                .iter()
                .map(|l| be.len(&l.lse) + be.len(&l.ln1_rstd) + be.len(&l.ln2_rstd))
                .sum::<usize>()
                + be.len(&acts.lnf_rstd);
            let scratch = 3 * n * c + n * cfg.qkv_width() + 3 * n * i;
            let elems = acts.activation_elements(&be) + scratch;
            let opts = PlanOptions {
                recompute: level,
                ..PlanOptions::default()
            };
            let plan = MemoryPlan::training_with(&cfg, b, t, opts, stat_bytes);
            let want = 4 * (elems + be.len(&acts.losses)) + 8 * stats;
            assert_eq!(
                plan.activations + plan.logits,
                want as u128,
                "level {level}"
            );
            acts_at.push(plan.activations);
        }
        let (l, nc, ni) = (cfg.n_layer as u128, (n * c) as u128, (n * i) as u128);
        assert_eq!(acts_at[0] - acts_at[1], 4 * ni * (l - 1));
        assert_eq!(acts_at[1] - acts_at[2], 4 * (2 * nc * l - nc));
    }

    fn cuda_bytes(r: Role) -> usize {
        match r {
            Role::Param | Role::Activation => 2,
            _ => 4,
        }
    }

    fn with_lora(mut cfg: ModelConfig, rank: usize, targets: &str) -> ModelConfig {
        let targets = crate::config::LoraTarget::parse_list(targets, &cfg).unwrap();
        cfg.lora = Some(crate::config::LoraConfig {
            rank,
            alpha: 8.0,
            dropout: 0.1,
            targets,
        });
        cfg.validate().unwrap();
        cfg
    }

    /// A Llama model with adapters on q, v and down, rank 4, by hand: per layer q adds
    /// `4 x 128 + 128 x 4`, v (two KV heads of 32) `4 x 128 + 64 x 4`, down `4 x 384 + 128 x 4`;
    /// the base is frozen (one bf16 copy), and master, moments and gradients count the
    /// adapters alone. LoRA's activations: `N x 4` kept per adapter; the forward's scratch one
    /// buffer per distinct width among the outputs (128, 64) and, with dropout, the inputs
    /// (128, 384): `N x 576`; the backward's `du` (`N x 4`) and `dxl` per distinct input
    /// (`N x (128 + 384)`).
    #[test]
    fn lora_rows_by_hand_llama() {
        let base = ModelConfig::preset("llama-tiny", 300).unwrap();
        let cfg = with_lora(base.clone(), 4, "q,v,down");
        let (b, t) = (3usize, 17usize);
        let n = (b * t) as u128;
        let p = MemoryPlan::training_with(&cfg, b, t, PlanOptions::default(), cuda_bytes);
        let full = MemoryPlan::training_with(&base, b, t, PlanOptions::default(), cuda_bytes);
        let per_layer = (4 * 128 + 128 * 4) + (4 * 128 + 64 * 4) + (4 * 384 + 128 * 4);
        assert_eq!(per_layer, 3840);
        let trained = 4 * per_layer as u128;
        let base_params = base.num_params() as u128;
        assert_eq!(
            (p.trainable_params, p.frozen_params),
            (trained, base_params)
        );
        assert_eq!(p.frozen, 2 * base_params);
        assert_eq!(p.weights, 2 * trained);
        assert_eq!(p.master, 4 * trained);
        assert_eq!(p.moments, 8 * trained);
        assert_eq!(p.grads, 4 * trained);
        assert_eq!(p.lora_kept, 2 * (4 * 3) * n * 4);
        assert_eq!(p.lora_scratch, 2 * n * ((64 + 128 + 384) + (4 + 128 + 384)));
        // The base's activations and logits are the full model's.
        assert_eq!(p.activations_at, full.activations_at);
        assert_eq!(p.logits, full.logits);
        assert_eq!(
            p.total(),
            p.fixed() + p.activations + p.logits + p.lora_kept + p.lora_scratch
        );
        // A full fine-tune freezes nothing and has no LoRA rows.
        assert_eq!((full.frozen, full.frozen_params), (0, 0));
        assert_eq!((full.lora_kept, full.lora_scratch), (0, 0));
        assert_eq!(full.grads, 4 * base_params);
    }

    /// GPT-2's fused `c_attn` is one adapter of width 3C; `c_fc`'s input is C, `c_proj`'s 4C.
    /// With f32 storage (the CPU) there is no master copy, and the frozen base still has no
    /// gradients or moments. LoRA's scratch: the forward's distinct widths {C, 3C, 4C} (inputs
    /// C and 4C among them), the backward's `du`, `dxl` per distinct input {C, 4C}, and the
    /// `down` adapter's GELU output gradient (4C).
    #[test]
    fn lora_rows_by_hand_gpt2() {
        let base = ModelConfig::preset("tiny", 300).unwrap();
        let cfg = with_lora(base.clone(), 8, "all");
        let c = 128u128;
        let (b, t) = (2usize, 9usize);
        let n = (b * t) as u128;
        let p = MemoryPlan::training(&cfg, b, t, cpu_bytes);
        // qkv (C -> 3C), o (C -> C), up (C -> 4C), down (4C -> C): A r x in, B width x r.
        let per_layer = 8 * (c + 3 * c) + 8 * (c + c) + 8 * (c + 4 * c) + 8 * (4 * c + c);
        let trained = 4 * per_layer;
        assert_eq!(p.trainable_params, trained);
        assert_eq!(p.frozen, 4 * base.num_params() as u128);
        assert_eq!((p.weights, p.master), (4 * trained, 0));
        assert_eq!((p.grads, p.moments), (4 * trained, 8 * trained));
        assert_eq!(p.lora_kept, 4 * (4 * 4) * n * 8);
        assert_eq!(
            p.lora_scratch,
            4 * n * ((c + 3 * c + 4 * c) + (8 + c + 4 * c) + 4 * c)
        );
    }

    /// The logits buffer is one chunk of the chunked classifier: all rows while they fit in
    /// `LOGIT_CHUNK_ELEMENTS`, then as many rows as fit, with the chunk's staging (its rows of
    /// `lnf` and `dlnf`, and its fp32 losses).
    #[test]
    fn logits_are_one_chunk() {
        let cfg = ModelConfig::preset("llama-3.2-1b", 128256).unwrap();
        let vp = cfg.padded_vocab_size as u128;
        let small = MemoryPlan::training(&cfg, 1, 64, cuda_bytes);
        assert_eq!(small.logits, 2 * 64 * vp);
        let big = MemoryPlan::training(&cfg, 8, 2048, cuda_bytes);
        let rows = (crate::model::head::LOGIT_CHUNK_ELEMENTS as u128) / vp;
        assert!(rows < 8 * 2048);
        let n = 8 * 2048u128;
        let rows = n.div_ceil(n.div_ceil(rows)); // balanced chunks
        let staging = crate::model::head::logit_staging_elements(8 * 2048, 2048, vp as usize);
        assert_eq!(staging as u128, 2 * rows * 2048);
        assert_eq!(big.logits, 2 * rows * vp + 2 * staging as u128 + 4 * rows);
    }

    /// Every buffer a training pass allocates, counted from the model after a
    /// forward_backward on the CPU (4 bytes each): the activations (logits, a chunked head's
    /// staging and LoRA's included), the fp32 statistics and losses, and the backward's scratch.
    fn allocated_bytes(m: &crate::model::Gpt<CpuBackend>, be: &CpuBackend) -> u128 {
        let acts = m.acts.as_ref().expect("a pass ran");
        let mut stats = be.len(&acts.losses)
            + acts.layers.iter().map(|l| be.len(&l.lse)).sum::<usize>()
            + acts.head.stage.as_ref().map_or(0, |s| be.len(&s.losses));
        for l in &acts.llama {
            stats += be.len(&l.lse) + be.len(&l.ln1_rstd) + be.len(&l.ln2_rstd);
        }
        if !acts.llama.is_empty() {
            stats += be.len(&acts.lnf_rstd);
        }
        let elems = m.activation_elements(be).unwrap() + m.scratch_elements(be).unwrap() + stats;
        4 * elems as u128
    }

    /// The plan's activation bytes are what the model allocates, for both families, with and
    /// without LoRA (targets with shared and distinct widths, with and without dropout), the
    /// head in one chunk or several, at every recompute level.
    #[test]
    fn plan_equals_the_allocation_after_a_training_pass() {
        use crate::model::Gpt;
        use crate::rng::Rng;
        let gpt2 = ModelConfig::preset("tiny", 300).unwrap();
        let llama = ModelConfig::preset("llama-tiny", 300).unwrap();
        let lora = |cfg: &ModelConfig, targets: &str, dropout: f32| {
            let mut cfg = with_lora(cfg.clone(), 4, targets);
            cfg.lora.as_mut().unwrap().dropout = dropout;
            cfg
        };
        let cfgs = [
            gpt2.clone(),
            lora(&gpt2, "all", 0.1),
            lora(&gpt2, "q,k,v,o", 0.0),
            lora(&gpt2, "down", 0.0),
            llama.clone(),
            lora(&llama, "all", 0.0),
            lora(&llama, "q,v,down", 0.1),
        ];
        let be = CpuBackend::new();
        let (b, t) = (3, 9);
        let mut rng = Rng::new(15);
        let mut tokens = || -> Vec<i32> { (0..b * t).map(|_| rng.below(300) as i32).collect() };
        for cfg in &cfgs {
            for level in 0..=2u8 {
                for rows in [None, Some(7)] {
                    let mut m = Gpt::init(&be, cfg, 7).unwrap();
                    m.set_recompute(level).unwrap();
                    m.set_logit_chunk_rows(rows).unwrap();
                    let (x, y) = (tokens(), tokens());
                    m.forward_backward(&be, &x, &y, b, t, 1.0).unwrap();
                    let opts = PlanOptions {
                        recompute: level,
                        logit_rows: rows,
                        ..PlanOptions::default()
                    };
                    let plan = MemoryPlan::training_with(cfg, b, t, opts, cpu_bytes);
                    let what = format!(
                        "{} lora {:?} recompute {level} rows {rows:?}",
                        cfg.family_name(),
                        cfg.lora
                    );
                    assert_eq!(plan.activation_total(), allocated_bytes(&m, &be), "{what}");
                }
            }
        }
    }

    /// RL's held models: a frozen working copy and a forward pass's buffers (no scratch, no
    /// gradients), counted against a model frozen and run forward on the CPU.
    #[test]
    fn a_held_model_is_its_weights_and_forward_buffers() {
        use crate::model::Gpt;
        let be = CpuBackend::new();
        let (b, t) = (2, 11);
        for cfg in [
            ModelConfig::preset("tiny", 300).unwrap(),
            ModelConfig::preset("llama-tiny", 300).unwrap(),
        ] {
            let mut m = Gpt::init(&be, &cfg, 3).unwrap();
            m.freeze(&be).unwrap();
            assert!(m.grads.iter().all(Option::is_none));
            let ids: Vec<i32> = (0..b * t).map(|i| (i * 37 % 300) as i32).collect();
            m.token_logps(&be, &ids, &ids, b, t).unwrap();
            assert_eq!(
                m.scratch_elements(&be),
                None,
                "a forward pass allocates no scratch"
            );
            let acts = m.acts.as_ref().unwrap();
            let mut stats =
                be.len(&acts.losses) + acts.layers.iter().map(|l| be.len(&l.lse)).sum::<usize>();
            for l in &acts.llama {
                stats += be.len(&l.lse) + be.len(&l.ln1_rstd) + be.len(&l.ln2_rstd);
            }
            if !acts.llama.is_empty() {
                stats += be.len(&acts.lnf_rstd);
            }
            let elems = m.activation_elements(&be).unwrap() + stats;
            let weights = 4 * cfg.num_params() as u128;
            assert_eq!(
                MemoryPlan::held_model(&cfg, b, t, cpu_bytes),
                weights + 4 * elems as u128
            );
        }
    }

    /// A batch no machine holds is refused with the sizes named, without overflowing.
    #[test]
    fn a_huge_batch_is_refused() {
        let cfg = ModelConfig::preset("gpt2-124m", 50257).unwrap();
        let plan = MemoryPlan::training(&cfg, usize::MAX, usize::MAX, cpu_bytes);
        assert!(plan.check("cpu", None).is_err());
        let plan = MemoryPlan::training(&cfg, 100_000_000, 256, cpu_bytes);
        let e = plan.check("cpu", Some(16 << 30)).unwrap_err().to_string();
        assert!(
            e.contains("batch_size 100000000 x seq_len 256")
                && e.contains("cpu has 16.0 GiB available")
                && e.contains("lower --batch-size"),
            "{e}"
        );
        MemoryPlan::training(&cfg, 4, 64, cpu_bytes)
            .check("cpu", Some(16 << 30))
            .unwrap();
    }
}
