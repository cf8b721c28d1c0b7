//! Activation buffers of one forward pass, kept for the backward pass, and the gradient
//! scratch buffers the backward pass reuses layer after layer.

use crate::backend::{Backend, Result, Role};
use crate::config::ModelConfig;

/// What one transformer block saves during the forward pass (shapes for `N = B*T` rows).
pub struct LayerActs<B: Backend> {
    /// `[N*C]` layernorm 1 output and its saved statistics `[N]`.
    pub ln1: B::Buf,
    pub ln1_mean: B::Buf,
    pub ln1_rstd: B::Buf,
    /// `[N*3C]` query, key and value.
    pub qkv: B::Buf,
    /// `[N*C]` attention output (heads concatenated) and `[B*NH*T]` row log-sum-exps.
    pub atty: B::Buf,
    pub lse: B::Buf,
    /// `[N*C]` attention projection output.
    pub attproj: B::Buf,
    /// `[N*C]` residual stream after attention.
    pub residual2: B::Buf,
    pub ln2: B::Buf,
    pub ln2_mean: B::Buf,
    pub ln2_rstd: B::Buf,
    /// `[N*4C]` MLP hidden pre-activation and its GELU.
    pub fch: B::Buf,
    pub fch_gelu: B::Buf,
    /// `[N*C]` MLP output and the residual stream after the block.
    pub fcproj: B::Buf,
    pub residual3: B::Buf,
}

/// All activations for one `(B, T)` shape.
pub struct Activations<B: Backend> {
    pub b: usize,
    pub t: usize,
    /// `[N*C]` token + position embedding (the residual stream entering block 0).
    pub encoded: B::Buf,
    pub layers: Vec<LayerActs<B>>,
    pub lnf: B::Buf,
    pub lnf_mean: B::Buf,
    pub lnf_rstd: B::Buf,
    /// `[N*VP]` logits; after a training forward, overwritten by their gradient.
    pub logits: B::Buf,
    /// `[N]` per-position loss (0 where the target is masked); fp32 on every backend (`State`),
    /// since stages sum it (sequence log-probabilities) and bf16 would round each term.
    pub losses: B::Buf,
}

/// Gradient scratch for the backward pass (one set, reused by every block).
pub struct GradScratch<B: Backend> {
    /// `[N*C]` gradient flowing along the residual stream.
    pub dresidual: B::Buf,
    pub dln: B::Buf,
    pub datty: B::Buf,
    pub dqkv: B::Buf,
    /// `[N*4C]` gradient on the GELU's input (`matmul_gelu_backward` goes straight there
    /// from the fc_proj output gradient).
    pub dfch: B::Buf,
}

impl<B: Backend> Activations<B> {
    pub fn new(be: &B, cfg: &ModelConfig, b: usize, t: usize) -> Result<Self> {
        let (n, c) = (b * t, cfg.n_embd);
        let z = |len: usize| be.zeros(len, Role::Activation);
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for _ in 0..cfg.n_layer {
            layers.push(LayerActs {
                ln1: z(n * c)?,
                ln1_mean: z(n)?,
                ln1_rstd: z(n)?,
                qkv: z(n * 3 * c)?,
                atty: z(n * c)?,
                lse: be.zeros(b * cfg.n_head * t, Role::Stat)?,
                attproj: z(n * c)?,
                residual2: z(n * c)?,
                ln2: z(n * c)?,
                ln2_mean: z(n)?,
                ln2_rstd: z(n)?,
                fch: z(n * 4 * c)?,
                fch_gelu: z(n * 4 * c)?,
                fcproj: z(n * c)?,
                residual3: z(n * c)?,
            });
        }
        Ok(Self {
            b,
            t,
            encoded: z(n * c)?,
            layers,
            lnf: z(n * c)?,
            lnf_mean: z(n)?,
            lnf_rstd: z(n)?,
            logits: z(n * cfg.padded_vocab_size)?,
            losses: be.zeros(n, Role::State)?,
        })
    }
}

impl<B: Backend> GradScratch<B> {
    pub fn new(be: &B, cfg: &ModelConfig, n: usize) -> Result<Self> {
        let c = cfg.n_embd;
        let z = |len: usize| be.zeros(len, Role::Activation);
        Ok(Self {
            dresidual: z(n * c)?,
            dln: z(n * c)?,
            datty: z(n * c)?,
            dqkv: z(n * 3 * c)?,
            dfch: z(n * 4 * c)?,
        })
    }
}
