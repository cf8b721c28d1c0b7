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
use super::super::backward::{layer_grads, rest_bucket, tell, two_mut};
use super::super::lora::{self, LoraPass};
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
            lora: lora_acts,
            ..
        } = self
            .acts
            .as_mut()
            .ok_or_else(|| ModelError::Invalid("backward before forward".into()))?;
        let s = self
            .scratch
            .as_mut()
            .ok_or_else(|| ModelError::Invalid("backward_trunk before ensure_scratch".into()))?;
        let lora = lora::backward_pass(&self.cfg, lay, &self.params, lora_acts.as_mut());
        let mut pass = Pass {
            be,
            p: &self.params,
            g: &mut self.grads,
            s,
            lora,
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
            pass.mlp((l, w), a, act, ln2)?;
            if a.ln1.is_none() {
                let ln = shared.ln.as_mut().expect("allocated at recompute 2");
                let (rstd, lw) = (&mut a.ln1_rstd, &p[w.ln1_w]);
                be.rmsnorm_forward(ln, rstd, resid_in, lw, n, c, d.eps)?;
            }
            let ln1 = pick_ref::<B>(&a.ln1, &shared.ln);
            pass.attention((l, w), a, ln1)?;
            pass.rmsnorm(w.ln1_w, resid_in, &a.ln1_rstd)?;
            tell(&mut self.grad_hook, be, pass.g, layer_grads(lay, pass.g, l))?;
        }
        // A frozen embedding (a LoRA model's) has no gradient to scatter into.
        if let Some(gte) = pass.g[lay.wte].as_mut() {
            let ids = be.upload_ids(inputs)?;
            be.embedding_backward(gte, &pass.s.dresidual, &ids, b, t, c)?;
        }
        tell(&mut self.grad_hook, be, pass.g, rest_bucket(lay, pass.g))?;
        Ok(())
    }
}

/// What the backward pass works on: parameters, gradients, scratch, RoPE table, packing.
struct Pass<'a, B: Backend> {
    be: &'a B,
    p: &'a [B::Buf],
    g: &'a mut [Option<B::Buf>],
    s: &'a mut GradScratch<B>,
    /// The adapters, as the forward ran them (`None`: none, or switched off).
    lora: Option<LoraPass<'a, B>>,
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
            self.g[w_idx].as_mut(),
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
    /// (kept or recomputed). Each projection's adapters follow its own backward.
    fn mlp(
        &mut self,
        (l, w): (usize, &LlamaLayerIdx),
        a: &LlamaLayerActs<B>,
        act: &B::Buf,
        ln2: &B::Buf,
    ) -> Result<()> {
        let (be, p, d) = (self.be, self.p, self.d);
        let (n, c, i) = (d.n(), d.c, d.i);
        let GradScratch {
            dresidual,
            dln,
            dfch,
            dswiglu,
            lora: gl,
            ..
        } = &mut *self.s;
        let (g, lora) = (&mut *self.g, &mut self.lora);
        let dswiglu = dswiglu.as_mut().expect("allocated for the Llama family");
        let (dw, wd) = (g[w.down_w].as_mut(), &p[w.down_w]);
        be.matmul_backward(dswiglu, dw, None, dresidual, act, wd, n, i, c)?;
        LoraPass::backward(
            lora,
            be,
            gl.as_mut(),
            g,
            l,
            w.down_w,
            act,
            dresidual,
            dswiglu,
            n,
        )?;
        be.swiglu_backward(dfch, dswiglu, &a.gate_up, n, i)?;
        let (dw, wgu) = (g[w.gate_up_w].as_mut(), &p[w.gate_up_w]);
        be.matmul_backward(dln, dw, None, dfch, ln2, wgu, n, c, 2 * i)?;
        LoraPass::backward(lora, be, gl.as_mut(), g, l, w.gate_up_w, ln2, dfch, dln, n)?;
        self.rmsnorm(w.ln2_w, &a.residual2, &a.ln2_rstd)
    }

    /// The attention branch, residual2 = x + o(attention(rope(qkv(ln1(x))))), down to `dln`
    /// (the gradient on the input norm's output `ln1`). The q/k/v adapters see the gradient
    /// before RoPE, where the forward added them.
    fn attention(
        &mut self,
        (l, w): (usize, &LlamaLayerIdx),
        a: &LlamaLayerActs<B>,
        ln1: &B::Buf,
    ) -> Result<()> {
        let (be, p, d) = (self.be, self.p, self.d);
        let (n, c) = (d.n(), d.c);
        let GradScratch {
            dresidual,
            dln,
            datty,
            dqkv,
            lora: gl,
            ..
        } = &mut *self.s;
        let (g, lora) = (&mut *self.g, &mut self.lora);
        let (dw, wo) = (g[w.o_w].as_mut(), &p[w.o_w]);
        be.matmul_backward(datty, dw, None, dresidual, &a.atty, wo, n, c, c)?;
        LoraPass::backward(
            lora,
            be,
            gl.as_mut(),
            g,
            l,
            w.o_w,
            &a.atty,
            dresidual,
            datty,
            n,
        )?;
        be.attention_gqa_backward(
            dqkv,
            datty,
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
        be.rope_backward(dqkv, self.rope, self.pos, d.b, d.t, d.nh, d.nkv, d.hs)?;
        let (gw, gb) = match w.qkv_b {
            Some(bi) => {
                let (gw, gb) = two_mut(g, w.qkv_w, bi);
                (gw.as_mut(), gb.as_mut())
            }
            None => (g[w.qkv_w].as_mut(), None),
        };
        be.matmul_backward(dln, gw, gb, dqkv, ln1, &p[w.qkv_w], n, c, d.qkv)?;
        LoraPass::backward(lora, be, gl.as_mut(), g, l, w.qkv_w, ln1, dqkv, dln, n)?;
        Ok(())
    }
}
