//! The backward pass, from a gradient on the final hidden state ([`Gpt::backward_trunk`]) down
//! to the embeddings. The LM head's own backward runs with the loss (head.rs), which leaves
//! that gradient in the scratch `dln`; a reward head or any other leaves it there through
//! `backward_hidden` (hidden.rs).
//!
//! Backend backward ops overwrite the activation gradients they produce (no scratch buffer
//! needs zeroing) and accumulate into parameter gradients; layernorm's backward accumulates
//! into the residual-stream gradient `dresidual`, summing the two branches of every block, so
//! that buffer alone is zeroed, once per pass.
//!
//! Under activation recompute (activations.rs) each block first recomputes what its forward
//! did not keep into the shared buffers, as llm.c's train_gpt2.cu does: the GELU output from
//! the kept pre-activation (level 1), and ln_2 / ln_1 from the kept residual stream (level 2),
//! each with the op the forward used, so the gradients are the same bit for bit.

use super::activations::{pick_ref, Activations, LayerActs};
use super::{Gpt, GradScratch, LayerIdx, ModelError, Result};
use crate::backend::Backend;

impl<B: Backend> Gpt<B> {
    /// The gradient buckets in the order the backward pass reports them to the grad hook:
    /// each layer's, last to first, then the rest.
    pub fn grad_buckets(&self) -> Vec<Vec<usize>> {
        let lay = &self.layout;
        let mut buckets: Vec<Vec<usize>> = lay
            .layers
            .iter()
            .rev()
            .map(|w| layer_bucket(w).to_vec())
            .chain(
                lay.llama_layers
                    .iter()
                    .rev()
                    .map(super::llama::layer_bucket),
            )
            .collect();
        buckets.push(rest_bucket(lay, self.grads.len()));
        buckets
    }

    /// Allocates the gradient scratch for `n` positions on first use.
    pub(super) fn ensure_scratch(&mut self, be: &B, n: usize) -> Result<()> {
        if self.scratch.is_none() {
            self.scratch = Some(GradScratch::new(be, &self.cfg, n)?);
        }
        Ok(())
    }

    /// Accumulates parameter gradients from ln_f down to the embeddings, given that the
    /// scratch `dln` holds d(loss)/d(ln_f output) for the last forward pass (and its packing).
    pub(super) fn backward_trunk(
        &mut self,
        be: &B,
        inputs: &[i32],
        b: usize,
        t: usize,
    ) -> Result<()> {
        if self.cfg.llama().is_some() {
            return self.llama_backward_trunk(be, inputs, b, t);
        }
        let lay = &self.layout;
        let Activations {
            encoded,
            layers,
            shared,
            lnf_mean,
            lnf_rstd,
            ..
        } = self
            .acts
            .as_mut()
            .ok_or_else(|| ModelError::Invalid("backward before forward".into()))?;
        let scratch = self
            .scratch
            .as_mut()
            .ok_or_else(|| ModelError::Invalid("backward_trunk before ensure_scratch".into()))?;
        let mut pass = TrunkPass {
            be,
            p: &self.params,
            g: &mut self.grads,
            s: scratch,
            n: b * t,
            c: self.cfg.n_embd,
        };
        let last = layers.last().expect("at least one layer");
        pass.be.fill_zero(&mut pass.s.dresidual)?;
        pass.layernorm(
            lay.lnf_w,
            lay.lnf_b.expect("GPT-2 layernorms have biases"),
            &last.residual3,
            lnf_mean,
            lnf_rstd,
        )?;
        let starts = self.packing.as_ref().map(|p| &p.starts);
        let (n, c, p) = (pass.n, pass.c, pass.p);
        for l in (0..layers.len()).rev() {
            let w = &lay.layers[l];
            let (before, rest) = layers.split_at_mut(l);
            let a = &mut rest[0];
            let resid_in = if l == 0 {
                &*encoded
            } else {
                &before[l - 1].residual3
            };
            if a.fch_gelu.is_none() {
                let gelu = shared.gelu.as_mut().expect("allocated at recompute >= 1");
                be.gelu_forward(gelu, &a.fch, n * 4 * c)?;
            }
            if a.ln2.is_none() {
                let ln = shared.ln.as_mut().expect("allocated at recompute 2");
                let (mean, rstd) = (&mut a.ln2_mean, &mut a.ln2_rstd);
                let (lw, lb) = (&p[w.ln2_w], &p[w.ln2_b]);
                be.layernorm_forward(ln, mean, rstd, &a.residual2, lw, lb, n, c)?;
            }
            let gelu = pick_ref::<B>(&a.fch_gelu, &shared.gelu);
            let ln2 = pick_ref::<B>(&a.ln2, &shared.ln);
            pass.mlp(w, a, gelu, ln2)?;
            if a.ln1.is_none() {
                let ln = shared.ln.as_mut().expect("allocated at recompute 2");
                let (mean, rstd) = (&mut a.ln1_mean, &mut a.ln1_rstd);
                let (lw, lb) = (&p[w.ln1_w], &p[w.ln1_b]);
                be.layernorm_forward(ln, mean, rstd, resid_in, lw, lb, n, c)?;
            }
            let ln1 = pick_ref::<B>(&a.ln1, &shared.ln);
            pass.attention(w, a, ln1, starts, b, t, self.cfg.n_head)?;
            pass.layernorm(w.ln1_w, w.ln1_b, resid_in, &a.ln1_mean, &a.ln1_rstd)?;
            if let Some(hook) = self.grad_hook.as_mut() {
                hook.ready(be, pass.g, &layer_bucket(w))?;
            }
        }
        let ids = be.upload_ids(inputs)?;
        let pos = self.packing.as_ref().map(|p| &p.positions);
        let (gte, gpe) = two_mut(
            pass.g,
            lay.wte,
            lay.wpe.expect("GPT-2 has position embeddings"),
        );
        be.encoder_backward(gte, gpe, &pass.s.dresidual, &ids, pos, b, t, pass.c)?;
        if let Some(hook) = self.grad_hook.as_mut() {
            hook.ready(be, pass.g, &rest_bucket(lay, pass.g.len()))?;
        }
        Ok(())
    }
}

/// What the trunk's backward pass works on: the parameters, their gradients and the gradient
/// scratch, for `n` positions of width `c`.
struct TrunkPass<'a, B: Backend> {
    be: &'a B,
    p: &'a [B::Buf],
    g: &'a mut [B::Buf],
    s: &'a mut GradScratch<B>,
    n: usize,
    c: usize,
}

impl<B: Backend> TrunkPass<'_, B> {
    /// A layernorm (weights `w_idx`, `b_idx`) whose input was `input`: from `dln` into the
    /// residual-stream gradient, which it accumulates into.
    fn layernorm(
        &mut self,
        w_idx: usize,
        b_idx: usize,
        input: &B::Buf,
        mean: &B::Buf,
        rstd: &B::Buf,
    ) -> Result<()> {
        let (gw, gb) = two_mut(self.g, w_idx, b_idx);
        let s = &mut *self.s;
        self.be.layernorm_backward(
            &mut s.dresidual,
            gw,
            gb,
            &s.dln,
            input,
            &self.p[w_idx],
            mean,
            rstd,
            self.n,
            self.c,
        )?;
        Ok(())
    }

    /// The MLP branch, residual3 = residual2 + fc_proj(gelu(fc(ln2(residual2)))), down to the
    /// residual-stream gradient; the fc_proj backward carries its input gradient on through
    /// the GELU to dfch.
    /// `gelu` and `ln2` are the layer's GELU and ln_2 outputs (kept or recomputed).
    fn mlp(&mut self, w: &LayerIdx, a: &LayerActs<B>, gelu: &B::Buf, ln2: &B::Buf) -> Result<()> {
        let (be, p, n, c) = (self.be, self.p, self.n, self.c);
        let (gw, gb) = two_mut(self.g, w.fc_proj_w, w.fc_proj_b);
        let s = &mut *self.s;
        be.matmul_gelu_backward(
            &mut s.dfch,
            gw,
            Some(gb),
            &s.dresidual,
            gelu,
            &p[w.fc_proj_w],
            &a.fch,
            n,
            4 * c,
            c,
        )?;
        let (gw, gb) = two_mut(self.g, w.fc_w, w.fc_b);
        be.matmul_backward(
            &mut s.dln,
            gw,
            Some(gb),
            &s.dfch,
            ln2,
            &p[w.fc_w],
            n,
            c,
            4 * c,
        )?;
        self.layernorm(w.ln2_w, w.ln2_b, &a.residual2, &a.ln2_mean, &a.ln2_rstd)
    }

    /// The attention branch, residual2 = resid_in + attn_proj(attention(qkv(ln1(resid_in)))),
    /// down to `dln` (the gradient on ln1's output, `ln1`); `starts` is the packing's, if any.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &mut self,
        w: &LayerIdx,
        a: &LayerActs<B>,
        ln1: &B::Buf,
        starts: Option<&B::Ids>,
        b: usize,
        t: usize,
        nh: usize,
    ) -> Result<()> {
        let (be, p, n, c) = (self.be, self.p, self.n, self.c);
        let (gw, gb) = two_mut(self.g, w.attn_proj_w, w.attn_proj_b);
        let s = &mut *self.s;
        be.matmul_backward(
            &mut s.datty,
            gw,
            Some(gb),
            &s.dresidual,
            &a.atty,
            &p[w.attn_proj_w],
            n,
            c,
            c,
        )?;
        be.attention_backward(
            &mut s.dqkv,
            &s.datty,
            &a.qkv,
            &a.atty,
            &a.lse,
            starts,
            b,
            t,
            c,
            nh,
        )?;
        let (gw, gb) = two_mut(self.g, w.qkv_w, w.qkv_b);
        be.matmul_backward(
            &mut s.dln,
            gw,
            Some(gb),
            &s.dqkv,
            ln1,
            &p[w.qkv_w],
            n,
            c,
            3 * c,
        )?;
        Ok(())
    }
}

/// A layer's parameter indices: one gradient bucket.
fn layer_bucket(w: &LayerIdx) -> [usize; 12] {
    [
        w.ln1_w,
        w.ln1_b,
        w.qkv_w,
        w.qkv_b,
        w.attn_proj_w,
        w.attn_proj_b,
        w.ln2_w,
        w.ln2_b,
        w.fc_w,
        w.fc_b,
        w.fc_proj_w,
        w.fc_proj_b,
    ]
}

/// Every parameter index below `n` outside the layers: embeddings, final norm, any head.
pub(super) fn rest_bucket(lay: &super::ParamLayout, n: usize) -> Vec<usize> {
    let in_layers: Vec<usize> = lay
        .layers
        .iter()
        .flat_map(layer_bucket)
        .chain(lay.llama_layers.iter().flat_map(super::llama::layer_bucket))
        .collect();
    (0..n).filter(|i| !in_layers.contains(i)).collect()
}

/// Two distinct mutable elements of a slice (`i != j`).
pub(super) fn two_mut<T>(v: &mut [T], i: usize, j: usize) -> (&mut T, &mut T) {
    assert_ne!(i, j, "two_mut needs distinct indices");
    if i < j {
        let (lo, hi) = v.split_at_mut(j);
        (&mut lo[i], &mut hi[0])
    } else {
        let (lo, hi) = v.split_at_mut(i);
        (&mut hi[0], &mut lo[j])
    }
}
