//! The memory plan: how many bytes a training run of one model shape and batch shape needs
//! (weights, gradients, optimizer moments, activations), checked against what the device has
//! before anything is allocated, so that a batch too large for the machine is a named error
//! rather than an allocator abort minutes later.
//!
//! All arithmetic is in `u128`: no batch or sequence length a user can type overflows it.

use crate::backend::Role;
use crate::config::ModelConfig;
use thiserror::Error;

/// The run does not fit: what it needs, by part, and what the device has.
#[derive(Debug, Error)]
#[error(
    "the run needs about {need} (weights, gradients and optimizer {fixed}; activations {acts} at \
     batch_size {b} x seq_len {t}) but {device} has {have} available; lower --batch-size (or \
     --seq-len), and use --total-batch-tokens to keep the tokens per step{hint}",
    need = gib(plan.total()),
    fixed = gib(plan.weights + plan.master + plan.grads + plan.moments),
    acts = gib(plan.activations),
    b = plan.batch_size,
    t = plan.seq_len,
    have = gib(*available),
    hint = if plan.recompute < 2 { "; or raise --recompute (1 or 2)" } else { "" },
)]
pub struct OutOfMemory {
    pub plan: MemoryPlan,
    pub device: String,
    pub available: u128,
}

/// What besides the shapes decides a plan: the activation recompute level and ZeRO-1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanOptions {
    /// 0 keeps every activation, 1 recomputes the GELU, 2 also the layernorms (`--recompute`).
    pub recompute: u8,
    /// 1: the AdamW moments and the fp32 master copy are sharded over `world_size` ranks.
    pub zero: u8,
    pub world_size: usize,
}

impl Default for PlanOptions {
    fn default() -> Self {
        Self {
            recompute: 0,
            zero: 0,
            world_size: 1,
        }
    }
}

/// Bytes one rank needs, by part (each `u128`, so never overflowing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryPlan {
    pub batch_size: usize,
    pub seq_len: usize,
    pub recompute: u8,
    pub zero: u8,
    pub world_size: usize,
    /// The parameters' working copy.
    pub weights: u128,
    /// The fp32 master copy where the working copy is narrower (CUDA's bf16), else 0; this
    /// rank's shard under ZeRO-1.
    pub master: u128,
    /// AdamW's two moments (this rank's shard under ZeRO-1).
    pub moments: u128,
    pub grads: u128,
    /// The forward pass's saved activations, the logits and the backward's scratch.
    pub activations: u128,
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
        let params = cfg.num_params() as u128;
        // Under ZeRO-1 each rank holds ceil(params / W) elements of the sharded state.
        let sharded = if opts.zero >= 1 {
            params.div_ceil(opts.world_size.max(1) as u128)
        } else {
            params
        };
        // A narrow working copy (CUDA's bf16) comes with an fp32 master copy (DESIGN.md).
        let master = if w(Role::Param) < 4 { 4 } else { 0 };
        Self {
            batch_size: b,
            seq_len: t,
            recompute: opts.recompute,
            zero: opts.zero,
            world_size: opts.world_size,
            weights: params * w(Role::Param),
            master: sharded * master,
            moments: 2 * sharded * w(Role::State),
            grads: params * w(Role::Grad),
            activations: activation_bytes(cfg, b, t, opts.recompute, &w),
        }
    }

    /// The same shape's activations alone (a model whose weights already live on the device).
    pub fn activations_only(self) -> Self {
        Self {
            weights: 0,
            master: 0,
            moments: 0,
            grads: 0,
            ..self
        }
    }

    pub fn total(&self) -> u128 {
        sum(&[
            self.weights,
            self.master,
            self.moments,
            self.grads,
            self.activations,
        ])
    }

    /// Refuses the plan when it needs more than `available` bytes (`None`: the device cannot
    /// tell, and only a plan past the address space is refused). `device` names it.
    pub fn check(&self, device: &str, available: Option<u64>) -> Result<(), Box<OutOfMemory>> {
        let available = available.map_or(usize::MAX as u128, u128::from);
        if self.total() <= available {
            return Ok(());
        }
        Err(Box::new(OutOfMemory {
            plan: *self,
            device: device.to_string(),
            available,
        }))
    }
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
    let (nh, vp) = (cfg.n_head as u128, cfg.padded_vocab_size as u128);
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
    // encoded, lnf (2 NC), lnf statistics (2 N), the logits (N VP); losses [N] in fp32;
    // the backward's scratch (`GradScratch`: 3 NC + 3 NC + 4 NC).
    let rest = sum(&[
        prod(&[
            act,
            sum(&[prod(&[12 + shared_nc, nc]), prod(&[2, n]), prod(&[n, vp])]),
        ]),
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
    let (nh, vp) = (cfg.n_head as u128, cfg.padded_vocab_size as u128);
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
    // level 2. Around the blocks: encoded and lnf (2 C), lnf_mean [N] (unused by RMSNorm),
    // the logits (VP); lnf_rstd [N] fp32, losses [N] fp32. The backward's scratch: dresidual,
    // dln, datty (3 C), dqkv (qkv_width), dgate_up (2 I), dswiglu (I).
    let shared = sum(&[
        if level >= 1 { i } else { 0 },
        if level >= 2 { c } else { 0 },
    ]);
    let rest = sum(&[
        prod(&[act, n, sum(&[shared, 2 * c, 1, vp, 3 * c, qkv, 3 * i])]),
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
fn gib(bytes: u128) -> String {
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
            assert_eq!(plan.activations, 4 * elems as u128, "level {level}");
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
            assert_eq!(plan.activations, want as u128, "level {level}");
            acts_at.push(plan.activations);
        }
        let (l, nc, ni) = (cfg.n_layer as u128, (n * c) as u128, (n * i) as u128);
        assert_eq!(acts_at[0] - acts_at[1], 4 * ni * (l - 1));
        assert_eq!(acts_at[1] - acts_at[2], 4 * (2 * nc * l - nc));
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
