//! `topcoat bench`: training-step throughput on random tokens, and generation speed with and
//! without the KV cache; the figures docs/PERF.md records.
//!
//! A step is exactly what the training loop does per optimizer step without accumulation:
//! zero the gradients, forward + backward on one micro-batch, the global gradient norm, and an
//! AdamW update. Random tokens make it independent of any data on disk.
//!
//! Generation (`bench --generate`): one row, a random prompt, greedy decoding of a fixed number
//! of new tokens (no stop token), timed end to end (prefill included) once with the KV cache
//! ([`crate::generate::generate`]) and once rerunning the whole context per token
//! ([`crate::generate::generate_uncached`]); tokens/s is new tokens over wall time.
//!
//! [`bench_stages`] times the micro-step of several stages side by side on one model shape,
//! interleaved step by step so machine load falls on all of them alike: `pretrain` (every
//! target), `sft` (the first half of each row masked as a prompt) and `dpo` (`B/2` pairs of
//! rows with the prompt half masked: sequence log-probabilities, the sigmoid loss against
//! reference log-probabilities computed once before timing, the per-row backward). Tokens/s
//! counts every position a step runs through the model (`B * T`), so the stages compare at
//! equal batch shape; the `dpo` reference pass (one forward per pair, once per run) is not in
//! the step.

use crate::backend::{Backend, Role};
use crate::config::{ModelConfig, RunConfig};
use crate::dist::{DistError, Solo};
use crate::generate::{self, SampleOptions};
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
/// times the last `steps`. `optimizer: false` times forward + backward only. `recompute` is
/// the activation recompute level ([`Gpt::set_recompute`]).
#[allow(clippy::too_many_arguments)]
pub fn bench_train<B: Backend>(
    be: &B,
    (cfg, recompute): (&ModelConfig, u8),
    b: usize,
    t: usize,
    warmup: usize,
    steps: usize,
    optimizer: bool,
    mut on_step: impl FnMut(usize, f64),
) -> Result<BenchResult> {
    let mut model = Gpt::init(be, cfg, 1)?;
    model.set_recompute(recompute)?;
    let mut opt = BenchOptimizer::new(be, &mut model, optimizer)?;
    let mut rng = Rng::new(7);
    let mut step_ms = Vec::with_capacity(steps);
    let mut peak_memory_bytes = be.memory_in_use();
    for i in 0..warmup + steps.max(1) {
        let (inputs, targets) = random_rows(&mut rng, cfg.vocab_size, b, t);
        let start = Instant::now();
        model.zero_grad(be)?;
        model.forward_backward(be, &inputs, &targets, b, t, 1.0)?;
        if let Some(opt) = opt.as_mut() {
            opt.step(be, &mut model)?;
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
    Ok(BenchResult::of_steps(cfg, b, t, step_ms, peak_memory_bytes))
}

/// `b` rows of `t + 1` random tokens, as inputs and next-token targets.
fn random_rows(rng: &mut Rng, vocab: usize, b: usize, t: usize) -> (Vec<i32>, Vec<i32>) {
    let tokens: Vec<i32> = (0..b * (t + 1))
        .map(|_| rng.below(vocab as u64) as i32)
        .collect();
    let (mut inputs, mut targets) = (Vec::with_capacity(b * t), Vec::with_capacity(b * t));
    for row in tokens.chunks(t + 1) {
        inputs.extend_from_slice(&row[..t]);
        targets.extend_from_slice(&row[1..]);
    }
    (inputs, targets)
}

/// The bench's optimizer: AdamW with the default run config's hyper-parameters, made before
/// the timed steps (none when the bench times forward + backward only).
struct BenchOptimizer<B: Backend> {
    adamw: AdamW<B>,
    run: RunConfig,
}

impl<B: Backend> BenchOptimizer<B> {
    fn new(be: &B, model: &mut Gpt<B>, optimizer: bool) -> Result<Option<Self>> {
        if !optimizer {
            return Ok(None);
        }
        Ok(Some(Self {
            adamw: AdamW::new(be, &Solo::new(), model, 0).map_err(solo_error)?,
            run: RunConfig::default(),
        }))
    }

    /// The loop's optimizer step: the global gradient norm clipped to 1, then AdamW.
    fn step(&mut self, be: &B, model: &mut Gpt<B>) -> Result<()> {
        let norm = model.grad_norm(be)?;
        let scale = if norm > 1.0 { 1.0 / norm } else { 1.0 };
        self.adamw
            .update(be, &Solo::new(), model, &self.run, 1e-4, scale)
            .map_err(solo_error)
    }
}

/// The bench's optimizer runs on one process: its only failures are the backend's.
fn solo_error(e: DistError) -> ModelError {
    match e {
        DistError::Backend(e) => e.into(),
        e => ModelError::Invalid(e.to_string()),
    }
}

impl BenchResult {
    /// The figures of timed steps of `b` rows of `t` tokens.
    fn of_steps(
        cfg: &ModelConfig,
        b: usize,
        t: usize,
        step_ms: Vec<f64>,
        peak_memory_bytes: Option<usize>,
    ) -> Self {
        let median_ms = median(&step_ms);
        let tokens_per_step = b * t;
        let tokens_per_s = tokens_per_step as f64 / (median_ms / 1e3);
        BenchResult {
            gflops: cfg.flops_per_token(t) * tokens_per_s / 1e9,
            step_ms,
            median_ms,
            tokens_per_step,
            tokens_per_s,
            peak_memory_bytes,
        }
    }
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

/// What a generation benchmark measured (wall seconds per run, after one warm-up run each).
#[derive(Clone, Debug)]
pub struct GenBenchResult {
    pub cached_s: Vec<f64>,
    pub uncached_s: Vec<f64>,
    pub new_tokens: usize,
    pub cached_tokens_per_s: f64,
    pub uncached_tokens_per_s: f64,
    /// Whether both paths produced the same greedy tokens.
    pub same_tokens: bool,
}

/// Greedy generation of `new_tokens` after a random `prompt_len`-token prompt, with and
/// without the KV cache, `runs` timed runs each (medians reported). `on_run(name, seconds)`
/// sees every run, warm-ups included.
pub fn bench_generate<B: Backend>(
    be: &B,
    cfg: &ModelConfig,
    prompt_len: usize,
    new_tokens: usize,
    runs: usize,
    mut on_run: impl FnMut(&str, f64),
) -> Result<GenBenchResult> {
    let mut model = Gpt::init(be, cfg, 1)?;
    let mut rng = Rng::new(11);
    let prompt: Vec<u32> = (0..prompt_len.max(1))
        .map(|_| rng.below(cfg.vocab_size as u64) as u32)
        .collect();
    let opts = SampleOptions {
        max_tokens: new_tokens,
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        seed: 1,
        stop: None,
    };
    let (mut cached_s, mut uncached_s) = (Vec::new(), Vec::new());
    let (mut cached_tokens, mut uncached_tokens) = (Vec::new(), Vec::new());
    for i in 0..runs.max(1) + 1 {
        let start = Instant::now();
        cached_tokens = generate::generate(be, &model, &prompt, &opts, |_| {})?;
        let s = start.elapsed().as_secs_f64();
        on_run(if i == 0 { "cached (warm-up)" } else { "cached" }, s);
        if i > 0 {
            cached_s.push(s);
        }
        let start = Instant::now();
        uncached_tokens = generate::generate_uncached(be, &mut model, &prompt, &opts, |_| {})?;
        let s = start.elapsed().as_secs_f64();
        on_run(
            if i == 0 {
                "uncached (warm-up)"
            } else {
                "uncached"
            },
            s,
        );
        if i > 0 {
            uncached_s.push(s);
        }
    }
    Ok(GenBenchResult {
        cached_tokens_per_s: new_tokens as f64 / median(&cached_s),
        uncached_tokens_per_s: new_tokens as f64 / median(&uncached_s),
        cached_s,
        uncached_s,
        new_tokens,
        same_tokens: cached_tokens == uncached_tokens,
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
struct StageBench<B: Backend> {
    stage: BenchStage,
    model: Gpt<B>,
    opt: Option<BenchOptimizer<B>>,
    inputs: Vec<i32>,
    targets: Vec<i32>,
    /// DPO: the reference's sequence log-probabilities of the batch (the fresh model's).
    reference: Vec<f64>,
    step_ms: Vec<f64>,
    peak_memory_bytes: Option<usize>,
}

impl<B: Backend> StageBench<B> {
    /// A fresh model and its batch: `sft` and `dpo` mask the first half of each row as a prompt.
    fn new(
        be: &B,
        cfg: &ModelConfig,
        stage: BenchStage,
        (b, t): (usize, usize),
        rng: &mut Rng,
        optimizer: bool,
    ) -> Result<Self> {
        let (inputs, mut targets) = random_rows(rng, cfg.vocab_size, b, t);
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
        let opt = BenchOptimizer::new(be, &mut model, optimizer)?;
        Ok(Self {
            stage,
            model,
            opt,
            inputs,
            targets,
            reference,
            step_ms: Vec::new(),
            peak_memory_bytes: None,
        })
    }

    /// One timed step; returns its milliseconds.
    fn step(&mut self, be: &B, (b, t): (usize, usize)) -> Result<f64> {
        let start = Instant::now();
        let model = &mut self.model;
        model.zero_grad(be)?;
        match self.stage {
            BenchStage::Pretrain | BenchStage::Sft => {
                model.forward_backward(be, &self.inputs, &self.targets, b, t, 1.0)?;
            }
            BenchStage::Dpo => {
                let reference = &self.reference;
                model.sequence_logps_step(be, &self.inputs, &self.targets, b, t, |lp| {
                    dpo_coefficients(lp, reference)
                })?;
            }
        }
        if let Some(opt) = self.opt.as_mut() {
            opt.step(be, model)?;
        }
        be.synchronize()?;
        let ms = start.elapsed().as_secs_f64() * 1e3;
        self.peak_memory_bytes = self.peak_memory_bytes.max(be.memory_in_use());
        Ok(ms)
    }
}

/// The sigmoid DPO loss's per-row gradient weights for rows `[chosen..., rejected...]`
/// (beta 0.1), averaged over the pairs.
fn dpo_coefficients(lp: &[f64], reference: &[f64]) -> Vec<f32> {
    let rows = lp.len();
    let pairs = rows / 2;
    let mut coef = vec![0.0f32; rows];
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
}

/// Times `steps` training steps (after `warmup`) of each stage in `stages` on freshly
/// initialised models of one shape, one step of each stage in turn; `b` rows of `t` tokens
/// per step for every stage (`dpo`: `b / 2` pairs, so `b` must be even).
#[allow(clippy::too_many_arguments)]
pub fn bench_stages<B: Backend>(
    be: &B,
    (cfg, recompute): (&ModelConfig, u8),
    stages: &[BenchStage],
    b: usize,
    t: usize,
    warmup: usize,
    steps: usize,
    optimizer: bool,
    mut on_step: impl FnMut(BenchStage, usize, f64),
) -> Result<Vec<BenchResult>> {
    if stages.contains(&BenchStage::Dpo) && !b.is_multiple_of(2) {
        return Err(ModelError::Invalid(format!(
            "the dpo bench runs B/2 pairs: B = {b} must be even"
        )));
    }
    let mut rng = Rng::new(7);
    let mut runs = Vec::with_capacity(stages.len());
    for &stage in stages {
        runs.push(StageBench::new(
            be,
            cfg,
            stage,
            (b, t),
            &mut rng,
            optimizer,
        )?);
        runs.last_mut()
            .expect("just pushed")
            .model
            .set_recompute(recompute)?;
    }
    for i in 0..warmup + steps.max(1) {
        for r in runs.iter_mut() {
            let ms = r.step(be, (b, t))?;
            on_step(r.stage, i, ms);
            if i >= warmup {
                r.step_ms.push(ms);
            }
        }
    }
    Ok(runs
        .into_iter()
        .map(|r| BenchResult::of_steps(cfg, b, t, r.step_ms, r.peak_memory_bytes))
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
