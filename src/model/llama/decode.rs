//! The Llama-family step of [`Gpt::extend`] (../decode.rs): the new tokens' embedding and
//! blocks, each block's queries and keys rotated at their absolute positions `past ..` and
//! its attention reading the grouped key/value cache
//! ([`Backend::attention_gqa_cached_forward`]); the last block's residual add is left in
//! `s.resid` (or, with one new token per row, fused with the final RMSNorm into `last.lnf`)
//! for the shared head step. The arithmetic per position is that of the training forward
//! (llama/forward.rs), so cached decoding gives the full forward's logits.

use super::super::decode::{LastPosition, StepActs, StepShape};
use super::super::lora::LoraPass;
use super::super::{Gpt, Result};
use crate::backend::Backend;

impl<B: Backend> Gpt<B> {
    /// The Llama-family part of [`Gpt::extend`]: everything up to the head.
    #[allow(clippy::too_many_arguments)]
    pub(in crate::model) fn llama_extend(
        &self,
        be: &B,
        s: &mut StepActs<B>,
        k: &mut [B::Buf],
        v: &mut [B::Buf],
        last: &mut LastPosition<B>,
        ids: &[i32],
        sh: StepShape,
    ) -> Result<()> {
        let d = self.llama_dims(sh.b, sh.tn);
        let (lay, p) = (&self.layout, &self.params);
        let (n, c, tmax) = (sh.n(), d.c, sh.tmax);
        let rope = self
            .rope
            .as_ref()
            .expect("a Llama-family model has its RoPE table");
        let gids = be.upload_ids(ids)?;
        be.embedding_forward(&mut s.resid, &gids, &p[lay.wte], sh.b, sh.tn, c)?;
        let w0 = &lay.llama_layers[0];
        be.rmsnorm_forward(&mut s.ln, &mut s.rstd, &s.resid, &p[w0.ln1_w], n, c, d.eps)?;
        let mut lora = self.step_adapters(s.lora.as_mut());
        for (l, w) in lay.llama_layers.iter().enumerate() {
            let bias = w.qkv_b.map(|i| &p[i]);
            be.matmul_forward(&mut s.qkv, &s.ln, &p[w.qkv_w], bias, n, c, d.qkv)?;
            LoraPass::forward(&mut lora, be, l, w.qkv_w, &s.ln, &mut s.qkv, n)?;
            be.rope_forward(
                &mut s.qkv, rope, None, sh.past, sh.b, sh.tn, d.nh, d.nkv, d.hs,
            )?;
            be.attention_gqa_cached_forward(
                &mut s.atty,
                &s.qkv,
                &mut k[l],
                &mut v[l],
                sh.b,
                sh.tn,
                sh.past,
                tmax,
                c,
                d.nh,
                d.nkv,
            )?;
            be.matmul_forward(&mut s.proj, &s.atty, &p[w.o_w], None, n, c, c)?;
            LoraPass::forward(&mut lora, be, l, w.o_w, &s.atty, &mut s.proj, n)?;
            be.residual_rmsnorm_forward(
                &mut s.resid2,
                &mut s.ln,
                &mut s.rstd,
                &s.resid,
                &s.proj,
                &p[w.ln2_w],
                n,
                c,
                d.eps,
            )?;
            be.matmul_forward(&mut s.fch, &s.ln, &p[w.gate_up_w], None, n, c, 2 * d.i)?;
            LoraPass::forward(&mut lora, be, l, w.gate_up_w, &s.ln, &mut s.fch, n)?;
            be.swiglu_forward(&mut s.fch_gelu, &s.fch, n, d.i)?;
            be.matmul_forward(&mut s.proj, &s.fch_gelu, &p[w.down_w], None, n, d.i, c)?;
            LoraPass::forward(&mut lora, be, l, w.down_w, &s.fch_gelu, &mut s.proj, n)?;
            // The residual add, fused with the next RMSNorm: the next block's input norm, or
            // the final norm when every new position goes to the head (Tn = 1).
            if let Some(nw) = lay.llama_layers.get(l + 1) {
                be.residual_rmsnorm_forward(
                    &mut s.resid,
                    &mut s.ln,
                    &mut s.rstd,
                    &s.resid2,
                    &s.proj,
                    &p[nw.ln1_w],
                    n,
                    c,
                    d.eps,
                )?;
            } else if sh.tn == 1 {
                be.residual_rmsnorm_forward(
                    &mut s.resid,
                    &mut last.lnf,
                    &mut last.rstd,
                    &s.resid2,
                    &s.proj,
                    &p[lay.lnf_w],
                    n,
                    c,
                    d.eps,
                )?;
            } else {
                be.residual_forward(&mut s.resid, &s.resid2, &s.proj, n * c)?;
            }
        }
        Ok(())
    }
}
