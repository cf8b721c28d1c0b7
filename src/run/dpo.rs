//! `dpo` as a library call: the tokenizer agreement check, the reference pass (load the init
//! checkpoint as the frozen reference, compute the log-probabilities of every train and val pair,
//! store them in the run directory, drop the reference), then the DPO run on the shared loop with
//! the policy starting from the same checkpoint.

use super::{data_tokenizer, resolve_checkpoint, train_on_device, DeviceKind, ModelInit};
use crate::backend::{cpu::CpuBackend, cuda::CudaBackend, Backend};
use crate::config::{ConfigError, RunConfig};
use crate::data::DataError;
use crate::stages::dpo::reference::RefLogps;
use crate::stages::dpo::{Dpo, DpoLoss};
use crate::train::{checkpoint, Result, TrainOptions, TrainSummary};
use std::path::{Path, PathBuf};

/// DPO defaults for the tiny preset: a low peak rate (the policy should stay near the
/// reference), few steps, 4 pairs (8 rows) per micro-batch.
pub fn dpo_run_defaults() -> RunConfig {
    RunConfig {
        batch_size: 4,
        learning_rate: 1e-4,
        max_steps: 100,
        warmup_steps: 5,
        weight_decay: 0.0,
        val_every: 25,
        checkpoint_every: 50,
        ..RunConfig::default()
    }
}

/// A DPO run as the CLI describes it. `run.batch_size` counts pairs per micro-batch.
pub struct DpoJob {
    pub run: RunConfig,
    /// The SFT checkpoint (or a run directory: its newest checkpoint): the policy's start and
    /// the frozen reference.
    pub init: PathBuf,
    /// Directory from `topcoat prepare prefs`.
    pub data: PathBuf,
    pub out: PathBuf,
    pub resume: bool,
    pub device: DeviceKind,
    pub quiet: bool,
    pub beta: f64,
    pub loss: DpoLoss,
}

/// Trains the `--init` checkpoint with DPO on the pairs; returns the summary (checkpoints, the
/// metrics and `ref_logps.bin` in `out`).
pub fn dpo(job: &DpoJob, progress: &dyn Fn(&str)) -> Result<TrainSummary> {
    let ckpt = resolve_checkpoint(&job.init)?;
    let model_tok = checkpoint::load_tokenizer(&ckpt)?;
    let data_tok = data_tokenizer(&job.data)?;
    if model_tok.vocab_size() != data_tok.vocab_size() || model_tok.kind() != data_tok.kind() {
        return Err(DataError::InvalidArgument(format!(
            "tokenizer mismatch: checkpoint {} has a {:?} tokenizer with {} ids but data {} was \
             prepared with a {:?} tokenizer with {} ids; re-run `prepare prefs` with --tokenizer {}",
            ckpt.display(),
            model_tok.kind(),
            model_tok.vocab_size(),
            job.data.display(),
            data_tok.kind(),
            data_tok.vocab_size(),
            ckpt.display()
        ))
        .into());
    }
    let cfg = checkpoint::load_config(&ckpt)?;
    let run = &job.run;
    if run.seq_len > cfg.max_seq_len {
        return Err(ConfigError::Invalid(format!(
            "seq_len {} exceeds the checkpoint's max_seq_len {}",
            run.seq_len, cfg.max_seq_len
        ))
        .into());
    }
    if run.world_size != 1 {
        return Err(ConfigError::Invalid("dpo runs on one rank only (world_size 1)".into()).into());
    }
    let mut objective = Dpo::open(
        &job.data,
        run.batch_size,
        run.seq_len,
        run.seed,
        cfg.vocab_size,
        model_tok.eot(),
        run.val_batches,
        job.loss,
        job.beta,
    )?;
    progress(&format!(
        "dpo data {}: {} training pairs ({} skipped: a side longer than T = {}), {} val pairs; \
         {:?} loss, beta {}",
        job.data.display(),
        objective.num_pairs(),
        objective.too_long(),
        run.seq_len,
        objective.num_val_pairs(),
        job.loss,
        job.beta
    ));
    let reference = reference_logps(job, &ckpt, &objective, progress)?;
    objective.set_reference(reference)?;
    let opts = TrainOptions {
        run: run.clone(),
        out_dir: job.out.clone(),
        resume: job.resume,
        keep_checkpoints: 3,
        quiet: job.quiet,
    };
    train_on_device(
        job.device,
        ModelInit::Checkpoint(&ckpt),
        &mut objective,
        &model_tok,
        &opts,
        progress,
    )
}

/// The stored reference log-probabilities when resuming and they match the data, else a fresh
/// reference pass (stored before training starts).
fn reference_logps(
    job: &DpoJob,
    ckpt: &Path,
    objective: &Dpo,
    progress: &dyn Fn(&str),
) -> Result<RefLogps> {
    let path = RefLogps::path(&job.out);
    if job.resume {
        if let Some(stored) = RefLogps::load(&job.out)? {
            let n_val = objective.num_val_pairs();
            let n_train = objective.num_pairs() + objective.too_long();
            match stored.mismatch(job.run.seq_len, objective.fingerprint(), n_train, n_val) {
                None => {
                    progress(&format!(
                        "reference log-probabilities: reusing {}",
                        path.display()
                    ));
                    return Ok(stored);
                }
                Some(why) => progress(&format!(
                    "reference log-probabilities in {} do not match ({why}): recomputing",
                    path.display()
                )),
            }
        }
    }
    let started = std::time::Instant::now();
    let r = match job.device {
        DeviceKind::Cpu => reference_pass(&CpuBackend, ckpt, objective)?,
        DeviceKind::Cuda => reference_pass(&CudaBackend::new(0)?, ckpt, objective)?,
    };
    r.save(&job.out)?;
    progress(&format!(
        "reference pass: {} train and {} val pairs with {} in {:.1} s -> {}",
        r.train.iter().filter(|p| !p[0].is_nan()).count(),
        r.val.iter().filter(|p| !p[0].is_nan()).count(),
        ckpt.display(),
        started.elapsed().as_secs_f64(),
        path.display()
    ));
    Ok(r)
}

/// Loads the reference on `be`, runs the pass, and drops it (and `be`'s memory for it) on return.
fn reference_pass<B: Backend>(be: &B, ckpt: &Path, objective: &Dpo) -> Result<RefLogps> {
    let mut reference = checkpoint::load_model(be, ckpt, None)?;
    objective.reference_pass(be, &mut reference)
}
