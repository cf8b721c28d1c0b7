//! `prepare sft` and `sft` as library calls: tokenizer resolution, the tokenizer agreement check
//! between a pretrained checkpoint and SFT data, and the SFT run on the shared loop.

use super::{data_tokenizer, resolve_checkpoint, train_on_device, DeviceKind, ModelInit};
use crate::config::{ConfigError, RunConfig};
use crate::data::{self, DataError, SftPrepareOptions, SftPrepareSummary, Tokenizer};
use crate::stages::sft::Sft;
use crate::train::{checkpoint, TrainError, TrainOptions, TrainSummary};
use std::path::{Path, PathBuf};

/// SFT defaults for the tiny preset: a lower peak rate than pretraining, fewer steps.
pub fn sft_run_defaults() -> RunConfig {
    RunConfig {
        learning_rate: 1e-3,
        max_steps: 100,
        warmup_steps: 5,
        val_every: 25,
        checkpoint_every: 50,
        ..RunConfig::default()
    }
}

/// A tokenizer given as a `tokenizer.json` path, or as a checkpoint or run directory (its
/// tokenizer), or as a prepared data directory holding `tokenizer.json`.
pub fn load_tokenizer_arg(path: &Path) -> Result<Tokenizer, TrainError> {
    if path.is_file() {
        return Ok(Tokenizer::load(path)?);
    }
    if path.join("tokenizer.json").is_file() {
        return Ok(Tokenizer::load(path.join("tokenizer.json"))?);
    }
    let dir = resolve_checkpoint(path)?;
    checkpoint::load_tokenizer(&dir)
}

/// `topcoat prepare sft`: renders `input` into `out` and copies the tokenizer there.
pub fn prepare_sft(
    input: &Path,
    tokenizer: &Path,
    opts: &SftPrepareOptions,
) -> Result<SftPrepareSummary, TrainError> {
    let tok = load_tokenizer_arg(tokenizer)?;
    let summary = data::prepare_sft(input, &tok, opts)?;
    tok.save(opts.out.join("tokenizer.json"))?;
    Ok(summary)
}

/// An SFT run as the CLI describes it.
pub struct SftJob {
    pub run: RunConfig,
    /// Pretrained checkpoint, or a run directory (its newest checkpoint).
    pub init: PathBuf,
    /// Directory from `prepare sft`.
    pub data: PathBuf,
    pub out: PathBuf,
    pub resume: bool,
    pub device: DeviceKind,
    pub quiet: bool,
}

/// Refuses data tokenized with a different tokenizer than the model was trained with;
/// `prepare` names the command that made the data (`prepare sft`, `prepare prefs`).
pub(super) fn check_tokenizers(
    ckpt: &Path,
    model: &Tokenizer,
    data_dir: &Path,
    data: &Tokenizer,
    prepare: &str,
) -> Result<(), DataError> {
    if model.vocab_size() != data.vocab_size() || model.kind() != data.kind() {
        return Err(DataError::InvalidArgument(format!(
            "tokenizer mismatch: checkpoint {} has a {:?} tokenizer with {} ids but data {} was \
             prepared with a {:?} tokenizer with {} ids; re-run `topcoat {prepare}` with --tokenizer {}",
            ckpt.display(),
            model.kind(),
            model.vocab_size(),
            data_dir.display(),
            data.kind(),
            data.vocab_size(),
            ckpt.display()
        )));
    }
    Ok(())
}

/// Fine-tunes the `--init` checkpoint on the SFT data; returns the summary (checkpoints in `out`).
pub fn sft(job: &SftJob, progress: &dyn Fn(&str)) -> Result<TrainSummary, TrainError> {
    let ckpt = resolve_checkpoint(&job.init)?;
    let model_tok = checkpoint::load_tokenizer(&ckpt)?;
    let data_tok = data_tokenizer(&job.data)?;
    check_tokenizers(&ckpt, &model_tok, &job.data, &data_tok, "prepare sft")?;
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
        return Err(ConfigError::Invalid("sft runs on one rank only (world_size 1)".into()).into());
    }
    let mut objective = Sft::open(
        &job.data,
        run.batch_size,
        run.seq_len,
        run.seed,
        cfg.vocab_size,
        model_tok.eot(),
        run.val_batches,
    )?
    .with_packing(run.pack);
    progress(&format!(
        "sft data {}: {} training examples ({} cut to T + 1 = {} tokens), {} val examples, {}",
        job.data.display(),
        objective.num_examples(),
        objective.cut,
        run.seq_len + 1,
        objective.num_val_examples(),
        if run.pack {
            "packed several to a row"
        } else {
            "one to a row"
        }
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
        ModelInit::Checkpoint(&ckpt),
        &mut objective,
        &model_tok,
        &opts,
        progress,
    )
}
