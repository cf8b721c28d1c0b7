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
     --seq-len), and use --total-batch-tokens to keep the tokens per step",
    need = gib(plan.total()),
    fixed = gib(plan.weights + plan.grads + plan.optimizer),
    acts = gib(plan.activations),
    b = plan.batch_size,
    t = plan.seq_len,
    have = gib(*available)
)]
pub struct OutOfMemory {
    pub plan: MemoryPlan,
    pub device: String,
    pub available: u128,
}

/// Bytes a run needs, by part (each `u128`, so never overflowing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryPlan {
    pub batch_size: usize,
    pub seq_len: usize,
    /// Parameters (and, where the working copy is narrower than f32, the fp32 master copy).
    pub weights: u128,
    pub grads: u128,
    /// AdamW's two moments.
    pub optimizer: u128,
    /// The forward pass's saved activations, the logits and the backward's scratch.
    pub activations: u128,
}

impl MemoryPlan {
    /// The plan of training `cfg` on micro-batches of `b` rows of `t` tokens, on a backend
    /// storing an element of each role in `bytes(role)` bytes (`Backend::element_bytes`).
    pub fn training(cfg: &ModelConfig, b: usize, t: usize, bytes: impl Fn(Role) -> usize) -> Self {
        let w = |role: Role| bytes(role) as u128;
        let params = cfg.num_params() as u128;
        // A narrow working copy (CUDA's bf16) comes with an fp32 master copy (DESIGN.md).
        let master = if w(Role::Param) < 4 { 4 } else { 0 };
        let n = b as u128 * t as u128; // < 2^128: two factors below 2^64
        let (c, l) = (cfg.n_embd as u128, cfg.n_layer as u128);
        let (nh, vp) = (cfg.n_head as u128, cfg.padded_vocab_size as u128);
        let (act, nc) = (w(Role::Activation), prod(&[n, c]));
        // Per block (activations.rs `LayerActs`): ln1, atty, attproj, residual2, ln2, fcproj,
        // residual3 (7 NC), qkv (3 NC), fch and fch_gelu (8 NC); four [N] statistics; the
        // attention's log-sum-exps [N NH] in fp32.
        let per_layer = sum(&[
            prod(&[act, sum(&[prod(&[18, nc]), prod(&[4, n])])]),
            prod(&[w(Role::Stat), n, nh]),
        ]);
        // encoded, lnf (2 NC), lnf statistics (2 N), the logits (N VP); losses [N] in fp32;
        // the backward's scratch (`GradScratch`: 3 NC + 3 NC + 4 NC).
        let rest = sum(&[
            prod(&[act, sum(&[prod(&[12, nc]), prod(&[2, n]), prod(&[n, vp])])]),
            prod(&[w(Role::State), n]),
        ]);
        Self {
            batch_size: b,
            seq_len: t,
            weights: params * (w(Role::Param) + master),
            grads: params * w(Role::Grad),
            optimizer: 2 * params * w(Role::State),
            activations: sum(&[prod(&[l, per_layer]), rest]),
        }
    }

    /// The same shape's activations alone (a model whose weights already live on the device).
    pub fn activations_only(self) -> Self {
        Self {
            weights: 0,
            grads: 0,
            optimizer: 0,
            ..self
        }
    }

    pub fn total(&self) -> u128 {
        sum(&[self.weights, self.grads, self.optimizer, self.activations])
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
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::backend::Backend;
    use crate::model::Activations;

    fn cpu_bytes(_: Role) -> usize {
        4
    }

    /// The plan's activation count is the one `Activations::new` allocates (plus the scratch).
    #[test]
    fn activations_match_the_allocation() {
        let cfg = ModelConfig::preset("tiny", 300).unwrap();
        let be = CpuBackend::new();
        let (b, t) = (3, 17);
        let acts = Activations::new(&be, &cfg, b, t).unwrap();
        let mut elems = be.len(&acts.encoded)
            + be.len(&acts.lnf)
            + be.len(&acts.lnf_mean)
            + be.len(&acts.lnf_rstd)
            + be.len(&acts.logits)
            + be.len(&acts.losses);
        for l in &acts.layers {
            elems += [
                &l.ln1,
                &l.ln1_mean,
                &l.ln1_rstd,
                &l.qkv,
                &l.atty,
                &l.lse,
                &l.attproj,
                &l.residual2,
                &l.ln2,
                &l.ln2_mean,
                &l.ln2_rstd,
                &l.fch,
                &l.fch_gelu,
                &l.fcproj,
                &l.residual3,
            ]
            .iter()
            .map(|x| be.len(x))
            .sum::<usize>();
        }
        let scratch = 10 * b * t * cfg.n_embd;
        let plan = MemoryPlan::training(&cfg, b, t, cpu_bytes);
        assert_eq!(plan.activations, 4 * (elems + scratch) as u128);
        assert_eq!(plan.weights, 4 * cfg.num_params() as u128);
        assert_eq!(plan.optimizer, 2 * plan.grads);
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
