//! `reward` as a library call: checks the SFT checkpoint against the preference data, then
//! trains the reward model (the checkpoint plus a scalar head) on the shared loop.

use super::sft::check_tokenizers;
use super::{data_tokenizer, resolve_checkpoint, train_on_device, DeviceKind, ModelInit};
use crate::config::{ConfigError, RunConfig};
use crate::stages::reward::Reward;
use crate::train::{checkpoint, TrainError, TrainOptions, TrainSummary};
use std::path::PathBuf;

/// Reward-model defaults for the tiny preset: a lower peak rate than SFT, one short pass.
pub fn reward_run_defaults() -> RunConfig {
    RunConfig {
        learning_rate: 3e-4,
        max_steps: 100,
        warmup_steps: 5,
        val_every: 25,
        checkpoint_every: 50,
        ..RunConfig::default()
    }
}

/// A reward-model run as the CLI describes it.
pub struct RewardJob {
    pub run: RunConfig,
    /// SFT checkpoint, or a run directory (its newest checkpoint).
    pub init: PathBuf,
    /// Directory from `prepare prefs`.
    pub data: PathBuf,
    pub out: PathBuf,
    pub resume: bool,
    pub device: DeviceKind,
    pub quiet: bool,
}

/// Trains a reward model from the `--init` checkpoint on the pairs; returns the summary
/// (checkpoints, with the head, in `out`).
pub fn reward(job: &RewardJob, progress: &dyn Fn(&str)) -> Result<TrainSummary, TrainError> {
    let ckpt = resolve_checkpoint(&job.init)?;
    let model_tok = checkpoint::load_tokenizer(&ckpt)?;
    let data_tok = data_tokenizer(&job.data)?;
    check_tokenizers(&ckpt, &model_tok, &job.data, &data_tok, "prepare prefs")?;
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
        return Err(
            ConfigError::Invalid("reward runs on one rank only (world_size 1)".into()).into(),
        );
    }
    let mut objective = Reward::open(
        &job.data,
        run.batch_size,
        run.seq_len,
        run.seed,
        cfg.vocab_size,
        model_tok.eot(),
        run.val_batches,
    )?;
    progress(&format!(
        "preference data {}: {} training pairs ({} skipped: a side longer than seq_len {}), \
         {} val pairs; {} pairs per micro-batch",
        job.data.display(),
        objective.num_pairs(),
        objective.too_long(),
        run.seq_len,
        objective.num_val_pairs(),
        run.batch_size / 2
    ));
    let opts = TrainOptions {
        run: run.clone(),
        out_dir: job.out.clone(),
        resume: job.resume,
        keep_checkpoints: 3,
        quiet: job.quiet,
    };
    train_on_device(
        job.device,
        ModelInit::CheckpointWithRewardHead(&ckpt),
        &mut objective,
        &model_tok,
        &opts,
        progress,
    )
}
