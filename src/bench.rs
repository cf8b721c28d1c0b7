//! `topcoat bench`: training-step throughput on random tokens, the figure docs/PERF.md records.
//!
//! A step is exactly what the training loop does per optimizer step without accumulation:
//! zero the gradients, forward + backward on one micro-batch, the global gradient norm, and an
//! AdamW update. Random tokens make it independent of any data on disk.

use crate::backend::Backend;
use crate::config::{ModelConfig, RunConfig};
use crate::model::{Gpt, Result};
use crate::optim::AdamW;
use crate::rng::Rng;
use std::time::Instant;

/// What a benchmark measured.
#[derive(Clone, Debug)]
pub struct BenchResult {
    /// Wall time of every timed step, milliseconds.
    pub step_ms: Vec<f64>,
    pub median_ms: f64,
    pub tokens_per_step: usize,
    pub tokens_per_s: f64,
    /// Achieved model FLOP rate, `flops_per_token * tokens/s` (6N + 12 L C T per token).
    pub gflops: f64,
}

/// Median of a non-empty slice.
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        0.5 * (v[mid - 1] + v[mid])
    }
}

/// Runs `warmup + steps` training steps of a freshly initialised model on random tokens and
/// times the last `steps`. `optimizer: false` times forward + backward only.
#[allow(clippy::too_many_arguments)]
pub fn bench_train<B: Backend>(
    be: &B,
    cfg: &ModelConfig,
    b: usize,
    t: usize,
    warmup: usize,
    steps: usize,
    optimizer: bool,
    mut on_step: impl FnMut(usize, f64),
) -> Result<BenchResult> {
    let mut model = Gpt::init(be, cfg, 1)?;
    let mut opt = if optimizer {
        Some(AdamW::new(be, &model)?)
    } else {
        None
    };
    let run = RunConfig::default();
    let mut rng = Rng::new(7);
    let mut step_ms = Vec::with_capacity(steps);
    for i in 0..warmup + steps.max(1) {
        let tokens: Vec<i32> = (0..b * (t + 1))
            .map(|_| rng.below(cfg.vocab_size as u64) as i32)
            .collect();
        let (mut inputs, mut targets) = (Vec::with_capacity(b * t), Vec::with_capacity(b * t));
        for row in tokens.chunks(t + 1) {
            inputs.extend_from_slice(&row[..t]);
            targets.extend_from_slice(&row[1..]);
        }
        let start = Instant::now();
        model.zero_grad(be)?;
        model.forward_backward(be, &inputs, &targets, b, t, 1.0)?;
        if let Some(opt) = opt.as_mut() {
            let norm = model.grad_norm(be)?;
            let scale = if norm > 1.0 { 1.0 / norm } else { 1.0 };
            opt.update(be, &mut model, &run, 1e-4, scale)?;
        }
        let ms = start.elapsed().as_secs_f64() * 1e3;
        on_step(i, ms);
        if i >= warmup {
            step_ms.push(ms);
        }
    }
    let median_ms = median(&step_ms);
    let tokens_per_step = b * t;
    let tokens_per_s = tokens_per_step as f64 / (median_ms / 1e3);
    Ok(BenchResult {
        gflops: cfg.flops_per_token(t) * tokens_per_s / 1e9,
        step_ms,
        median_ms,
        tokens_per_step,
        tokens_per_s,
    })
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_and_even_lengths() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
    }
}
