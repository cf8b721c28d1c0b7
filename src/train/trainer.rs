//! The step loop shared by every stage: gradient accumulation, global-norm clipping, the
//! learning-rate schedule, validation, metrics, progress and checkpoints. A stage supplies
//! only an [`Objective`]: its loss and its data.

use super::checkpoint::{self, TrainState};
use super::metrics::{fmt_duration, Extras, MetricsLog, Progress};
use super::{io_err, Result, TrainError};
use crate::backend::Backend;
use crate::config::RunConfig;
use crate::data::Tokenizer;
use crate::model::{forward::Loss, Gpt};
use crate::optim::{lr_at, AdamW};
use crate::rng::Rng;
use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A stage's loss and data.
pub trait Objective<B: Backend> {
    /// Stage name for logs and checkpoints ("pretrain", "sft", ...).
    fn name(&self) -> &str;
    /// Draws the next micro-batch, runs forward and backward, and accumulates
    /// `loss_scale * gradient` into the model. Returns the micro-batch loss.
    fn micro_step(
        &mut self,
        be: &B,
        model: &mut Gpt<B>,
        rng: &mut Rng,
        loss_scale: f32,
    ) -> Result<Loss>;
    /// Mean validation loss, or `None` when the stage has no validation data.
    fn validate(&mut self, be: &B, model: &mut Gpt<B>) -> Result<Option<f32>>;
    /// Where the data stream stands, for checkpoints.
    fn data_position(&self) -> serde_json::Value;
    /// Restores a position saved by [`Objective::data_position`].
    fn set_data_position(&mut self, pos: &serde_json::Value) -> Result<()>;
    /// Named values (beside the loss) of the work since the last call: the loop calls it after
    /// each step's micro-batches and after each validation, and logs what it returns.
    fn take_metrics(&mut self) -> Extras {
        Extras::default()
    }
}

/// How to run the loop.
pub struct TrainOptions {
    pub run: RunConfig,
    /// Run directory: metrics.jsonl and checkpoints go here.
    pub out_dir: PathBuf,
    /// Continue from the newest checkpoint in `out_dir` if there is one.
    pub resume: bool,
    /// Keep only the newest this many checkpoints (0 keeps all).
    pub keep_checkpoints: usize,
    /// No progress output (tests).
    pub quiet: bool,
}

/// What a run did.
#[derive(Clone, Debug, Default)]
pub struct TrainSummary {
    /// `(step, mean training loss of that step)` for the steps this call ran.
    pub train_losses: Vec<(usize, f32)>,
    /// `(step, validation loss)`; step 0 is before any update.
    pub val_losses: Vec<(usize, f32)>,
    pub final_step: usize,
    pub tokens_per_s: f64,
    pub elapsed: Duration,
    pub last_checkpoint: Option<PathBuf>,
}

/// Trains `model` with `objective` for `opts.run.max_steps` optimizer steps (fewer if resuming).
pub fn train<B: Backend>(
    be: &B,
    model: &mut Gpt<B>,
    objective: &mut dyn Objective<B>,
    tokenizer: &Tokenizer,
    opts: &TrainOptions,
) -> Result<TrainSummary> {
    let run = &opts.run;
    let accum = run.grad_accum_steps()?;
    std::fs::create_dir_all(&opts.out_dir).map_err(io_err(&opts.out_dir))?;
    let progress = Progress::new(opts.quiet, 10);

    let mut rng = Rng::new(run.seed ^ 0x5EED);
    let mut start_step = 0;
    let mut tokens_seen = 0u64;
    let mut prior_elapsed = 0.0;
    let mut opt = AdamW::new(be, model)?;
    if opts.resume {
        if let Some(dir) = checkpoint::latest(&opts.out_dir)? {
            let resumed = checkpoint::load_model(be, &dir, Some(&model.cfg))?;
            let (o, state) = checkpoint::load_training(be, &dir, &resumed)?;
            *model = resumed;
            opt = o;
            objective.set_data_position(&state.data)?;
            rng = state.rng;
            start_step = state.step;
            tokens_seen = state.tokens_seen;
            prior_elapsed = state.elapsed_s;
            progress.note(&format!(
                "resuming from {} (step {start_step})",
                dir.display()
            ));
        }
    }
    let mut log = MetricsLog::open(&opts.out_dir, opts.resume.then_some(start_step))?;
    let mut summary = TrainSummary {
        final_step: start_step,
        ..Default::default()
    };

    let validate = |model: &mut Gpt<B>,
                    objective: &mut dyn Objective<B>,
                    step: usize,
                    log: &mut MetricsLog,
                    summary: &mut TrainSummary|
     -> Result<()> {
        if let Some(val) = objective.validate(be, model)? {
            let extras = objective.take_metrics();
            let mut record = json!({"step": step, "val_loss": val});
            extras.add_to(&mut record, "val_");
            log.write(&record)?;
            summary.val_losses.push((step, val));
            progress.note(&format!(
                "step {step:>6} | val loss {val:.4}{}",
                extras.progress_text("val ")
            ));
        }
        Ok(())
    };
    if start_step == 0 && run.val_every > 0 {
        validate(model, objective, 0, &mut log, &mut summary)?;
    }

    let started = Instant::now();
    let mut run_tokens = 0u64;
    let save = |model: &Gpt<B>,
                opt: &AdamW<B>,
                objective: &dyn Objective<B>,
                rng: &Rng,
                step: usize,
                tokens_seen: u64,
                elapsed: f64|
     -> Result<PathBuf> {
        let state = TrainState {
            step,
            rng: rng.clone(),
            data: objective.data_position(),
            run: run.clone(),
            tokens_seen,
            elapsed_s: elapsed,
            stage: objective.name().to_string(),
        };
        let dir = checkpoint::save(
            be,
            &checkpoint::dir_for(&opts.out_dir, step),
            model,
            tokenizer,
            Some((opt, &state)),
        )?;
        checkpoint::prune(&opts.out_dir, opts.keep_checkpoints)?;
        Ok(dir)
    };

    for step in start_step..run.max_steps {
        let step_start = Instant::now();
        model.zero_grad(be)?;
        let mut loss_sum = 0.0f64;
        let mut step_tokens = 0usize;
        for _ in 0..accum {
            let loss = objective.micro_step(be, model, &mut rng, 1.0 / accum as f32)?;
            loss_sum += loss.mean as f64;
            step_tokens += loss.tokens;
        }
        let loss = (loss_sum / accum as f64) as f32;
        let extras = objective.take_metrics();
        let norm = model.grad_norm(be)?;
        if !loss.is_finite() || !norm.is_finite() {
            return Err(TrainError::Diverged {
                step: step + 1,
                what: format!("loss {loss}, gradient norm {norm}"),
            });
        }
        let grad_scale = if run.grad_clip > 0.0 && norm > run.grad_clip {
            run.grad_clip / norm
        } else {
            1.0
        };
        let lr = lr_at(
            step,
            run.learning_rate,
            run.warmup_steps,
            run.max_steps,
            run.min_lr_ratio,
        );
        opt.update(be, model, run, lr, grad_scale)?;

        let done = step + 1;
        tokens_seen += step_tokens as u64;
        run_tokens += step_tokens as u64;
        let elapsed = started.elapsed();
        let tok_s = step_tokens as f64 / step_start.elapsed().as_secs_f64().max(1e-9);
        let mut record = json!({
            "step": done, "loss": loss, "lr": lr, "grad_norm": norm, "tokens": step_tokens,
            "tokens_per_s": tok_s, "elapsed_s": prior_elapsed + elapsed.as_secs_f64(),
        });
        extras.add_to(&mut record, "");
        log.write(&record)?;
        summary.train_losses.push((done, loss));
        let per_step = elapsed.as_secs_f64() / (done - start_step) as f64;
        let eta = Duration::from_secs_f64(per_step * (run.max_steps - done) as f64);
        progress.step(
            done,
            run.max_steps,
            &format!(
                "{} step {done:>6}/{} | loss {loss:.4}{} | lr {lr:.2e} | norm {norm:.3} | {:.0} tok/s | ETA {}",
                objective.name(),
                run.max_steps,
                extras.progress_text(""),
                tok_s,
                fmt_duration(eta)
            ),
        );

        if run.val_every > 0 && (done % run.val_every == 0 || done == run.max_steps) {
            validate(model, objective, done, &mut log, &mut summary)?;
        }
        if (run.checkpoint_every > 0 && done % run.checkpoint_every == 0) || done == run.max_steps {
            let dir = save(
                model,
                &opt,
                objective,
                &rng,
                done,
                tokens_seen,
                prior_elapsed + elapsed.as_secs_f64(),
            )?;
            progress.note(&format!("saved {}", dir.display()));
            summary.last_checkpoint = Some(dir);
        }
        summary.final_step = done;
    }
    summary.elapsed = started.elapsed();
    summary.tokens_per_s = run_tokens as f64 / summary.elapsed.as_secs_f64().max(1e-9);
    Ok(summary)
}
