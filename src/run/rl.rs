//! `rl` as a library call: load the policy's start (`--init`) twice (the policy the loop trains,
//! and the frozen reference held beside it), the reward model (`--reward`), and the prompts, on
//! one device; check that the three share a tokenizer; then the RL run on the shared loop.
//!
//! Prompts file: JSON Lines, one `{"prompt": "text"}` per line (blank lines skipped), rendered as
//! one user turn followed by `<|assistant|>` (data/chat.rs); completions stop at `<|end|>`.

use super::sft::check_tokenizers;
use super::{resolve_checkpoint, train_with, DeviceKind, ModelInit};
use crate::backend::{cpu::CpuBackend, cuda::CudaBackend, Backend};
use crate::config::{ConfigError, RunConfig};
use crate::data::chat::{render_prompt, Message, Role};
use crate::data::{DataError, Tokenizer};
use crate::model::RewardModel;
use crate::stages::rl::{ModelScorer, Rl, RlConfig};
use crate::train::{checkpoint, Result, TrainOptions, TrainSummary};
use std::path::{Path, PathBuf};

/// RL defaults for the tiny preset: 4 prompts per micro-batch (x k completions), a low peak
/// rate, no validation.
pub fn rl_run_defaults() -> RunConfig {
    RunConfig {
        batch_size: 4,
        learning_rate: 1e-5,
        max_steps: 100,
        warmup_steps: 5,
        weight_decay: 0.0,
        val_every: 0,
        checkpoint_every: 50,
        ..RunConfig::default()
    }
}

/// An RL run as the CLI describes it. `run.batch_size` counts prompts per micro-batch.
pub struct RlJob {
    pub run: RunConfig,
    /// The SFT checkpoint (or run directory): the policy's start and the reference.
    pub init: PathBuf,
    /// The reward checkpoint (or run directory) from `topcoat reward`.
    pub reward: PathBuf,
    /// JSON Lines of `{"prompt": ...}`.
    pub prompts: PathBuf,
    pub out: PathBuf,
    pub resume: bool,
    pub device: DeviceKind,
    pub quiet: bool,
    pub k: usize,
    pub kl_coef: f64,
    pub clip: f64,
    pub max_new: usize,
    pub epochs: usize,
    /// Keep only the newest this many checkpoints (0 keeps all).
    pub keep_checkpoints: usize,
}

/// Reads a prompts file (see the module header) into token ids.
pub fn read_prompts(path: &Path, tok: &Tokenizer) -> std::result::Result<Vec<Vec<u32>>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        DataError::InvalidArgument(format!("{}: cannot read the prompts: {e}", path.display()))
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |msg: String| {
            DataError::InvalidArgument(format!("{}:{}: {msg}", path.display(), i + 1))
        };
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad(format!("not JSON: {e}")))?;
        let prompt = v.get("prompt").and_then(|p| p.as_str()).ok_or_else(|| {
            bad("expected {\"prompt\": \"text\"}: no string field \"prompt\"".into())
        })?;
        if prompt.is_empty() {
            return Err(bad("field \"prompt\" is empty".into()));
        }
        out.push(render_prompt(tok, &[Message::new(Role::User, prompt)]));
    }
    if out.is_empty() {
        return Err(DataError::InvalidArgument(format!(
            "{}: no prompts",
            path.display()
        )));
    }
    Ok(out)
}

/// Trains the `--init` checkpoint against the `--reward` model on the prompts; returns the
/// summary (checkpoints and metrics in `out`).
pub fn rl(job: &RlJob, progress: &dyn Fn(&str)) -> Result<TrainSummary> {
    let ckpt = resolve_checkpoint(&job.init)?;
    let reward = resolve_checkpoint(&job.reward)?;
    let tok = checkpoint::load_tokenizer(&ckpt)?;
    let reward_tok = checkpoint::load_tokenizer(&reward)?;
    check_tokenizers(
        &ckpt,
        &tok,
        &reward,
        &reward_tok,
        "reward --init <the same SFT checkpoint>",
    )?;
    let cfg = checkpoint::load_config(&ckpt)?;
    let run = &job.run;
    if run.seq_len > cfg.max_seq_len {
        return Err(ConfigError::Invalid(format!(
            "seq_len {} exceeds the checkpoint's max_seq_len {}",
            run.seq_len, cfg.max_seq_len
        ))
        .into());
    }
    let reward_max = checkpoint::load_config(&reward)?.max_seq_len;
    if run.seq_len > reward_max {
        return Err(ConfigError::Invalid(format!(
            "seq_len {} exceeds the reward checkpoint {}'s max_seq_len {reward_max}",
            run.seq_len,
            reward.display()
        ))
        .into());
    }
    if run.world_size != 1 {
        return Err(ConfigError::Invalid("rl runs on one rank only (world_size 1)".into()).into());
    }
    let prompts = read_prompts(&job.prompts, &tok)?;
    let rl_cfg = RlConfig {
        prompts: run.batch_size,
        k: job.k,
        kl_coef: job.kl_coef,
        clip: job.clip,
        max_new: job.max_new,
        epochs: job.epochs,
        t: run.seq_len,
        accum: run.grad_accum_steps()?,
        stop: tok.special("<|end|>"),
        pad: tok.eot(),
    };
    rl_cfg.check().map_err(ConfigError::Invalid)?;
    match job.device {
        DeviceKind::Cpu => rl_on(
            &CpuBackend,
            job,
            &ckpt,
            &reward,
            prompts,
            rl_cfg,
            &tok,
            progress,
        ),
        DeviceKind::Cuda => rl_on(
            &CudaBackend::new(0)?,
            job,
            &ckpt,
            &reward,
            prompts,
            rl_cfg,
            &tok,
            progress,
        ),
    }
}

#[allow(clippy::too_many_arguments)]
fn rl_on<B: Backend + 'static>(
    be: &B,
    job: &RlJob,
    ckpt: &Path,
    reward: &Path,
    prompts: Vec<Vec<u32>>,
    rl_cfg: RlConfig,
    tok: &Tokenizer,
    progress: &dyn Fn(&str),
) -> Result<TrainSummary> {
    let reference = checkpoint::load_model(be, ckpt, None)?;
    let reward_model = RewardModel::new(checkpoint::load_model(be, reward, None)?)
        .map_err(|e| ConfigError::Invalid(format!("--reward {}: {e}", reward.display())))?;
    let scorer = ModelScorer {
        model: reward_model,
        pad: tok.eot(),
    };
    let mut objective = Rl::new(prompts, reference, Box::new(scorer), rl_cfg)?;
    let c = &objective.cfg;
    progress(&format!(
        "rl prompts {}: {} used ({} skipped: longer than T - max_new = {}); {} prompts x k = {} \
         completions per micro-batch, kl_coef {}, clip {}, {} epochs per rollout; reward model {}",
        job.prompts.display(),
        objective.num_prompts(),
        objective.skipped(),
        c.t - c.max_new,
        c.prompts,
        c.k,
        c.kl_coef,
        c.clip,
        c.epochs,
        reward.display()
    ));
    let opts = TrainOptions {
        run: job.run.clone(),
        out_dir: job.out.clone(),
        resume: job.resume,
        keep_checkpoints: job.keep_checkpoints,
        quiet: job.quiet,
    };
    train_with(
        be,
        ModelInit::Checkpoint(ckpt),
        &mut objective,
        tok,
        &opts,
        progress,
    )
}
