//! The buffers a Llama-family block keeps from the forward pass for the backward pass.
//!
//! Recompute (the same levels as GPT-2's): level 1 keeps no SwiGLU output per layer (the
//! backward recomputes it from the kept `gate_up` into [`Shared::swiglu`]), level 2 also no
//! RMSNorm output (recomputed from the kept residual stream into [`Shared::ln`]).

use super::super::activations::{Activations, Shared};
use crate::backend::{Backend, Result, Role};
use crate::config::ModelConfig;

/// What one Llama-family block saves (shapes for `N = B*T` rows).
pub struct LlamaLayerActs<B: Backend> {
    /// `[N*C]` input RMSNorm output (`None` at recompute 2) and its `rstd [N]` (fp32 `Stat`).
    pub ln1: Option<B::Buf>,
    pub ln1_rstd: B::Buf,
    /// `[N*qkv_width]` queries, keys and values, after RoPE.
    pub qkv: B::Buf,
    /// `[N*C]` attention output and `[B*NH*T]` row log-sum-exps (`Stat`).
    pub atty: B::Buf,
    pub lse: B::Buf,
    /// `[N*C]` output projection, and the residual stream after attention.
    pub attproj: B::Buf,
    pub residual2: B::Buf,
    /// `[N*C]` post-attention RMSNorm output (`None` at recompute 2) and its `rstd [N]`.
    pub ln2: Option<B::Buf>,
    pub ln2_rstd: B::Buf,
    /// `[N*2I]` gate | up projections, and `[N*I]` their SwiGLU (`None` at recompute >= 1).
    pub gate_up: B::Buf,
    pub swiglu: Option<B::Buf>,
    /// `[N*C]` down projection, and the residual stream after the block.
    pub down: B::Buf,
    pub residual3: B::Buf,
}

impl<B: Backend> LlamaLayerActs<B> {
    /// Elements of the block's `Activation`-role buffers (not the `Stat` ones).
    pub fn activation_elements(&self, be: &B) -> usize {
        let len = |x: &Option<B::Buf>| x.as_ref().map_or(0, |x| be.len(x));
        len(&self.ln1)
            + len(&self.ln2)
            + len(&self.swiglu)
            + [
                &self.qkv,
                &self.atty,
                &self.attproj,
                &self.residual2,
                &self.gate_up,
                &self.down,
                &self.residual3,
            ]
            .iter()
            .map(|x| be.len(x))
            .sum::<usize>()
    }
}

impl<B: Backend> Activations<B> {
    /// The buffers of a Llama-family `(b, t)` pass at `recompute` level 0, 1 or 2.
    pub(in crate::model) fn new_llama(
        be: &B,
        cfg: &ModelConfig,
        b: usize,
        t: usize,
        recompute: u8,
    ) -> Result<Self> {
        let (n, c, i) = (b * t, cfg.n_embd, cfg.mlp_width());
        let z = |len: usize| be.zeros(len, Role::Activation);
        let stat = |len: usize| be.zeros(len, Role::Stat);
        let kept = |level: u8, len: usize| -> Result<Option<B::Buf>> {
            (recompute < level).then(|| z(len)).transpose()
        };
        let shared = Shared {
            gelu: None,
            ln: (recompute >= 2).then(|| z(n * c)).transpose()?,
            swiglu: (recompute >= 1).then(|| z(n * i)).transpose()?,
        };
        let mut llama = Vec::with_capacity(cfg.n_layer);
        for _ in 0..cfg.n_layer {
            llama.push(LlamaLayerActs {
                ln1: kept(2, n * c)?,
                ln1_rstd: stat(n)?,
                qkv: z(n * cfg.qkv_width())?,
                atty: z(n * c)?,
                lse: stat(b * cfg.n_head * t)?,
                attproj: z(n * c)?,
                residual2: z(n * c)?,
                ln2: kept(2, n * c)?,
                ln2_rstd: stat(n)?,
                gate_up: z(n * 2 * i)?,
                swiglu: kept(1, n * i)?,
                down: z(n * c)?,
                residual3: z(n * c)?,
            });
        }
        Ok(Self {
            b,
            t,
            recompute,
            shared,
            encoded: z(n * c)?,
            layers: Vec::new(),
            llama,
            lnf: z(n * c)?,
            lnf_mean: z(n)?,
            lnf_rstd: stat(n)?,
            logits: z(n * cfg.padded_vocab_size)?,
            losses: be.zeros(n, Role::State)?,
            lora: super::super::activations::lora_acts(be, cfg, n)?,
        })
    }
}
