//! The backward pass: from the logits gradient left by the loss (the LM head, [`Gpt::backward`])
//! or from a gradient on the final hidden state ([`Gpt::backward_trunk`]) down to the embeddings.
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
use super::lora::{self, LoraPass};
use super::{Gpt, GradScratch, LayerIdx, ModelError, ParamLayout, Result};
use crate::backend::Backend;

impl<B: Backend> Gpt<B> {
    /// Accumulates parameter gradients, given that the last call was a loss pass with a
    /// gradient scale (the logits buffer then holds dlogits), with that pass's packing.
    pub(super) fn backward(&mut self, be: &B, inputs: &[i32], b: usize, t: usize) -> Result<()> {
        let (n, c, vp) = (b * t, self.cfg.n_embd, self.cfg.padded_vocab_size);
        self.ensure_scratch(be, n)?;
        let lay = &self.layout;
        let acts = self
            .acts
            .as_ref()
            .ok_or_else(|| ModelError::Invalid("backward before forward".into()))?;
        let s = self.scratch.as_mut().expect("allocated above");
        // Head: dlnf = dlogits @ head, dhead += dlogits^T @ lnf (head: the tied wte, or the
        // Llama family's untied lm_head).
        be.matmul_backward(
            &mut s.dln,
            self.grads[lay.head()].as_mut(),
            None,
            &acts.logits,
            &acts.lnf,
            &self.params[lay.head()],
            n,
            c,
            vp,
        )?;
        self.backward_trunk(be, inputs, b, t)
    }

    /// The gradient buckets in the order the backward pass reports them to the grad hook:
    /// each layer's, last to first, then the rest; trained tensors only (a LoRA model's
    /// layer buckets hold its adapters), empty buckets left out.
    pub fn grad_buckets(&self) -> Vec<Vec<usize>> {
        let lay = &self.layout;
        let n_layer = lay.layers.len() + lay.llama_layers.len();
        let mut buckets: Vec<Vec<usize>> = (0..n_layer)
            .rev()
            .map(|l| layer_grads(lay, &self.grads, l))
            .collect();
        buckets.push(rest_bucket(lay, &self.grads));
        buckets.retain(|b| !b.is_empty());
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
            lora: lora_acts,
            ..
        } = self
            .acts
            .as_mut()
            .ok_or_else(|| ModelError::Invalid("backward before forward".into()))?;
        let scratch = self
            .scratch
            .as_mut()
            .ok_or_else(|| ModelError::Invalid("backward_trunk before ensure_scratch".into()))?;
        let lora = lora::backward_pass(&self.cfg, lay, &self.params, lora_acts.as_mut());
        let mut pass = TrunkPass {
            be,
            p: &self.params,
            g: &mut self.grads,
            s: scratch,
            n: b * t,
            c: self.cfg.n_embd,
            lora,
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
            pass.mlp((l, w), a, gelu, ln2)?;
            if a.ln1.is_none() {
                let ln = shared.ln.as_mut().expect("allocated at recompute 2");
                let (mean, rstd) = (&mut a.ln1_mean, &mut a.ln1_rstd);
                let (lw, lb) = (&p[w.ln1_w], &p[w.ln1_b]);
                be.layernorm_forward(ln, mean, rstd, resid_in, lw, lb, n, c)?;
            }
            let ln1 = pick_ref::<B>(&a.ln1, &shared.ln);
            pass.attention((l, w), a, ln1, starts, b, t, self.cfg.n_head)?;
            pass.layernorm(w.ln1_w, w.ln1_b, resid_in, &a.ln1_mean, &a.ln1_rstd)?;
            tell(&mut self.grad_hook, be, pass.g, layer_grads(lay, pass.g, l))?;
        }
        let ids = be.upload_ids(inputs)?;
        let pos = self.packing.as_ref().map(|p| &p.positions);
        let (gte, gpe) = two_mut(
            pass.g,
            lay.wte,
            lay.wpe.expect("GPT-2 has position embeddings"),
        );
        // Frozen embeddings (a LoRA model's) have no gradient to scatter into.
        if let (Some(gte), Some(gpe)) = (gte, gpe) {
            be.encoder_backward(gte, gpe, &pass.s.dresidual, &ids, pos, b, t, pass.c)?;
        }
        tell(&mut self.grad_hook, be, pass.g, rest_bucket(lay, pass.g))?;
        Ok(())
    }
}

/// What the trunk's backward pass works on: the parameters, their gradients and the gradient
/// scratch, for `n` positions of width `c`.
struct TrunkPass<'a, B: Backend> {
    be: &'a B,
    p: &'a [B::Buf],
    g: &'a mut [Option<B::Buf>],
    s: &'a mut GradScratch<B>,
    n: usize,
    c: usize,
    /// The adapters, as the forward ran them (`None`: none, or switched off).
    lora: Option<LoraPass<'a, B>>,
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
            gw.as_mut(),
            gb.as_mut(),
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
    /// the GELU to dfch (unfused where a `down` adapter's input gradient must join first).
    /// `gelu` and `ln2` are the layer's GELU and ln_2 outputs (kept or recomputed).
    fn mlp(
        &mut self,
        (l, w): (usize, &LayerIdx),
        a: &LayerActs<B>,
        gelu: &B::Buf,
        ln2: &B::Buf,
    ) -> Result<()> {
        let (be, p, n, c) = (self.be, self.p, self.n, self.c);
        let (gw, gb) = two_mut(self.g, w.fc_proj_w, w.fc_proj_b);
        let GradScratch {
            dresidual,
            dln,
            dfch,
            lora: gl,
            dgelu,
            ..
        } = &mut *self.s;
        let (fc_proj, lora) = (&p[w.fc_proj_w], &mut self.lora);
        if LoraPass::has(lora, l, w.fc_proj_w) {
            let dgelu = dgelu.as_mut().expect("allocated with a down adapter");
            let (gw, gb) = (gw.as_mut(), gb.as_mut());
            be.matmul_backward(dgelu, gw, gb, dresidual, gelu, fc_proj, n, 4 * c, c)?;
            let gl = gl.as_mut();
            LoraPass::backward(
                lora,
                be,
                gl,
                self.g,
                l,
                w.fc_proj_w,
                gelu,
                dresidual,
                dgelu,
                n,
            )?;
            be.gelu_backward(dfch, &a.fch, dgelu, n * 4 * c)?;
        } else {
            let (gw, gb) = (gw.as_mut(), gb.as_mut());
            be.matmul_gelu_backward(dfch, gw, gb, dresidual, gelu, fc_proj, &a.fch, n, 4 * c, c)?;
        }
        let (gw, gb) = two_mut(self.g, w.fc_w, w.fc_b);
        let (gw, gb) = (gw.as_mut(), gb.as_mut());
        be.matmul_backward(dln, gw, gb, dfch, ln2, &p[w.fc_w], n, c, 4 * c)?;
        LoraPass::backward(lora, be, gl.as_mut(), self.g, l, w.fc_w, ln2, dfch, dln, n)?;
        self.layernorm(w.ln2_w, w.ln2_b, &a.residual2, &a.ln2_mean, &a.ln2_rstd)
    }

    /// The attention branch, residual2 = resid_in + attn_proj(attention(qkv(ln1(resid_in)))),
    /// down to `dln` (the gradient on ln1's output, `ln1`); `starts` is the packing's, if any.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &mut self,
        (l, w): (usize, &LayerIdx),
        a: &LayerActs<B>,
        ln1: &B::Buf,
        starts: Option<&B::Ids>,
        b: usize,
        t: usize,
        nh: usize,
    ) -> Result<()> {
        let (be, p, n, c) = (self.be, self.p, self.n, self.c);
        let GradScratch {
            dresidual,
            dln,
            datty,
            dqkv,
            lora: gl,
            ..
        } = &mut *self.s;
        let lora = &mut self.lora;
        let (gw, gb) = two_mut(self.g, w.attn_proj_w, w.attn_proj_b);
        let (gw, gb) = (gw.as_mut(), gb.as_mut());
        let proj = &p[w.attn_proj_w];
        be.matmul_backward(datty, gw, gb, dresidual, &a.atty, proj, n, c, c)?;
        let wi = w.attn_proj_w;
        LoraPass::backward(
            lora,
            be,
            gl.as_mut(),
            self.g,
            l,
            wi,
            &a.atty,
            dresidual,
            datty,
            n,
        )?;
        be.attention_backward(dqkv, datty, &a.qkv, &a.atty, &a.lse, starts, b, t, c, nh)?;
        let (gw, gb) = two_mut(self.g, w.qkv_w, w.qkv_b);
        let (gw, gb) = (gw.as_mut(), gb.as_mut());
        be.matmul_backward(dln, gw, gb, dqkv, ln1, &p[w.qkv_w], n, c, 3 * c)?;
        LoraPass::backward(lora, be, gl.as_mut(), self.g, l, w.qkv_w, ln1, dqkv, dln, n)?;
        Ok(())
    }
}

/// Tells the hook (if any) that `bucket` is final, unless it is empty (a frozen layer).
pub(super) fn tell<B: Backend>(
    hook: &mut Option<Box<dyn super::GradHook<B>>>,
    be: &B,
    g: &mut [Option<B::Buf>],
    bucket: Vec<usize>,
) -> Result<()> {
    match hook.as_mut() {
        Some(h) if !bucket.is_empty() => h.ready(be, g, &bucket),
        _ => Ok(()),
    }
}

/// Layer `l`'s trained tensors, one gradient bucket: its own (GPT-2 or Llama) and its
/// adapters' (a LoRA model's base is frozen, so there only the adapters).
pub(super) fn layer_grads<T>(lay: &ParamLayout, g: &[Option<T>], l: usize) -> Vec<usize> {
    let own = match lay.layers.get(l) {
        Some(w) => layer_bucket(w).to_vec(),
        None => super::llama::layer_bucket(&lay.llama_layers[l]),
    };
    let adapters = lay.lora.iter().filter(|s| s.layer == l);
    own.into_iter()
        .chain(adapters.flat_map(|s| [s.a, s.b]))
        .filter(|&i| g[i].is_some())
        .collect()
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

/// Every trained tensor outside the layers and their adapters: embeddings, final norm, any
/// head (a reward head included).
pub(super) fn rest_bucket<T>(lay: &ParamLayout, g: &[Option<T>]) -> Vec<usize> {
    let in_layers: Vec<usize> = lay
        .layers
        .iter()
        .flat_map(layer_bucket)
        .chain(lay.llama_layers.iter().flat_map(super::llama::layer_bucket))
        .chain(lay.lora.iter().flat_map(|s| [s.a, s.b]))
        .collect();
    (0..g.len())
        .filter(|&i| g[i].is_some() && !in_layers.contains(&i))
        .collect()
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
