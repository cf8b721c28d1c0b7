//! The step loop shared by every stage: gradient accumulation, global-norm clipping, the
//! learning-rate schedule, validation, metrics, progress and checkpoints. A stage supplies
//! only an [`Objective`]: its loss and its data.
//!
//! Data-parallel: every rank runs `accum / world_size` micro-batches per step (the global batch
//! is `total_batch_tokens`), the gradients are summed across ranks bucket by bucket during the
//! last backward pass (`grad_sync.rs`), losses, token counts, metrics and validation sums are
//! reduced in rank order, and the gradient norm is taken after the sum, so every rank makes the
//! same decisions (clipping, the divergence guard) and all stop together. Rank 0 alone writes
//! metrics.jsonl, checkpoints and the console.

use super::checkpoint::{self, CheckpointError, TrainState};
use super::grad_sync::GradSync;
use super::metrics::{fmt_duration, Extras, MetricsLog, Progress, ValPartial};
use super::run_dir;
use super::{io_err, Result, TrainError};
use crate::backend::Backend;
use crate::config::{ConfigError, RunConfig};
use crate::data::Tokenizer;
use crate::dist::{Collective, Solo};
use crate::model::{forward::Loss, Gpt};
use crate::optim::{lr_at, AdamW};
use crate::rng::Rng;
use serde_json::json;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// The collective of a process on its own, for callers of [`train`] outside a launcher.
pub fn solo<B: Backend>() -> Rc<dyn Collective<B>> {
    Rc::new(Solo::new())
}

/// `rank:step`: makes that rank abort (as a crash would) at the start of that 0-based step, so
/// the tests can check what the other ranks do when one dies.
pub const FAULT_ENV: &str = "TOPCOAT_TEST_ABORT_AT";

/// Micro-batches each of `world` ranks runs per step: `total_batch_tokens` is the global batch,
/// so it must be a multiple of `batch_size * seq_len * world` (0: one micro-batch per rank).
pub fn local_accum(run: &RunConfig, world: usize) -> std::result::Result<usize, ConfigError> {
    let global = run.grad_accum_steps()?;
    if run.total_batch_tokens == 0 {
        return Ok(1);
    }
    if !global.is_multiple_of(world) {
        let per = run.batch_size * run.seq_len * world;
        return Err(ConfigError::Invalid(format!(
            "total_batch_tokens {} is not a multiple of batch_size * seq_len * world_size = {} * \
             {} * {world} = {per}: every rank runs the same number of micro-batches (pick a \
             multiple of {per}, or 0 for one micro-batch per rank)",
            run.total_batch_tokens, run.batch_size, run.seq_len
        )));
    }
    Ok(global / world)
}

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
    /// This rank's share of the validation set (batches `rank, rank + W, ...`): the summed loss
    /// and its count, or `None` when the stage has no validation data (then on every rank). A
    /// rank whose share is empty returns a zero partial, so every rank joins the reduction.
    fn validate(&mut self, be: &B, model: &mut Gpt<B>) -> Result<Option<ValPartial>>;
    /// Where the data stream stands, for checkpoints.
    fn data_position(&self) -> serde_json::Value;
    /// Restores a position saved by [`Objective::data_position`].
    fn set_data_position(&mut self, pos: &serde_json::Value) -> Result<()>;
    /// Whether a loss far above the run's lowest means the run diverged (the guard of
    /// `RunConfig::divergence_factor`): true for a loss that measures fit (cross-entropy,
    /// Bradley-Terry, DPO); false for one whose scale follows each batch (a policy-gradient
    /// surrogate), which only a non-finite value stops.
    fn loss_spike_means_divergence(&self) -> bool {
        true
    }
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
pub fn train<B: Backend + 'static>(
    be: &B,
    comm: &Rc<dyn Collective<B>>,
    model: &mut Gpt<B>,
    objective: &mut dyn Objective<B>,
    tokenizer: &Tokenizer,
    opts: &TrainOptions,
) -> Result<TrainSummary> {
    let mut run = TrainLoop::open(be, comm, model, objective, tokenizer, opts)?;
    if run.start_step == 0 && opts.run.val_every > 0 {
        run.validate(0)?;
    }
    // The clock starts after the step-0 validation: throughput counts training only.
    run.started = Instant::now();
    for step in run.start_step..opts.run.max_steps {
        if run.fault_at == Some(step) {
            eprintln!(
                "rank {}: aborting at step {step} ({FAULT_ENV})",
                run.comm.rank()
            );
            std::process::abort();
        }
        run.step(step)?;
    }
    Ok(run.finish())
}

/// What one optimizer step did, for its metrics record and progress line.
struct StepOutcome {
    /// Mean micro-batch loss.
    loss: f32,
    tokens: usize,
    extras: Extras,
    /// Gradient norm before clipping.
    norm: f32,
    lr: f32,
}

/// The loop's state between steps: the model, its optimizer and generator, where the run
/// stands, and where it reports.
struct TrainLoop<'a, B: Backend> {
    be: &'a B,
    comm: &'a dyn Collective<B>,
    sync: GradSync<B>,
    /// The step at which this rank aborts ([`FAULT_ENV`]).
    fault_at: Option<usize>,
    model: &'a mut Gpt<B>,
    objective: &'a mut dyn Objective<B>,
    tokenizer: &'a Tokenizer,
    opts: &'a TrainOptions,
    accum: usize,
    opt: AdamW<B>,
    rng: Rng,
    progress: Progress,
    /// Rank 0's metrics.jsonl (`None` on the other ranks).
    log: Option<MetricsLog>,
    summary: TrainSummary,
    /// The first step this call runs (after a resumed checkpoint's).
    start_step: usize,
    /// Tokens trained on since step 0, resumed runs included.
    tokens_seen: u64,
    /// Seconds of training before this call (from a resumed checkpoint).
    prior_elapsed: f64,
    started: Instant,
    /// Tokens trained on by this call.
    run_tokens: u64,
    /// The lowest step loss of this call, for the divergence guard.
    lowest_loss: Option<f32>,
    /// Checkpoints saved since the last accepted step loss: their weights are known good only
    /// once the next step's loss is seen.
    pending: Vec<PathBuf>,
    /// The newest checkpoint whose weights produced an accepted loss (or the resumed one).
    last_good: Option<PathBuf>,
}

impl<'a, B: Backend + 'static> TrainLoop<'a, B> {
    /// Makes the run directory and a fresh optimizer and generator, or, resuming, restores the
    /// newest checkpoint's model, optimizer, generator and data position.
    fn open(
        be: &'a B,
        comm: &'a Rc<dyn Collective<B>>,
        model: &'a mut Gpt<B>,
        objective: &'a mut dyn Objective<B>,
        tokenizer: &'a Tokenizer,
        opts: &'a TrainOptions,
    ) -> Result<Self> {
        let run = &opts.run;
        let writer = comm.info().is_writer();
        let accum = local_accum(run, comm.world_size())?;
        if writer {
            std::fs::create_dir_all(&opts.out_dir).map_err(io_err(&opts.out_dir))?;
        }
        let progress = Progress::new(opts.quiet || !writer, 10);
        let mut rng = Rng::new(run.seed ^ 0x5EED);
        let (mut start_step, mut tokens_seen, mut prior_elapsed) = (0, 0u64, 0.0);
        let mut opt = AdamW::new(be, &**comm, model, run.zero)?;
        let mut last_good = None;
        if opts.resume {
            if let Some(dir) = checkpoint::latest(&opts.out_dir)? {
                let (resumed, o, state) = checkpoint::resume_ranked(
                    be,
                    &**comm,
                    &dir,
                    &model.cfg,
                    objective.name(),
                    run.zero,
                )?;
                let changes = run_dir::resume_changes(&dir, state.step, &state.run, run)?;
                *model = resumed;
                opt = o;
                objective.set_data_position(&state.data)?;
                rng = state.rng;
                start_step = state.step;
                tokens_seen = state.tokens_seen;
                prior_elapsed = state.elapsed_s;
                let with = if changes.is_empty() {
                    String::new()
                } else {
                    format!(" with {}", changes.join(", "))
                };
                progress.note(&format!(
                    "resuming from {} (step {start_step}){with}",
                    dir.display()
                ));
                last_good = Some(dir);
            }
        }
        if let Some(line) = opt.zero_line(be) {
            progress.note(&line);
        }
        // A resume with no checkpoint to resume from starts afresh, metrics included.
        let log = if writer {
            let resumed = last_good.is_some().then_some(start_step);
            Some(MetricsLog::open(&opts.out_dir, resumed)?)
        } else {
            None
        };
        let fault_at = std::env::var(FAULT_ENV).ok().and_then(|v| {
            let (r, s) = v.split_once(':')?;
            (r.parse::<usize>().ok()? == comm.rank()).then_some(s.parse().ok()?)
        });
        Ok(Self {
            be,
            comm: &**comm,
            sync: GradSync::new(comm.clone(), accum, model.grads.len()),
            fault_at,
            model,
            objective,
            tokenizer,
            opts,
            accum,
            opt,
            rng,
            progress,
            log,
            summary: TrainSummary {
                final_step: start_step,
                ..Default::default()
            },
            start_step,
            tokens_seen,
            prior_elapsed,
            started: Instant::now(),
            run_tokens: 0,
            lowest_loss: None,
            pending: Vec::new(),
            last_good,
        })
    }

    /// Runs optimizer step `step` (0-based), then logs it, validates and checkpoints as due.
    fn step(&mut self, step: usize) -> Result<()> {
        let step_start = Instant::now();
        let outcome = self.accumulate_and_update(step)?;
        let done = step + 1;
        self.tokens_seen += outcome.tokens as u64;
        self.run_tokens += outcome.tokens as u64;
        // One reading of the clock serves the record, the ETA and a checkpoint's elapsed time.
        let elapsed = self.started.elapsed();
        self.report_step(done, &outcome, elapsed, step_start.elapsed())?;
        let run = &self.opts.run;
        if run.val_every > 0 && (done.is_multiple_of(run.val_every) || done == run.max_steps) {
            self.validate(done)?;
        }
        if (run.checkpoint_every > 0 && done.is_multiple_of(run.checkpoint_every))
            || done == run.max_steps
        {
            let saving = Instant::now();
            let dir = self.save(done, self.prior_elapsed + elapsed.as_secs_f64())?;
            // The cost of a save (write, fsync, checksums) is part of the run's time budget.
            self.progress.note(&format!(
                "saved {} ({:.1} MB in {:.2} s)",
                dir.display(),
                dir_bytes(&dir) as f64 / 1e6,
                saving.elapsed().as_secs_f64()
            ));
            self.summary.last_checkpoint = Some(dir);
        }
        self.summary.final_step = done;
        Ok(())
    }

    /// The step's micro-batches (each adding `1 / accum` of its gradient), then the clipped
    /// AdamW update at the scheduled learning rate, unless the divergence guard stops the run.
    fn accumulate_and_update(&mut self, step: usize) -> Result<StepOutcome> {
        let (be, accum, world) = (self.be, self.accum, self.comm.world_size());
        let scale = 1.0 / (accum * world) as f32;
        let mut loss_sum = 0.0f64;
        let mut tokens = 0usize;
        for k in 0..accum {
            // A mask per micro-batch that a resumed run draws again (each rank its own).
            let micro = (self.comm.rank() * accum + k) as u64;
            let seed = lora_dropout_seed(self.opts.run.seed, step as u64, micro);
            self.model.set_lora_dropout_seed(seed);
            let (objective, rng) = (&mut *self.objective, &mut self.rng);
            let loss = self.sync.micro_batch(be, self.model, k, |model| {
                objective.micro_step(be, model, rng, scale)
            })?;
            loss_sum += loss.mean as f64;
            tokens += loss.tokens;
        }
        // Losses and token counts summed in rank order, metrics averaged over the ranks.
        let mut extras = self.objective.take_metrics();
        let mut host = vec![loss_sum, tokens as f64];
        host.extend(extras.0.iter().map(|&(_, v)| v as f64));
        self.comm.all_reduce_host(&mut host)?;
        let loss = (host[0] / (accum * world) as f64) as f32;
        let tokens = host[1] as usize;
        for ((_, v), sum) in extras.0.iter_mut().zip(&host[2..]) {
            *v = (sum / world as f64) as f32;
        }
        self.sync.wait(be)?;
        let norm = self.model.grad_norm(be)?;
        self.guard(step + 1, loss, norm)?;
        let run = &self.opts.run;
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
        self.opt
            .update(be, self.comm, self.model, run, lr, grad_scale)?;
        Ok(StepOutcome {
            loss,
            tokens,
            extras,
            norm,
            lr,
        })
    }

    /// Writes step `done`'s metrics record and progress line (`elapsed`: this call's training
    /// time so far; `took`: the step's).
    fn report_step(
        &mut self,
        done: usize,
        o: &StepOutcome,
        elapsed: Duration,
        took: Duration,
    ) -> Result<()> {
        let run = &self.opts.run;
        let tok_s = o.tokens as f64 / took.as_secs_f64().max(1e-9);
        let mut record = json!({
            "step": done, "loss": o.loss, "lr": o.lr, "grad_norm": o.norm, "tokens": o.tokens,
            "tokens_per_s": tok_s, "elapsed_s": self.prior_elapsed + elapsed.as_secs_f64(),
        });
        o.extras.add_to(&mut record, "");
        if let Some(log) = &mut self.log {
            log.write(&record)?;
        }
        self.summary.train_losses.push((done, o.loss));
        let per_step = elapsed.as_secs_f64() / (done - self.start_step) as f64;
        let eta = Duration::from_secs_f64(per_step * (run.max_steps - done) as f64);
        self.progress.step(
            done,
            run.max_steps,
            &format!(
                "{} step {done:>6}/{} | loss {:.4}{} | lr {:.2e} | norm {:.3} | {:.0} tok/s | ETA {}",
                self.objective.name(),
                run.max_steps,
                o.loss,
                o.extras.progress_text(""),
                o.lr,
                o.norm,
                tok_s,
                fmt_duration(eta)
            ),
        );
        Ok(())
    }

    /// Validates after `step` steps, when the objective has validation data, and logs it.
    fn validate(&mut self, step: usize) -> Result<()> {
        let partial = self.objective.validate(self.be, self.model)?;
        let mut extras = self.objective.take_metrics();
        let partial = if self.comm.world_size() == 1 {
            partial
        } else {
            // The ranks' partial sums added in rank order; metrics averaged over the ranks.
            let p = partial.unwrap_or_default();
            let mut host = vec![p.sum, p.count, partial.is_some() as u8 as f64];
            host.extend(extras.0.iter().map(|&(_, v)| v as f64));
            self.comm.all_reduce_host(&mut host)?;
            let world = self.comm.world_size() as f64;
            for ((_, v), sum) in extras.0.iter_mut().zip(&host[3..]) {
                *v = (sum / world) as f32;
            }
            (host[2] > 0.0).then_some(ValPartial {
                sum: host[0],
                count: host[1],
            })
        };
        if let Some(val) = partial.and_then(|p| p.mean()) {
            let mut record = json!({"step": step, "val_loss": val});
            extras.add_to(&mut record, "val_");
            if let Some(log) = &mut self.log {
                log.write(&record)?;
            }
            self.summary.val_losses.push((step, val));
            self.progress.note(&format!(
                "step {step:>6} | val loss {val:.4}{}",
                extras.progress_text("val ")
            ));
        }
        Ok(())
    }

    /// The divergence guard, before step `done`'s update: a non-finite loss or gradient norm,
    /// or a loss more than `divergence_factor * max(1, |lowest|)` above the lowest of this
    /// call, stops the run. An accepted loss makes the checkpoints saved before it known good.
    fn guard(&mut self, done: usize, loss: f32, norm: f32) -> Result<()> {
        let factor = if self.objective.loss_spike_means_divergence() {
            self.opts.run.divergence_factor
        } else {
            0.0
        };
        let spiked = |lo: f32| factor > 0.0 && loss - lo > factor * lo.abs().max(1.0);
        let bad = !loss.is_finite() || !norm.is_finite() || self.lowest_loss.is_some_and(spiked);
        if bad {
            let lowest = self
                .lowest_loss
                .map_or(String::new(), |lo| format!(" (lowest so far {lo})"));
            return Err(self.diverged(done, format!("loss {loss}{lowest}, gradient norm {norm}")));
        }
        self.lowest_loss = Some(self.lowest_loss.map_or(loss, |lo| lo.min(loss)));
        if let Some(newest) = self.pending.pop() {
            self.last_good = Some(newest);
        }
        self.pending.clear();
        Ok(())
    }

    /// The error of a run that diverged at step `done`: the checkpoints not yet known good are
    /// moved aside (`ckpt_<step>.diverged`, which `--resume` does not pick), and the message
    /// says where the last good one is.
    fn diverged(&mut self, done: usize, what: String) -> TrainError {
        let mut aside = Vec::new();
        for dir in self.pending.drain(..) {
            match run_dir::set_aside(&dir) {
                Ok(to) => aside.push(to.display().to_string()),
                Err(e) => aside.push(format!("{} (could not be moved aside: {e})", dir.display())),
            }
        }
        let aside = if aside.is_empty() {
            String::new()
        } else {
            format!(
                "; the checkpoints written since are set aside as {}",
                aside.join(", ")
            )
        };
        let then = match &self.last_good {
            Some(good) => format!(
                "the last good checkpoint is {}; lower the learning rate and resume with \
                 --resume{aside}",
                good.display()
            ),
            None => format!(
                "no checkpoint of this run is known good; lower the learning rate and start \
                 over with --overwrite{aside}"
            ),
        };
        TrainError::Diverged {
            step: done,
            what,
            then,
        }
    }

    /// Checkpoints the run after `step` steps (`elapsed_s` seconds of training in all) and
    /// prunes old checkpoints (never the last known-good one); returns the directory.
    fn save(&mut self, step: usize, elapsed_s: f64) -> Result<PathBuf> {
        let opts = self.opts;
        let state = TrainState {
            step,
            rng: self.rng.clone(),
            data: self.objective.data_position(),
            run: opts.run.clone(),
            tokens_seen: self.tokens_seen,
            elapsed_s,
            stage: self.objective.name().to_string(),
        };
        // Every rank takes part (ZeRO-1 shards are gathered to rank 0, which writes; every rank
        // learns the outcome). The step's loss and norm were finite, but its update may not
        // have been: a save of non-finite values is refused, and that ends the run as diverged
        // on every rank.
        let dir = match checkpoint::save_ranked(
            self.be,
            self.comm,
            &checkpoint::dir_for(&opts.out_dir, step),
            self.model,
            self.tokenizer,
            &self.opt,
            &state,
        ) {
            Err(TrainError::Integrity(CheckpointError::NotFinite { what, .. })) => {
                let what = format!("{what} is not finite after the update, so it is not saved");
                return Err(self.diverged(step, what));
            }
            saved => saved?,
        };
        if self.comm.info().is_writer() {
            self.pending.push(dir.clone());
            run_dir::prune_keeping(
                &opts.out_dir,
                opts.keep_checkpoints,
                self.last_good.as_deref(),
            )?;
        }
        Ok(dir)
    }

    fn finish(mut self) -> TrainSummary {
        self.summary.elapsed = self.started.elapsed();
        self.summary.tokens_per_s =
            self.run_tokens as f64 / self.summary.elapsed.as_secs_f64().max(1e-9);
        self.summary
    }
}

/// The LoRA dropout seed of micro-batch `micro` (this rank's `k`-th of `accum` is micro-batch
/// `rank * accum + k`) of 0-based step `step` in a run seeded `seed`: a function of those
/// alone, so a resumed run repeats the masks.
pub fn lora_dropout_seed(seed: u64, step: u64, micro: u64) -> u64 {
    let base = Rng::new(seed ^ 0x6c6f_7261_5f64_726f).next_u64();
    Rng::new(
        base ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ micro.wrapping_mul(0xC2B2_AE3D_27D4_EB4F),
    )
    .next_u64()
}

/// The bytes of the files directly in `dir` (0 for what cannot be read: it is for a message).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}
