//! The Llama-family trunk backward: from `dln` (the gradient on the final RMSNorm's output,
//! left by the head or by `backward_hidden`) down to the token embedding.
//!
//! As in GPT-2's backward (../backward.rs), ops overwrite the activation gradients they
//! produce and accumulate into parameter gradients; `rmsnorm_backward` accumulates into the
//! residual-stream gradient `dresidual`, which alone is zeroed, once per pass. Per block:
//! down projection, SwiGLU, gate_up projection, post-attention norm, output projection,
//! grouped-query attention, RoPE (the transposed rotation of the query and key gradients),
//! the qkv projection (and its bias), the input norm. Under recompute the block first
//! recomputes its SwiGLU output (level 1) and norm outputs (level 2) with the forward's ops.

use super::super::activations::pick_ref;
use super::super::backward::two_mut;
use super::super::params::LlamaLayerIdx;
use super::super::{Activations, Gpt, GradScratch, ModelError, Result};
use super::forward::Dims;
use super::LlamaLayerActs;
use crate::backend::Backend;

/// A block's parameter indices: one gradient bucket.
pub(in crate::model) fn layer_bucket(w: &LlamaLayerIdx) -> Vec<usize> {
    let mut v = vec![w.ln1_w, w.qkv_w];
    v.extend(w.qkv_b);
    v.extend([w.o_w, w.ln2_w, w.gate_up_w, w.down_w]);
    v
}

impl<B: Backend> Gpt<B> {
    /// Accumulates parameter gradients from the final RMSNorm down to the embedding, given
    /// that the scratch `dln` holds d(loss)/d(lnf) for the last forward pass.
    pub(in crate::model) fn llama_backward_trunk(
        &mut self,
        be: &B,
        inputs: &[i32],
        b: usize,
        t: usize,
    ) -> Result<()> {
        let d = self.llama_dims(b, t);
        let (n, c) = (d.n(), d.c);
        let lay = &self.layout;
        let Activations {
            encoded,
            llama,
            shared,
            lnf_rstd,
            ..
        } = self
            .acts
            .as_mut()
            .ok_or_else(|| ModelError::Invalid("backward before forward".into()))?;
        let s = self
            .scratch
            .as_mut()
            .ok_or_else(|| ModelError::Invalid("backward_trunk before ensure_scratch".into()))?;
        let mut pass = Pass {
            be,
            p: &self.params,
            g: &mut self.grads,
            s,
            rope: self
                .rope
                .as_ref()
                .expect("a Llama-family model has its RoPE table"),
            pos: self.packing.as_ref().map(|p| &p.positions),
            starts: self.packing.as_ref().map(|p| &p.starts),
            d,
        };
        be.fill_zero(&mut pass.s.dresidual)?;
        let last = llama.last().expect("at least one layer");
        pass.rmsnorm(lay.lnf_w, &last.residual3, lnf_rstd)?;
        let p = pass.p;
        for l in (0..llama.len()).rev() {
            let w = &lay.llama_layers[l];
            let (before, rest) = llama.split_at_mut(l);
            let a = &mut rest[0];
            let resid_in = if l == 0 {
                &*encoded
            } else {
                &before[l - 1].residual3
            };
            if a.swiglu.is_none() {
                let act = shared.swiglu.as_mut().expect("allocated at recompute >= 1");
                be.swiglu_forward(act, &a.gate_up, n, d.i)?;
            }
            if a.ln2.is_none() {
                let ln = shared.ln.as_mut().expect("allocated at recompute 2");
                let (rstd, lw) = (&mut a.ln2_rstd, &p[w.ln2_w]);
                be.rmsnorm_forward(ln, rstd, &a.residual2, lw, n, c, d.eps)?;
            }
            let act = pick_ref::<B>(&a.swiglu, &shared.swiglu);
            let ln2 = pick_ref::<B>(&a.ln2, &shared.ln);
            pass.mlp(w, a, act, ln2)?;
            if a.ln1.is_none() {
                let ln = shared.ln.as_mut().expect("allocated at recompute 2");
                let (rstd, lw) = (&mut a.ln1_rstd, &p[w.ln1_w]);
                be.rmsnorm_forward(ln, rstd, resid_in, lw, n, c, d.eps)?;
            }
            let ln1 = pick_ref::<B>(&a.ln1, &shared.ln);
            pass.attention(w, a, ln1)?;
            pass.rmsnorm(w.ln1_w, resid_in, &a.ln1_rstd)?;
            if let Some(hook) = self.grad_hook.as_mut() {
                hook.ready(be, pass.g, &layer_bucket(w))?;
            }
        }
        let ids = be.upload_ids(inputs)?;
        be.embedding_backward(&mut pass.g[lay.wte], &pass.s.dresidual, &ids, b, t, c)?;
        if let Some(hook) = self.grad_hook.as_mut() {
            hook.ready(
                be,
                pass.g,
                &super::super::backward::rest_bucket(lay, pass.g.len()),
            )?;
        }
        Ok(())
    }
}

/// What the backward pass works on: parameters, gradients, scratch, RoPE table, packing.
struct Pass<'a, B: Backend> {
    be: &'a B,
    p: &'a [B::Buf],
    g: &'a mut [B::Buf],
    s: &'a mut GradScratch<B>,
    rope: &'a B::Buf,
    pos: Option<&'a B::Ids>,
    starts: Option<&'a B::Ids>,
    d: Dims,
}

impl<B: Backend> Pass<'_, B> {
    /// An RMSNorm (weight `w_idx`) whose input was `input`: from `dln` into the residual-stream
    /// gradient, which it accumulates into.
    fn rmsnorm(&mut self, w_idx: usize, input: &B::Buf, rstd: &B::Buf) -> Result<()> {
        let s = &mut *self.s;
        self.be.rmsnorm_backward(
            &mut s.dresidual,
            &mut self.g[w_idx],
            &s.dln,
            input,
            &self.p[w_idx],
            rstd,
            self.d.n(),
            self.d.c,
        )?;
        Ok(())
    }

    /// The MLP branch, residual3 = residual2 + down(swiglu(gate_up(ln2(residual2)))), down to
    /// the residual-stream gradient. `act` and `ln2` are the layer's SwiGLU and norm outputs
    /// (kept or recomputed).
    fn mlp(
        &mut self,
        w: &LlamaLayerIdx,
        a: &LlamaLayerActs<B>,
        act: &B::Buf,
        ln2: &B::Buf,
    ) -> Result<()> {
        let (be, p, d) = (self.be, self.p, self.d);
        let (n, c, i) = (d.n(), d.c, d.i);
        let s = &mut *self.s;
        let dswiglu = s.dswiglu.as_mut().expect("allocated for the Llama family");
        let dres = &s.dresidual;
        be.matmul_backward(
            dswiglu,
            &mut self.g[w.down_w],
            None,
            dres,
            act,
            &p[w.down_w],
            n,
            i,
            c,
        )?;
        be.swiglu_backward(&mut s.dfch, dswiglu, &a.gate_up, n, i)?;
        be.matmul_backward(
            &mut s.dln,
            &mut self.g[w.gate_up_w],
            None,
            &s.dfch,
            ln2,
            &p[w.gate_up_w],
            n,
            c,
            2 * i,
        )?;
        self.rmsnorm(w.ln2_w, &a.residual2, &a.ln2_rstd)
    }

    /// The attention branch, residual2 = x + o(attention(rope(qkv(ln1(x))))), down to `dln`
    /// (the gradient on the input norm's output `ln1`).
    fn attention(&mut self, w: &LlamaLayerIdx, a: &LlamaLayerActs<B>, ln1: &B::Buf) -> Result<()> {
        let (be, p, d) = (self.be, self.p, self.d);
        let (n, c) = (d.n(), d.c);
        let s = &mut *self.s;
        be.matmul_backward(
            &mut s.datty,
            &mut self.g[w.o_w],
            None,
            &s.dresidual,
            &a.atty,
            &p[w.o_w],
            n,
            c,
            c,
        )?;
        be.attention_gqa_backward(
            &mut s.dqkv,
            &s.datty,
            &a.qkv,
            &a.atty,
            &a.lse,
            self.starts,
            d.b,
            d.t,
            c,
            d.nh,
            d.nkv,
        )?;
        be.rope_backward(
            &mut s.dqkv,
            self.rope,
            self.pos,
            d.b,
            d.t,
            d.nh,
            d.nkv,
            d.hs,
        )?;
        let (gw, gb) = match w.qkv_b {
            Some(bi) => {
                let (gw, gb) = two_mut(self.g, w.qkv_w, bi);
                (gw, Some(gb))
            }
            None => (&mut self.g[w.qkv_w], None),
        };
        be.matmul_backward(&mut s.dln, gw, gb, &s.dqkv, ln1, &p[w.qkv_w], n, c, d.qkv)?;
        Ok(())
    }
}
