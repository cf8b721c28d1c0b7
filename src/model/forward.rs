//! The forward pass (embeddings, blocks, ln_f, the head) and the loss, for both families: the
//! Llama family's trunk is llama/forward.rs, the head and the loss are shared.

use super::activations::{pick, Activations, LayerActs, Shared};
use super::lora::{self, LoraPass};
use super::packing::PackedIds;
use super::{Gpt, LayerIdx, ModelError, Packing, ParamLayout, Result};
use crate::backend::{Backend, LossGrad};

/// A batch's loss: the mean over its unmasked targets, and what went into it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Loss {
    pub mean: f32,
    pub sum: f64,
    /// Unmasked target positions.
    pub tokens: usize,
}

impl<B: Backend> Gpt<B> {
    /// Runs the network on `inputs [B*T]` up to the logits (readable with [`Gpt::logits_at`]).
    pub fn forward(&mut self, be: &B, inputs: &[i32], b: usize, t: usize) -> Result<()> {
        self.forward_hidden_with(be, inputs, None, b, t)?;
        self.head_forward(be, b * t)
    }

    /// The head on the last forward's `n` positions: logits = lnf @ head^T over all padded
    /// rows (head: the tied `wte`, or the Llama family's untied `lm_head`).
    fn head_forward(&mut self, be: &B, n: usize) -> Result<()> {
        let (c, vp) = (self.cfg.n_embd, self.cfg.padded_vocab_size);
        let acts = self
            .acts
            .as_mut()
            .expect("allocated by forward_hidden_with");
        let head = &self.params[self.layout.head()];
        be.matmul_forward(&mut acts.logits, &acts.lnf, head, None, n, c, vp)?;
        Ok(())
    }

    /// Runs the network on `inputs [B*T]` up to the final hidden state, the output of `ln_f`
    /// (readable with [`Gpt::hidden_at`]); the logits are not computed.
    pub fn forward_hidden(&mut self, be: &B, inputs: &[i32], b: usize, t: usize) -> Result<()> {
        self.forward_hidden_with(be, inputs, None, b, t)
    }

    /// [`Gpt::forward_hidden`] on rows that may pack several examples each.
    pub fn forward_hidden_with(
        &mut self,
        be: &B,
        inputs: &[i32],
        packing: Option<&Packing>,
        b: usize,
        t: usize,
    ) -> Result<()> {
        self.check_ids("inputs", inputs, b, t, false)?;
        if let Some(p) = packing {
            p.check_shape(b, t)?;
        }
        self.ensure_acts(be, b, t)?;
        let ids = be.upload_ids(inputs)?;
        self.packing = packing.map(|p| PackedIds::upload(be, p)).transpose()?;
        if self.cfg.llama().is_some() {
            return self.llama_forward_trunk(be, &ids, b, t);
        }
        let pos = self.packing.as_ref().map(|p| &p.positions);
        let starts = self.packing.as_ref().map(|p| &p.starts);
        let cfg = &self.cfg;
        let (n, c, nh) = (b * t, cfg.n_embd, cfg.n_head);
        let lay = &self.layout;
        let p = &self.params;
        let acts = self.acts.as_mut().expect("allocated by ensure_acts");
        let dims = BlockDims { b, t, c, nh };
        embed_forward(be, p, lay, acts, &ids, pos, dims)?;
        let mut lora = lora::forward_pass(cfg, lay, p, self.lora_switch, acts.lora.as_mut());
        let n_layer = acts.layers.len();
        for l in 0..n_layer {
            let w = &lay.layers[l];
            let (done, rest) = acts.layers.split_at_mut(l);
            let (cur, later) = rest.split_first_mut().expect("l < n_layer");
            let resid_in = if l == 0 {
                &acts.encoded
            } else {
                &done[l - 1].residual3
            };
            let shared = &mut acts.shared;
            block_forward(
                be,
                p,
                (l, w),
                cur,
                shared,
                resid_in,
                starts,
                dims,
                &mut lora,
            )?;
            // The residual add after the MLP is fused with the next layernorm: the next
            // block's ln_1, or ln_f after the last block.
            let (out, mean, rstd, lw, lb) = match later.first_mut() {
                Some(next) => {
                    let nw = &lay.layers[l + 1];
                    (
                        pick::<B>(&mut next.ln1, &mut acts.shared.ln),
                        &mut next.ln1_mean,
                        &mut next.ln1_rstd,
                        &p[nw.ln1_w],
                        &p[nw.ln1_b],
                    )
                }
                None => (
                    &mut acts.lnf,
                    &mut acts.lnf_mean,
                    &mut acts.lnf_rstd,
                    &p[lay.lnf_w],
                    &p[lay.lnf_b.expect("GPT-2 layernorms have biases")],
                ),
            };
            be.residual_layernorm_forward(
                &mut cur.residual3,
                out,
                mean,
                rstd,
                &cur.residual2,
                &cur.fcproj,
                lw,
                lb,
                n,
                c,
            )?;
        }
        Ok(())
    }

    /// Forward pass plus the mean cross-entropy over unmasked targets (`-1` masks a position).
    /// No gradient is computed.
    pub fn forward_loss(
        &mut self,
        be: &B,
        inputs: &[i32],
        targets: &[i32],
        b: usize,
        t: usize,
    ) -> Result<Loss> {
        self.forward_loss_with(be, inputs, targets, None, b, t)
    }

    /// [`Gpt::forward_loss`] with an optional [`Packing`] of the rows.
    pub fn forward_loss_with(
        &mut self,
        be: &B,
        inputs: &[i32],
        targets: &[i32],
        packing: Option<&Packing>,
        b: usize,
        t: usize,
    ) -> Result<Loss> {
        let tokens = self.targets_pass(be, inputs, targets, packing, b, t, None)?;
        self.mean_loss(be, tokens)
    }

    /// Forward, loss and backward: **accumulates** `loss_scale * d(mean loss)/d(param)` into
    /// the gradients (a scale of `1 / accumulation steps` averages micro-batches).
    pub fn forward_backward(
        &mut self,
        be: &B,
        inputs: &[i32],
        targets: &[i32],
        b: usize,
        t: usize,
        loss_scale: f32,
    ) -> Result<Loss> {
        self.forward_backward_with(be, inputs, targets, None, b, t, loss_scale)
    }

    /// [`Gpt::forward_backward`] with an optional [`Packing`] of the rows.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_backward_with(
        &mut self,
        be: &B,
        inputs: &[i32],
        targets: &[i32],
        packing: Option<&Packing>,
        b: usize,
        t: usize,
        loss_scale: f32,
    ) -> Result<Loss> {
        let scale = Some(loss_scale);
        let tokens =
            self.grad_pass(|m| m.targets_pass(be, inputs, targets, packing, b, t, scale))?;
        let loss = self.mean_loss(be, tokens)?;
        if tokens > 0 {
            self.backward(be, inputs, b, t)?;
        }
        Ok(loss)
    }

    /// Checks `targets`, runs the forward pass to the logits and the loss op over them, with the
    /// gradient of `loss_scale * mean loss` written over the logits when a scale is given. The
    /// per-position losses are left in the activations; returns the unmasked target count.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn targets_pass(
        &mut self,
        be: &B,
        inputs: &[i32],
        targets: &[i32],
        packing: Option<&Packing>,
        b: usize,
        t: usize,
        loss_scale: Option<f32>,
    ) -> Result<usize> {
        self.check_ids("targets", targets, b, t, true)?;
        self.forward_hidden_with(be, inputs, packing, b, t)?;
        self.head_forward(be, b * t)?;
        let tokens = targets.iter().filter(|&&x| x >= 0).count();
        let dloss = loss_scale.map(|s| if tokens > 0 { s / tokens as f32 } else { 0.0 });
        self.loss_op(be, targets, b * t, LossGrad::uniform(dloss))?;
        Ok(tokens)
    }

    /// The fused cross-entropy of the last logits against `targets` over `n` positions: the
    /// per-position losses, and `grad` written over the logits.
    pub(super) fn loss_op(
        &mut self,
        be: &B,
        targets: &[i32],
        n: usize,
        grad: LossGrad<'_, B::Buf>,
    ) -> Result<()> {
        let tgt = be.upload_ids(targets)?;
        let (v, vp) = (self.cfg.vocab_size, self.cfg.padded_vocab_size);
        let acts = self
            .acts
            .as_mut()
            .ok_or_else(|| ModelError::Invalid("no activations".into()))?;
        be.cross_entropy(&mut acts.losses, &mut acts.logits, &tgt, n, v, vp, grad)?;
        Ok(())
    }

    /// The last loss op's sum over its `tokens` unmasked positions, and their mean.
    fn mean_loss(&self, be: &B, tokens: usize) -> Result<Loss> {
        let sum: f64 = self.position_losses(be)?.iter().map(|&x| x as f64).sum();
        let mean = if tokens > 0 {
            (sum / tokens as f64) as f32
        } else {
            0.0
        };
        Ok(Loss { mean, sum, tokens })
    }
}

/// The shape a block runs at: `b` rows of `t` positions, width `c`, `nh` heads.
#[derive(Clone, Copy)]
struct BlockDims {
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
}

/// Token plus position embeddings of `ids` (packed positions `pos`, else `0..t` per row) into
/// `acts.encoded`, then the first block's ln_1.
fn embed_forward<B: Backend>(
    be: &B,
    p: &[B::Buf],
    lay: &ParamLayout,
    acts: &mut Activations<B>,
    ids: &B::Ids,
    pos: Option<&B::Ids>,
    dims: BlockDims,
) -> Result<()> {
    let BlockDims { b, t, c, .. } = dims;
    be.encoder_forward(
        &mut acts.encoded,
        ids,
        pos,
        &p[lay.wte],
        &p[lay.wpe.expect("GPT-2 has position embeddings")],
        b,
        t,
        c,
    )?;
    let l0 = &lay.layers[0];
    let first = &mut acts.layers[0];
    be.layernorm_forward(
        pick::<B>(&mut first.ln1, &mut acts.shared.ln),
        &mut first.ln1_mean,
        &mut first.ln1_rstd,
        &acts.encoded,
        &p[l0.ln1_w],
        &p[l0.ln1_b],
        b * t,
        c,
    )?;
    Ok(())
}

/// Block `w` on `cur.ln1` (its ln_1 of `resid_in`) up to the MLP's output `cur.fcproj`: the
/// attention half with its residual add fused into ln_2, then the MLP. The MLP's residual add
/// is left to the caller, which fuses it with the layernorm that follows.
///
/// Each targeted projection's adapters (`lora`) add into its output right after it.
///
/// Under recompute the layernorm and GELU outputs go to the `shared` buffers. From
/// recompute level 1 the GELU runs as its own op after the matmul, the op the backward
/// recomputes it with, so that both see the same bits on every backend (CUDA's fused
/// cuBLASLt epilogue computes its own GELU, which need not round as the GELU kernel does).
#[allow(clippy::too_many_arguments)]
fn block_forward<B: Backend>(
    be: &B,
    p: &[B::Buf],
    (l, w): (usize, &LayerIdx),
    cur: &mut LayerActs<B>,
    shared: &mut Shared<B>,
    resid_in: &B::Buf,
    starts: Option<&B::Ids>,
    dims: BlockDims,
    lora: &mut Option<LoraPass<B>>,
) -> Result<()> {
    let BlockDims { b, t, c, nh } = dims;
    let n = b * t;
    let ln1 = pick::<B>(&mut cur.ln1, &mut shared.ln);
    be.matmul_forward(
        &mut cur.qkv,
        ln1,
        &p[w.qkv_w],
        Some(&p[w.qkv_b]),
        n,
        c,
        3 * c,
    )?;
    LoraPass::forward(lora, be, l, w.qkv_w, ln1, &mut cur.qkv, n)?;
    be.attention_forward(&mut cur.atty, &mut cur.lse, &cur.qkv, starts, b, t, c, nh)?;
    be.matmul_forward(
        &mut cur.attproj,
        &cur.atty,
        &p[w.attn_proj_w],
        Some(&p[w.attn_proj_b]),
        n,
        c,
        c,
    )?;
    LoraPass::forward(lora, be, l, w.attn_proj_w, &cur.atty, &mut cur.attproj, n)?;
    let ln2 = pick::<B>(&mut cur.ln2, &mut shared.ln);
    be.residual_layernorm_forward(
        &mut cur.residual2,
        ln2,
        &mut cur.ln2_mean,
        &mut cur.ln2_rstd,
        resid_in,
        &cur.attproj,
        &p[w.ln2_w],
        &p[w.ln2_b],
        n,
        c,
    )?;
    let ln2: &B::Buf = ln2;
    // An adapter on c_fc adds before the GELU: the unfused ops then.
    let fused = cur.fch_gelu.is_some() && !LoraPass::has(lora, l, w.fc_w);
    let gelu = pick::<B>(&mut cur.fch_gelu, &mut shared.gelu);
    let (fc_w, fc_b) = (&p[w.fc_w], Some(&p[w.fc_b]));
    if fused {
        be.matmul_gelu_forward(gelu, &mut cur.fch, ln2, fc_w, fc_b, n, c, 4 * c)?;
    } else {
        be.matmul_forward(&mut cur.fch, ln2, fc_w, fc_b, n, c, 4 * c)?;
        LoraPass::forward(lora, be, l, w.fc_w, ln2, &mut cur.fch, n)?;
        be.gelu_forward(gelu, &cur.fch, n * 4 * c)?;
    }
    let gelu: &B::Buf = gelu;
    be.matmul_forward(
        &mut cur.fcproj,
        gelu,
        &p[w.fc_proj_w],
        Some(&p[w.fc_proj_b]),
        n,
        4 * c,
        c,
    )?;
    LoraPass::forward(lora, be, l, w.fc_proj_w, gelu, &mut cur.fcproj, n)?;
    Ok(())
}
