//! Sequence log-probabilities: the sum of `log p(target)` over each row's unmasked targets, and
//! the backward from one coefficient per row, for objectives over whole sequences (DPO).
//!
//! `logp_r = -sum_j losses[r*T + j]` over the row's unmasked positions (the per-position
//! cross-entropy of the fused op, summed in f64). The gradient of `sum_r c_r * logp_r` reaches
//! the logits as per-row weights `-c_r` on every position of row `r` (`LossGrad::PerRow`), then
//! runs the ordinary backward. The coefficients usually depend on the log-probabilities of the
//! same forward (DPO's sigmoid), so [`Gpt::sequence_logps_step`] asks for them in between: one
//! forward, the loss op twice (once to read the log-probabilities with the logits kept, once to
//! write the weighted gradient over them), one backward.
//!
//! [`Gpt::token_logps`] and [`Gpt::token_logps_step`] are the same per position: one
//! log-probability and one coefficient per (row, position), for objectives with per-token
//! weights (the RL stage's clipped policy ratio).

use super::{Gpt, ModelError, Result};
use crate::backend::{Backend, LossGrad, Role};

impl<B: Backend> Gpt<B> {
    /// Forward pass on `inputs [B*T]` and the log-probability of each row's unmasked `targets`
    /// (`-1` masks a position): `B` values, 0 for a row with no unmasked target. The logits are
    /// left in place; no gradient is computed.
    pub fn sequence_logps(
        &mut self,
        be: &B,
        inputs: &[i32],
        targets: &[i32],
        b: usize,
        t: usize,
    ) -> Result<Vec<f64>> {
        self.targets_pass(be, inputs, targets, None, b, t, None)?;
        // `-sum` of each `t`-long row, in f64 (masked positions are 0).
        let losses = self.position_losses(be)?;
        Ok(losses
            .chunks(t)
            .map(|row| -row.iter().map(|&x| x as f64).sum::<f64>())
            .collect())
    }

    /// Forward, then `coefficients(&logps)` -> one `c_r` per row, then backward:
    /// **accumulates** the gradient of `sum_r c_r * logp_r` into the parameter gradients (fold
    /// any loss scale into the coefficients). Returns the rows' log-probabilities, as
    /// [`Gpt::sequence_logps`] would.
    pub fn sequence_logps_step(
        &mut self,
        be: &B,
        inputs: &[i32],
        targets: &[i32],
        b: usize,
        t: usize,
        coefficients: impl FnOnce(&[f64]) -> Vec<f32>,
    ) -> Result<Vec<f64>> {
        let logps = self.grad_pass(|m| m.sequence_logps(be, inputs, targets, b, t))?;
        let coef = coefficients(&logps);
        if coef.len() != b {
            return Err(ModelError::Invalid(format!(
                "{} sequence coefficients for B = {b} rows",
                coef.len()
            )));
        }
        if let Some(r) = coef.iter().position(|c| !c.is_finite()) {
            return Err(ModelError::Invalid(format!(
                "sequence coefficient of row {r} is {}",
                coef[r]
            )));
        }
        // d logp_r / d loss_{r,j} = -1 for every unmasked position j of row r.
        let weights: Vec<f32> = coef
            .iter()
            .flat_map(|&c| std::iter::repeat_n(-c, t))
            .collect();
        self.weighted_backward(be, &weights, inputs, targets, b, t)?;
        Ok(logps)
    }

    /// Forward pass and the log-probability of every target: `[B*T]`, 0 where masked. The
    /// logits are left in place; no gradient is computed.
    pub fn token_logps(
        &mut self,
        be: &B,
        inputs: &[i32],
        targets: &[i32],
        b: usize,
        t: usize,
    ) -> Result<Vec<f32>> {
        self.targets_pass(be, inputs, targets, None, b, t, None)?;
        Ok(self.position_losses(be)?.iter().map(|&x| -x).collect())
    }

    /// Forward, then `coefficients(&logps)` -> one `c` per position (`[B*T]`), then backward:
    /// **accumulates** the gradient of `sum c * logp` over the unmasked positions (fold any loss
    /// scale into the coefficients). Returns the per-position log-probabilities, as
    /// [`Gpt::token_logps`] would.
    pub fn token_logps_step(
        &mut self,
        be: &B,
        inputs: &[i32],
        targets: &[i32],
        b: usize,
        t: usize,
        coefficients: impl FnOnce(&[f32]) -> Vec<f32>,
    ) -> Result<Vec<f32>> {
        let logps = self.grad_pass(|m| m.token_logps(be, inputs, targets, b, t))?;
        let coef = coefficients(&logps);
        if coef.len() != b * t {
            return Err(ModelError::Invalid(format!(
                "{} token coefficients for B*T = {} positions",
                coef.len(),
                b * t
            )));
        }
        if let Some(i) = coef.iter().position(|c| !c.is_finite()) {
            return Err(ModelError::Invalid(format!(
                "token coefficient of row {}, position {} is {}",
                i / t,
                i % t,
                coef[i]
            )));
        }
        // d logp / d loss = -1 at every unmasked position.
        let weights: Vec<f32> = coef.iter().map(|&c| -c).collect();
        self.weighted_backward(be, &weights, inputs, targets, b, t)?;
        Ok(logps)
    }

    /// The loss op again over the kept logits with per-position gradient `weights`, then the
    /// backward, skipped when it would add nothing (no unmasked target or all weights 0).
    fn weighted_backward(
        &mut self,
        be: &B,
        weights: &[f32],
        inputs: &[i32],
        targets: &[i32],
        b: usize,
        t: usize,
    ) -> Result<()> {
        let any_weight = weights.iter().any(|&w| w != 0.0);
        let weights = be.upload(weights, Role::State)?;
        self.loss_op(be, targets, b * t, LossGrad::PerRow(&weights))?;
        if targets.iter().any(|&x| x >= 0) && any_weight {
            self.backward(be, inputs, b, t)?;
        }
        Ok(())
    }
}
