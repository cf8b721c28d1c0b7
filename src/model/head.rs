//! The classifier and cross-entropy of the LM head, run in chunks of rows so that the logits
//! of a large vocabulary never materialise whole (Liger-Kernel's fused linear cross-entropy is
//! the idea): per chunk, the head matmul, the loss with its gradient in place, and that chunk's
//! share of the head's backward.
//!
//! A loss pass over `N` positions runs [`logit_chunk_rows`] rows at a time (or the rows forced
//! by [`Gpt::set_logit_chunk_rows`]): the logits buffer holds `rows * VP` elements, never
//! `N * VP`. With one chunk (`rows == N`, every pass whose logits fit [`LOGIT_CHUNK_ELEMENTS`])
//! the ops read and write the pass's own buffers, exactly as an unchunked head would. With
//! several, a chunk's rows of `lnf` are copied into a staging buffer of `rows` rows, its losses
//! and its `dlnf` rows copied back out; the last chunk, when `rows` does not divide `N`, runs
//! at full size with its missing rows masked (target -1: zero loss, zero gradient), so every op
//! keeps one shape.
//!
//! With a gradient, each chunk's `dlnf = dlogits @ head` lands in the backward's scratch and
//! `dhead += dlogits^T @ lnf` accumulates chunk after chunk in row order, so a run is
//! reproducible; the backward then starts from `dlnf` ([`Gpt::backward_trunk`]). Chunked and
//! unchunked passes give the same per-position losses; `dhead` differs by rounding only, its
//! sum over positions being split at the chunk boundaries.
//!
//! Passes that read logits rather than losses decide for themselves: [`Gpt::forward`] keeps
//! every position's (`[N * VP]`, for tests and reference generation); generation with a cache
//! (decode.rs) computes only each row's last position.

use super::{Gpt, ModelError, Result};
use crate::backend::{Backend, LossGrad, Result as BackendResult, Role};
use crate::config::ModelConfig;

/// Logit elements one chunk may hold (`rows * VP`): 64 Mi (128 MiB in bf16).
pub const LOGIT_CHUNK_ELEMENTS: usize = 1 << 26;

/// Rows per chunk for `n` positions over a padded vocabulary `vp`: all `n` where they fit in
/// [`LOGIT_CHUNK_ELEMENTS`], else the fewest chunks that fit, balanced (`ceil(n / chunks)`
/// rows each, at least one), so the masked tail of the last chunk is shorter than the chunk
/// count. The logits buffer of a loss pass holds exactly this many rows.
pub fn logit_chunk_rows(n: usize, vp: usize) -> usize {
    let n = n.max(1);
    let fit = (LOGIT_CHUNK_ELEMENTS / vp.max(1)).clamp(1, n);
    n.div_ceil(n.div_ceil(fit))
}

/// `Activation` elements of a chunked head's staging beside its logits (a chunk's rows of `lnf`
/// and `dlnf`, `2 * rows * C`; 0 with one chunk), for `n` positions of width `c` over a padded
/// vocabulary `vp` at the default chunk rule; plus `rows` fp32 losses, not counted here.
pub fn logit_staging_elements(n: usize, c: usize, vp: usize) -> usize {
    let rows = logit_chunk_rows(n, vp);
    if rows < n {
        2 * rows * c
    } else {
        0
    }
}

/// The gradient a loss pass asks of the head, with host-side per-row weights (each chunk
/// uploads its own rows of them).
#[derive(Clone, Copy, Debug)]
pub(super) enum HeadGrad<'a> {
    /// Losses only.
    None,
    /// `w_i = s` for every row: the gradient of `s * sum losses`.
    Uniform(f32),
    /// `w_i = weights[i]` over all `N` positions.
    PerRow(&'a [f32]),
}

impl HeadGrad<'_> {
    fn is_some(&self) -> bool {
        !matches!(self, HeadGrad::None)
    }
}

/// What the logits buffer of [`super::Activations`] holds, and the staging of a chunked pass.
pub struct HeadState<B: Backend> {
    /// Rows of the logits buffer (`[rows * VP]`).
    pub rows: usize,
    /// The first position (of `N`) whose row the buffer holds: 0 after [`Gpt::forward`], the
    /// last chunk's after a loss pass.
    pub first: usize,
    /// The buffer holds logits of the current forward pass (not their gradient, nor those of
    /// an earlier pass), so a second loss pass over the same chunk skips its matmul.
    pub fresh: bool,
    /// Present when `rows < N`: a chunk's rows of `lnf` and of `dlnf` (`[rows * C]`,
    /// activations), its losses and per-row weights (`[rows]`, fp32 `State`).
    pub stage: Option<Stage<B>>,
}

/// The staging buffers of a chunked head (see [`HeadState::stage`]).
pub struct Stage<B: Backend> {
    pub lnf: B::Buf,
    pub dlnf: B::Buf,
    pub losses: B::Buf,
}

impl<B: Backend> HeadState<B> {
    /// A logits buffer of `rows` rows for passes over `n` positions, and its state, with the
    /// staging buffers when `rows < n`.
    pub fn alloc(
        be: &B,
        cfg: &ModelConfig,
        n: usize,
        rows: usize,
    ) -> BackendResult<(B::Buf, Self)> {
        let (c, vp) = (cfg.n_embd, cfg.padded_vocab_size);
        let z = |len: usize| be.zeros(len, Role::Activation);
        let logits = z(rows * vp)?;
        let stage = if rows < n {
            Some(Stage {
                lnf: z(rows * c)?,
                dlnf: z(rows * c)?,
                losses: be.zeros(rows, Role::State)?,
            })
        } else {
            None
        };
        let state = Self {
            rows,
            first: 0,
            fresh: false,
            stage,
        };
        Ok((logits, state))
    }

    /// Elements of the `Activation`-role staging buffers (0 without chunking).
    pub fn activation_elements(&self, be: &B) -> usize {
        self.stage
            .as_ref()
            .map_or(0, |s| be.len(&s.lnf) + be.len(&s.dlnf))
    }
}

impl<B: Backend> Gpt<B> {
    /// Forces the rows per chunk of the head in loss passes (`None`: [`logit_chunk_rows`]);
    /// for tests and benchmarks. A value above a pass's `N` runs it in one chunk. Takes effect
    /// at the next loss pass.
    pub fn set_logit_chunk_rows(&mut self, rows: Option<usize>) -> Result<()> {
        if rows == Some(0) {
            return Err(ModelError::Invalid(
                "logit chunk rows 0: a chunk needs at least one row".into(),
            ));
        }
        self.logit_chunk = rows;
        Ok(())
    }

    /// The rows per chunk a loss pass over `n` positions runs at (at most `n`).
    pub fn loss_chunk_rows(&self, n: usize) -> usize {
        match self.logit_chunk {
            Some(r) => r.min(n.max(1)),
            None => logit_chunk_rows(n, self.cfg.padded_vocab_size),
        }
    }

    /// The head on every one of the last forward's `n` positions: logits = lnf @ head^T over
    /// all padded rows (head: the tied `wte`, or the Llama family's untied `lm_head`), kept
    /// whole for [`Gpt::logits_at`].
    pub(super) fn head_forward(&mut self, be: &B, n: usize) -> Result<()> {
        self.ensure_logit_rows(be, n, n)?;
        let (c, vp) = (self.cfg.n_embd, self.cfg.padded_vocab_size);
        let acts = self.acts.as_mut().expect("allocated by ensure_logit_rows");
        let head = &self.params[self.layout.head()];
        be.matmul_forward(&mut acts.logits, &acts.lnf, head, None, n, c, vp)?;
        acts.head.first = 0;
        acts.head.fresh = true;
        Ok(())
    }

    /// The loss pass's head over the last forward's `n` positions, chunk by chunk: the
    /// per-position losses into the activations' `losses [N]`, and with a gradient, `dlnf`
    /// into the scratch `dln` and `dhead` accumulated (see the module header).
    pub(super) fn head_loss(
        &mut self,
        be: &B,
        targets: &[i32],
        n: usize,
        grad: HeadGrad<'_>,
    ) -> Result<()> {
        if let HeadGrad::PerRow(w) = grad {
            if w.len() != n {
                return Err(ModelError::Invalid(format!(
                    "{} per-row loss weights for N = {n} positions",
                    w.len()
                )));
            }
        }
        let rows = self.loss_chunk_rows(n);
        if grad.is_some() {
            self.ensure_scratch(be, n)?;
        }
        self.ensure_logit_rows(be, rows, n)?;
        let (c, v, vp) = (
            self.cfg.n_embd,
            self.cfg.vocab_size,
            self.cfg.padded_vocab_size,
        );
        let hi = self.layout.head();
        let head = &self.params[hi];
        let acts = self.acts.as_mut().expect("allocated by ensure_logit_rows");
        for r0 in (0..n).step_by(rows) {
            let take = rows.min(n - r0);
            // The chunk's targets and weights; a short last chunk's missing rows are masked.
            let mut tgt = targets[r0..r0 + take].to_vec();
            tgt.resize(rows, -1);
            let tgt = be.upload_ids(&tgt)?;
            let weights = match grad {
                HeadGrad::PerRow(w) => {
                    let mut w = w[r0..r0 + take].to_vec();
                    w.resize(rows, 0.0);
                    Some(be.upload(&w, Role::State)?)
                }
                _ => None,
            };
            let loss_grad = match (grad, &weights) {
                (HeadGrad::Uniform(s), _) => LossGrad::Uniform(s),
                (HeadGrad::PerRow(_), Some(w)) => LossGrad::PerRow(w),
                _ => LossGrad::None,
            };
            let reuse = acts.head.fresh && acts.head.first == r0;
            acts.head.first = r0;
            acts.head.fresh = !grad.is_some();
            let (logits, lnf, losses) = (&mut acts.logits, &acts.lnf, &mut acts.losses);
            let Some(st) = acts.head.stage.as_mut() else {
                // One chunk: the pass's own buffers.
                if !reuse {
                    be.matmul_forward(logits, lnf, head, None, n, c, vp)?;
                }
                be.cross_entropy(losses, logits, &tgt, n, v, vp, loss_grad)?;
                if grad.is_some() {
                    let s = self.scratch.as_mut().expect("allocated above");
                    let dhead = self.grads[hi].as_mut(); // None: a frozen head (LoRA)
                    be.matmul_backward(&mut s.dln, dhead, None, logits, lnf, head, n, c, vp)?;
                }
                continue;
            };
            if !reuse {
                be.copy_range(&mut st.lnf, 0, lnf, r0 * c, take * c)?;
                be.matmul_forward(logits, &st.lnf, head, None, rows, c, vp)?;
            }
            be.cross_entropy(&mut st.losses, logits, &tgt, rows, v, vp, loss_grad)?;
            be.copy_range(losses, r0, &st.losses, 0, take)?;
            if grad.is_some() {
                let s = self.scratch.as_mut().expect("allocated above");
                let dhead = self.grads[hi].as_mut(); // None: a frozen head (LoRA)
                be.matmul_backward(
                    &mut st.dlnf,
                    dhead,
                    None,
                    logits,
                    &st.lnf,
                    head,
                    rows,
                    c,
                    vp,
                )?;
                be.copy_range(&mut s.dln, r0 * c, &st.dlnf, 0, take * c)?;
            }
        }
        Ok(())
    }

    /// Makes the logits buffer hold `rows` rows, with the staging of a chunked pass when
    /// `rows < n`; buffers of another size are freed before their replacements are allocated.
    fn ensure_logit_rows(&mut self, be: &B, rows: usize, n: usize) -> Result<()> {
        let acts = self
            .acts
            .as_mut()
            .ok_or_else(|| ModelError::Invalid("no forward pass yet".into()))?;
        if acts.head.rows != rows || acts.head.stage.is_some() != (rows < n) {
            acts.logits = be.zeros(0, Role::Activation)?;
            acts.head.stage = None;
            (acts.logits, acts.head) = HeadState::alloc(be, &self.cfg, n, rows)?;
        }
        Ok(())
    }

    /// Logits row of position `(row, pos)` of the last forward, the real vocabulary only. After
    /// a loss pass that ran in chunks only the last chunk's positions are held (and after one
    /// with a gradient, their gradient): [`Gpt::forward`] keeps every position's.
    pub fn logits_at(&self, be: &B, row: usize, pos: usize) -> Result<Vec<f32>> {
        let acts = self
            .acts
            .as_ref()
            .ok_or_else(|| ModelError::Invalid("no forward pass yet".into()))?;
        if row >= acts.b || pos >= acts.t {
            return Err(ModelError::Invalid(format!(
                "logits ({row}, {pos}) are outside the last batch B={}, T={}",
                acts.b, acts.t
            )));
        }
        let (i, h) = (row * acts.t + pos, &acts.head);
        if i < h.first || i >= h.first + h.rows {
            return Err(ModelError::Invalid(format!(
                "logits of row {row}, position {pos} are not held: the last loss pass ran the \
                 head in chunks of {} rows and kept positions {}..{} of {} (forward keeps \
                 every position's)",
                h.rows,
                h.first,
                (h.first + h.rows).min(acts.b * acts.t),
                acts.b * acts.t
            )));
        }
        let vp = self.cfg.padded_vocab_size;
        Ok(be.download_range(&acts.logits, (i - h.first) * vp, self.cfg.vocab_size)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// All rows where they fit, else the fewest balanced chunks within the limit.
    #[test]
    fn chunk_rows_fit_and_balance() {
        assert_eq!(logit_chunk_rows(100, 50304), 100);
        assert_eq!(logit_chunk_rows(0, 64), 1);
        // 2048 positions of a 128256 vocabulary: 523 rows fit, so 4 chunks of 512.
        assert_eq!(LOGIT_CHUNK_ELEMENTS / 128256, 523);
        assert_eq!(logit_chunk_rows(2048, 128256), 512);
        // 1000 rows, 300 fit: 4 chunks of 250.
        let vp = LOGIT_CHUNK_ELEMENTS / 300;
        assert_eq!(logit_chunk_rows(1000, vp), 250);
        // A vocabulary wider than the limit still runs one row at a time.
        assert_eq!(logit_chunk_rows(7, LOGIT_CHUNK_ELEMENTS * 2), 1);
        assert_eq!(logit_staging_elements(2048, 2048, 128256), 2 * 512 * 2048);
        assert_eq!(logit_staging_elements(100, 768, 50304), 0);
        for n in 1..2000 {
            for vp in [64, 50304, 128256, 152064] {
                let r = logit_chunk_rows(n, vp);
                let fit = (LOGIT_CHUNK_ELEMENTS / vp).max(1);
                assert!(r >= 1 && r <= fit.min(n), "n {n} vp {vp}: {r}");
                assert_eq!(n.div_ceil(r), n.div_ceil(fit.min(n)), "n {n} vp {vp}");
            }
        }
    }
}
