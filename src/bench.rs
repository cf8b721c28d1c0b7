//! `topcoat bench`: training-step throughput on random tokens, the figure docs/PERF.md records.
//!
//! A step is exactly what the training loop does per optimizer step without accumulation:
//! zero the gradients, forward + backward on one micro-batch, the global gradient norm, and an
//! AdamW update. Random tokens make it independent of any data on disk.

use crate::backend::{Backend, Role};
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
    /// Most device memory in use after any step (None where the backend cannot tell).
    pub peak_memory_bytes: Option<usize>,
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
    let mut peak_memory_bytes = be.memory_in_use();
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
        // Ops may still be queued on the device: a step ends when they have finished.
        be.synchronize()?;
        let ms = start.elapsed().as_secs_f64() * 1e3;
        peak_memory_bytes = peak_memory_bytes.max(be.memory_in_use());
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
        peak_memory_bytes,
    })
}

/// The backend's dense matrix-product rate in TFLOP/s, the MFU denominator when none is given:
/// the median of 10 timed `[n, n] x [n, n]` products on random inputs, after 2 warm-ups.
pub fn measure_matmul_tflops<B: Backend>(be: &B, n: usize) -> Result<f64> {
    let mut rng = Rng::new(3);
    let mut random = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.normal()).collect() };
    let inp = be.upload(&random(n * n), Role::Activation)?;
    let weight = be.upload(&random(n * n), Role::Param)?;
    let mut out = be.zeros(n * n, Role::Activation)?;
    let mut ms = Vec::new();
    for i in 0..12 {
        be.synchronize()?;
        let start = Instant::now();
        be.matmul_forward(&mut out, &inp, &weight, None, n, n, n)?;
        be.synchronize()?;
        if i >= 2 {
            ms.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(2.0 * (n as f64).powi(3) / (median(&ms) / 1e3) / 1e12)
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
