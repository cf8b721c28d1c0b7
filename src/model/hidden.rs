//! The final hidden state (the output of `ln_f`) as an output of the trunk, for heads other than
//! the tied LM head: read its rows after [`Gpt::forward_hidden`], and run the backward pass from
//! a gradient on it. The LM-head path ([`Gpt::forward`], [`Gpt::forward_backward`]) shares the
//! same trunk code (forward.rs, backward.rs).

use super::{Gpt, ModelError, Result};
use crate::backend::Backend;

impl<B: Backend> Gpt<B> {
    fn acts_for(&self, b: usize, t: usize) -> Result<&super::Activations<B>> {
        match &self.acts {
            Some(a) if a.b == b && a.t == t => Ok(a),
            Some(a) => Err(ModelError::Invalid(format!(
                "the last forward pass was B={}, T={}, not B={b}, T={t}",
                a.b, a.t
            ))),
            None => Err(ModelError::Invalid("no forward pass yet".into())),
        }
    }

    /// The final hidden state (`[C]`, after `ln_f`) at position `pos` of row `row` of the last
    /// forward pass.
    pub fn hidden_at(&self, be: &B, row: usize, pos: usize) -> Result<Vec<f32>> {
        let acts = self
            .acts
            .as_ref()
            .ok_or_else(|| ModelError::Invalid("no forward pass yet".into()))?;
        if row >= acts.b || pos >= acts.t {
            return Err(ModelError::Invalid(format!(
                "hidden state ({row}, {pos}) is outside the last batch B={}, T={}",
                acts.b, acts.t
            )));
        }
        let c = self.cfg.n_embd;
        Ok(be.download_range(&acts.lnf, (row * acts.t + pos) * c, c)?)
    }

    /// Backward from `dhidden` `[B*T*C]`, the gradient of a loss with respect to the final
    /// hidden state of the last forward pass (which must have been on these `inputs`):
    /// **accumulates** the parameter gradients of the trunk (not of the LM head).
    pub fn backward_hidden(
        &mut self,
        be: &B,
        inputs: &[i32],
        b: usize,
        t: usize,
        dhidden: &[f32],
    ) -> Result<()> {
        self.check_ids("inputs", inputs, b, t, false)?;
        self.acts_for(b, t)?;
        let n = b * t;
        if dhidden.len() != n * self.cfg.n_embd {
            return Err(ModelError::Invalid(format!(
                "dhidden has {} values, expected B*T*C = {}",
                dhidden.len(),
                n * self.cfg.n_embd
            )));
        }
        self.ensure_scratch(be, n)?;
        let s = self.scratch.as_mut().expect("allocated by ensure_scratch");
        be.write(&mut s.dln, dhidden)?;
        self.backward_trunk(be, inputs, b, t)
    }
}
