//! `topcoat bench`: training-step throughput on random tokens, the figure docs/PERF.md records.
//!
//! A step is exactly what the training loop does per optimizer step without accumulation:
//! zero the gradients, forward + backward on one micro-batch, the global gradient norm, and an
//! AdamW update. Random tokens make it independent of any data on disk.
//!
//! [`bench_stages`] times the micro-step of several stages side by side on one model shape,
//! interleaved step by step so machine load falls on all of them alike: `pretrain` (every
//! target), `sft` (the first half of each row masked as a prompt) and `dpo` (`B/2` pairs of
//! rows with the prompt half masked: sequence log-probabilities, the sigmoid loss against
//! reference log-probabilities computed once before timing, the per-row backward). Tokens/s
//! counts every position a step runs through the model (`B * T`), so the stages compare at
//! equal batch shape; the `dpo` reference pass (one forward per pair, once per run) is not in
//! the step.

use crate::backend::Backend;
use crate::config::{ModelConfig, RunConfig};
use crate::model::{Gpt, ModelError, Result};
use crate::optim::AdamW;
use crate::rng::Rng;
use crate::stages::dpo::{pair_terms, DpoLoss};
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

/// A stage's micro-step as [`bench_stages`] times it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchStage {
    Pretrain,
    Sft,
    Dpo,
}

impl std::str::FromStr for BenchStage {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "pretrain" => Ok(Self::Pretrain),
            "sft" => Ok(Self::Sft),
            "dpo" => Ok(Self::Dpo),
            other => Err(format!(
                "unknown stage `{other}` (expected pretrain, sft, dpo or all)"
            )),
        }
    }
}

/// One stage's model, optimizer and fixed random batch.
struct StageRun<B: Backend> {
    stage: BenchStage,
    model: Gpt<B>,
    opt: Option<AdamW<B>>,
    inputs: Vec<i32>,
    targets: Vec<i32>,
    reference: Vec<f64>,
    step_ms: Vec<f64>,
}

/// Times `steps` training steps (after `warmup`) of each stage in `stages` on freshly
/// initialised models of one shape, one step of each stage in turn; `b` rows of `t` tokens
/// per step for every stage (`dpo`: `b / 2` pairs, so `b` must be even).
#[allow(clippy::too_many_arguments)]
pub fn bench_stages<B: Backend>(
    be: &B,
    cfg: &ModelConfig,
    stages: &[BenchStage],
    b: usize,
    t: usize,
    warmup: usize,
    steps: usize,
    optimizer: bool,
    mut on_step: impl FnMut(BenchStage, usize, f64),
) -> Result<Vec<BenchResult>> {
    if stages.contains(&BenchStage::Dpo) && b % 2 != 0 {
        return Err(ModelError::Invalid(format!(
            "the dpo bench runs B/2 pairs: B = {b} must be even"
        )));
    }
    let run = RunConfig::default();
    let mut rng = Rng::new(7);
    let mut runs = Vec::with_capacity(stages.len());
    for &stage in stages {
        let tokens: Vec<i32> = (0..b * (t + 1))
            .map(|_| rng.below(cfg.vocab_size as u64) as i32)
            .collect();
        let (mut inputs, mut targets) = (Vec::with_capacity(b * t), Vec::with_capacity(b * t));
        for row in tokens.chunks(t + 1) {
            inputs.extend_from_slice(&row[..t]);
            targets.extend_from_slice(&row[1..]);
        }
        if stage != BenchStage::Pretrain {
            for row in targets.chunks_mut(t) {
                row[..t / 2].fill(-1);
            }
        }
        let mut model = Gpt::init(be, cfg, 1)?;
        let reference = if stage == BenchStage::Dpo {
            model.sequence_logps(be, &inputs, &targets, b, t)?
        } else {
            Vec::new()
        };
        let opt = if optimizer {
            Some(AdamW::new(be, &model)?)
        } else {
            None
        };
        runs.push(StageRun {
            stage,
            model,
            opt,
            inputs,
            targets,
            reference,
            step_ms: Vec::with_capacity(steps),
        });
    }
    for i in 0..warmup + steps.max(1) {
        for r in runs.iter_mut() {
            let start = Instant::now();
            let model = &mut r.model;
            model.zero_grad(be)?;
            match r.stage {
                BenchStage::Pretrain | BenchStage::Sft => {
                    model.forward_backward(be, &r.inputs, &r.targets, b, t, 1.0)?;
                }
                BenchStage::Dpo => {
                    let reference = &r.reference;
                    model.sequence_logps_step(be, &r.inputs, &r.targets, b, t, |lp| {
                        let pairs = b / 2;
                        let mut coef = vec![0.0f32; b];
                        for p in 0..pairs {
                            let (c, j) = (p, p + pairs);
                            let terms = pair_terms(
                                DpoLoss::Sigmoid,
                                0.1,
                                lp[c],
                                lp[j],
                                reference[c],
                                reference[j],
                            );
                            coef[c] = (terms.d_chosen / pairs as f64) as f32;
                            coef[j] = (terms.d_rejected / pairs as f64) as f32;
                        }
                        coef
                    })?;
                }
            }
            if let Some(opt) = r.opt.as_mut() {
                let norm = model.grad_norm(be)?;
                let scale = if norm > 1.0 { 1.0 / norm } else { 1.0 };
                opt.update(be, model, &run, 1e-4, scale)?;
            }
            let ms = start.elapsed().as_secs_f64() * 1e3;
            on_step(r.stage, i, ms);
            if i >= warmup {
                r.step_ms.push(ms);
            }
        }
    }
    Ok(runs
        .into_iter()
        .map(|r| {
            let median_ms = median(&r.step_ms);
            let tokens_per_step = b * t;
            let tokens_per_s = tokens_per_step as f64 / (median_ms / 1e3);
            BenchResult {
                gflops: cfg.flops_per_token(t) * tokens_per_s / 1e9,
                step_ms: r.step_ms,
                median_ms,
                tokens_per_step,
                tokens_per_s,
            }
        })
        .collect())
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
