//! AdamW over a model's parameters (decay on matrices only) and the learning-rate schedule.

use crate::backend::{AdamWStep, Backend, Result, Role};
use crate::config::RunConfig;
use crate::model::Gpt;

/// Linear warmup from `lr/warmup` to `lr` over `warmup` steps, then cosine decay to
/// `lr * min_ratio` at `max_steps` (constant after). `step` is 0-based.
pub fn lr_at(step: usize, lr: f32, warmup: usize, max_steps: usize, min_ratio: f32) -> f32 {
    if step < warmup {
        return lr * (step + 1) as f32 / warmup as f32;
    }
    if step >= max_steps || max_steps <= warmup {
        return lr * min_ratio;
    }
    let progress = (step - warmup) as f32 / (max_steps - warmup) as f32;
    let cosine = 0.5 * (1.0 + (std::f32::consts::PI * progress).cos());
    lr * (min_ratio + (1.0 - min_ratio) * cosine)
}

/// AdamW state: first and second moments for every parameter tensor, and the step count.
pub struct AdamW<B: Backend> {
    pub m: Vec<B::Buf>,
    pub v: Vec<B::Buf>,
    /// Updates applied so far.
    pub step: u64,
}

impl<B: Backend> AdamW<B> {
    pub fn new(be: &B, model: &Gpt<B>) -> Result<Self> {
        let mut m = Vec::with_capacity(model.params.len());
        let mut v = Vec::with_capacity(model.params.len());
        for spec in &model.layout.specs {
            m.push(be.zeros(spec.numel(), Role::State)?);
            v.push(be.zeros(spec.numel(), Role::State)?);
        }
        Ok(Self { m, v, step: 0 })
    }

    /// Applies one update to every parameter. Weight decay applies only to tensors the
    /// layout marks for decay (matrices), never to biases and layernorm parameters.
    pub fn update(
        &mut self,
        be: &B,
        model: &mut Gpt<B>,
        cfg: &RunConfig,
        lr: f32,
        grad_scale: f32,
    ) -> Result<()> {
        self.step += 1;
        for (i, spec) in model.layout.specs.iter().enumerate() {
            let hp = AdamWStep {
                lr,
                beta1: cfg.beta1,
                beta2: cfg.beta2,
                eps: cfg.eps,
                weight_decay: if spec.decay { cfg.weight_decay } else { 0.0 },
                step: self.step,
                grad_scale,
            };
            be.adamw(
                &mut model.params[i],
                &model.grads[i],
                &mut self.m[i],
                &mut self.v[i],
                &hp,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::lr_at;

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let (lr, warm, max, floor) = (1.0, 10, 110, 0.1);
        assert!((lr_at(0, lr, warm, max, floor) - 0.1).abs() < 1e-6);
        assert!((lr_at(9, lr, warm, max, floor) - 1.0).abs() < 1e-6);
        assert!(
            (lr_at(60, lr, warm, max, floor) - 0.55).abs() < 1e-6,
            "half way: mid of [0.1, 1]"
        );
        assert!((lr_at(110, lr, warm, max, floor) - 0.1).abs() < 1e-6);
        let mut prev = f32::INFINITY;
        for s in warm..max {
            let x = lr_at(s, lr, warm, max, floor);
            assert!(x <= prev + 1e-7);
            prev = x;
        }
    }
}
