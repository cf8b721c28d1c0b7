//! The Llama-family trunk forward: token embedding, the blocks, the final RMSNorm into `lnf`.
//! Each residual add is fused with the RMSNorm that follows it (`residual_rmsnorm_forward`),
//! as GPT-2 fuses its residual adds with layernorm.

use super::super::activations::{pick, Activations, Shared};
use super::super::lora::{self, LoraPass};
use super::super::params::LlamaLayerIdx;
use super::super::{Gpt, Result};
use super::LlamaLayerActs;
use crate::backend::Backend;

/// The shape a Llama-family pass runs at.
#[derive(Clone, Copy)]
pub(in crate::model) struct Dims {
    pub b: usize,
    pub t: usize,
    pub c: usize,
    pub nh: usize,
    pub nkv: usize,
    pub hs: usize,
    /// MLP width (SwiGLU hidden size).
    pub i: usize,
    pub qkv: usize,
    pub eps: f32,
}

impl Dims {
    pub fn n(&self) -> usize {
        self.b * self.t
    }
}

impl<B: Backend> Gpt<B> {
    /// The Llama-family shape of a `b x t` pass.
    pub(in crate::model) fn llama_dims(&self, b: usize, t: usize) -> Dims {
        let cfg = &self.cfg;
        let shape = cfg.llama().expect("a Llama-family model");
        Dims {
            b,
            t,
            c: cfg.n_embd,
            nh: cfg.n_head,
            nkv: shape.n_kv_head,
            hs: cfg.head_size(),
            i: shape.intermediate_size,
            qkv: cfg.qkv_width(),
            eps: shape.rms_eps as f32,
        }
    }

    /// The trunk on `ids` (uploaded) up to the final RMSNorm's output `acts.lnf`, with the
    /// packing of the last `forward_hidden_with` (positions to RoPE, starts to attention).
    pub(in crate::model) fn llama_forward_trunk(
        &mut self,
        be: &B,
        ids: &B::Ids,
        b: usize,
        t: usize,
    ) -> Result<()> {
        let d = self.llama_dims(b, t);
        let (n, c) = (d.n(), d.c);
        let pos = self.packing.as_ref().map(|p| &p.positions);
        let starts = self.packing.as_ref().map(|p| &p.starts);
        let rope = self
            .rope
            .as_ref()
            .expect("a Llama-family model has its RoPE table");
        let (lay, p) = (&self.layout, &self.params);
        let acts = self.acts.as_mut().expect("allocated by ensure_acts");
        let switch = self.lora_switch;
        let mut lora = lora::forward_pass(&self.cfg, lay, p, switch, acts.lora.as_mut());
        be.embedding_forward(&mut acts.encoded, ids, &p[lay.wte], b, t, c)?;
        let first = &mut acts.llama[0];
        be.rmsnorm_forward(
            pick::<B>(&mut first.ln1, &mut acts.shared.ln),
            &mut first.ln1_rstd,
            &acts.encoded,
            &p[lay.llama_layers[0].ln1_w],
            n,
            c,
            d.eps,
        )?;
        let Activations {
            encoded,
            llama,
            shared,
            lnf,
            lnf_rstd,
            ..
        } = acts;
        for l in 0..llama.len() {
            let (done, rest) = llama.split_at_mut(l);
            let (cur, later) = rest.split_first_mut().expect("l < n_layer");
            let resid_in = if l == 0 {
                &*encoded
            } else {
                &done[l - 1].residual3
            };
            let block = Block {
                be,
                p,
                l,
                w: &lay.llama_layers[l],
                rope,
                pos,
                starts,
                d,
            };
            block.forward(cur, shared, resid_in, &mut lora)?;
            // The block's last residual add, fused with the next RMSNorm: the next block's
            // input norm, or the final norm after the last block.
            let (out, rstd, nw) = match later.first_mut() {
                Some(next) => (
                    pick::<B>(&mut next.ln1, &mut shared.ln),
                    &mut next.ln1_rstd,
                    &p[lay.llama_layers[l + 1].ln1_w],
                ),
                None => (&mut *lnf, &mut *lnf_rstd, &p[lay.lnf_w]),
            };
            be.residual_rmsnorm_forward(
                &mut cur.residual3,
                out,
                rstd,
                &cur.residual2,
                &cur.down,
                nw,
                n,
                c,
                d.eps,
            )?;
        }
        Ok(())
    }
}

/// One block's weights and the pass's shape and positions.
struct Block<'a, B: Backend> {
    be: &'a B,
    p: &'a [B::Buf],
    l: usize,
    w: &'a LlamaLayerIdx,
    rope: &'a B::Buf,
    pos: Option<&'a B::Ids>,
    starts: Option<&'a B::Ids>,
    d: Dims,
}

impl<B: Backend> Block<'_, B> {
    /// The block on `cur.ln1` (its input norm of `resid_in`) up to the MLP's output
    /// `cur.down`; the last residual add is the caller's. Under recompute the norm and SwiGLU
    /// outputs go to the `shared` buffers. Each targeted projection's adapters (`lora`) add
    /// into its output right after it (q, k, v before RoPE).
    fn forward(
        &self,
        cur: &mut LlamaLayerActs<B>,
        shared: &mut Shared<B>,
        resid_in: &B::Buf,
        lora: &mut Option<LoraPass<B>>,
    ) -> Result<()> {
        let (be, p, w, d, l) = (self.be, self.p, self.w, self.d, self.l);
        let (n, c) = (d.n(), d.c);
        let ln1 = pick::<B>(&mut cur.ln1, &mut shared.ln);
        let bias = w.qkv_b.map(|i| &p[i]);
        be.matmul_forward(&mut cur.qkv, ln1, &p[w.qkv_w], bias, n, c, d.qkv)?;
        LoraPass::forward(lora, be, l, w.qkv_w, ln1, &mut cur.qkv, n)?;
        be.rope_forward(
            &mut cur.qkv,
            self.rope,
            self.pos,
            0,
            d.b,
            d.t,
            d.nh,
            d.nkv,
            d.hs,
        )?;
        be.attention_gqa_forward(
            &mut cur.atty,
            &mut cur.lse,
            &cur.qkv,
            self.starts,
            d.b,
            d.t,
            c,
            d.nh,
            d.nkv,
        )?;
        be.matmul_forward(&mut cur.attproj, &cur.atty, &p[w.o_w], None, n, c, c)?;
        LoraPass::forward(lora, be, l, w.o_w, &cur.atty, &mut cur.attproj, n)?;
        let ln2 = pick::<B>(&mut cur.ln2, &mut shared.ln);
        be.residual_rmsnorm_forward(
            &mut cur.residual2,
            ln2,
            &mut cur.ln2_rstd,
            resid_in,
            &cur.attproj,
            &p[w.ln2_w],
            n,
            c,
            d.eps,
        )?;
        let ln2: &B::Buf = ln2;
        be.matmul_forward(&mut cur.gate_up, ln2, &p[w.gate_up_w], None, n, c, 2 * d.i)?;
        LoraPass::forward(lora, be, l, w.gate_up_w, ln2, &mut cur.gate_up, n)?;
        let act = pick::<B>(&mut cur.swiglu, &mut shared.swiglu);
        be.swiglu_forward(act, &cur.gate_up, n, d.i)?;
        let act: &B::Buf = act;
        be.matmul_forward(&mut cur.down, act, &p[w.down_w], None, n, d.i, c)?;
        LoraPass::forward(lora, be, l, w.down_w, act, &mut cur.down, n)?;
        Ok(())
    }
}
