//! `rl` as a library call: on-policy RL of an SFT checkpoint against a reward model with a KL
//! leash (`stages/rl.rs`), on the shared stage runner. The policy's start (`--init`) is loaded
//! twice (the policy the loop trains, and the frozen reference held beside it), with the reward
//! model (`--reward`), on one backend; the three must share a tokenizer. A LoRA run loads it
//! once: the reference is the policy with its adapters off. The reference and the reward
//! model are frozen (one working copy, no gradients or master), and the memory plan counts
//! them beside the policy (`held_models`).
//!
//! Prompts file: JSON Lines, one `{"prompt": "text"}` per line (blank lines skipped), rendered as
//! one user turn followed by `<|assistant|>` (data/chat.rs); completions stop at `<|end|>`.

use super::inputs::{describe_tokenizer, resolve_checkpoint, same_tokenizer};
use super::preflight::HeldModel;
use super::stage::{tuning_defaults, Init, Result, Stage, StageContext, TrainJob};
use crate::backend::Backend;
use crate::config::{ConfigError, RunConfig};
use crate::data::chat::{render_prompt, Message, Role};
use crate::data::{DataError, Tokenizer};
use crate::model::{BatchFlag, Gpt, RewardModel};
use crate::stages::rl::{ModelScorer, Rl, RlConfig, RlReference};
use crate::train::checkpoint;
use std::path::{Path, PathBuf};

/// What RL adds to the shared set-up.
pub struct RlStage {
    /// The SFT checkpoint (or run directory): the policy's start and the reference.
    pub init: PathBuf,
    /// The reward checkpoint (or run directory) from `topcoat reward`.
    pub reward: PathBuf,
    /// JSON Lines of `{"prompt": ...}`.
    pub prompts: PathBuf,
    /// Completions sampled per prompt.
    pub k: usize,
    pub kl_coef: f64,
    pub clip: f64,
    /// Most new tokens per completion.
    pub max_new_tokens: usize,
    /// Optimizer steps each rollout serves.
    pub epochs: usize,
}

impl RlStage {
    /// `--k 4 --kl-coef 0.05 --clip 0.2 --max-new-tokens 32 --epochs 2`.
    pub fn new(init: PathBuf, reward: PathBuf, prompts: PathBuf) -> Self {
        Self {
            init,
            reward,
            prompts,
            k: 4,
            kl_coef: 0.05,
            clip: 0.2,
            max_new_tokens: 32,
            epochs: 2,
        }
    }
}

/// An RL run (`run.batch_size` counts prompts per micro-batch).
pub type RlJob = TrainJob<RlStage>;

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
        out.push(render_prompt(tok, &[Message::new(Role::User, prompt)])?);
    }
    if out.is_empty() {
        return Err(DataError::InvalidArgument(format!(
            "{}: no prompts",
            path.display()
        )));
    }
    Ok(out)
}

impl Stage for RlStage {
    const NAME: &'static str = "rl";
    type Objective<B: Backend + 'static> = Rl<B>;

    /// 4 prompts per micro-batch (x k completions), a low peak rate, no validation.
    fn defaults() -> RunConfig {
        RunConfig {
            batch_size: 4,
            weight_decay: 0.0,
            val_every: 0,
            ..tuning_defaults(1e-5)
        }
    }

    /// Prompts, each sampled `--k` times.
    fn batch_flag(&self) -> BatchFlag {
        BatchFlag {
            rows_per_unit: self.k.max(1),
            ..BatchFlag::ROWS_LORA
        }
    }

    fn init(&self) -> Init<'_> {
        Init::Checkpoint(&self.init)
    }

    /// The reward model scores the `k` completions of one prompt at a time; the reference
    /// (none under LoRA: the policy with its adapters off) reads the whole micro-batch.
    fn held_models(&self, ctx: &StageContext) -> Result<Vec<HeldModel>> {
        let (run, k) = (ctx.run, self.k.max(1));
        let reward = resolve_checkpoint(&self.reward)?;
        let mut held = vec![HeldModel {
            cfg: checkpoint::load_config(&reward)?,
            rows: k,
            seq_len: run.seq_len,
            extra: ctx.model.n_embd + 1,
        }];
        if ctx.model.lora.is_none() {
            held.push(HeldModel {
                cfg: ctx.model.clone(),
                rows: run.batch_size.saturating_mul(k),
                seq_len: run.seq_len,
                extra: 0,
            });
        }
        Ok(held)
    }

    fn data(&self) -> Option<(&Path, &'static str)> {
        None
    }

    fn open<B: Backend + 'static>(
        &self,
        be: &B,
        ctx: &StageContext,
        progress: &dyn Fn(&str),
    ) -> Result<Rl<B>> {
        let (run, tok) = (ctx.run, &ctx.tokenizer);
        let ckpt = ctx.starting_checkpoint()?;
        let reward = self.check_reward_model(ckpt, tok, run.seq_len)?;
        let prompts = read_prompts(&self.prompts, tok)?;
        let rl_cfg = RlConfig {
            prompts: run.batch_size,
            k: self.k,
            kl_coef: self.kl_coef,
            clip: self.clip,
            max_new: self.max_new_tokens,
            epochs: self.epochs,
            t: run.seq_len,
            // This rank's micro-batches per step: a rollout slot each.
            accum: crate::train::local_accum(run, run.world_size)?,
            stop: Some(tok.end_of_turn()),
            pad: tok.eot(),
        };
        rl_cfg.check().map_err(ConfigError::Invalid)?;
        // Both held for forward passes only: one working copy each, as the plan counts them.
        let frozen = |dir: &Path| -> Result<Gpt<B>> {
            let mut m = checkpoint::load_model(be, dir, None)?;
            m.freeze(be)?;
            Ok(m)
        };
        let reference = match ctx.model.lora {
            Some(_) => RlReference::AdaptersOff,
            None => RlReference::Model(frozen(ckpt)?),
        };
        let reward_model = RewardModel::new(frozen(&reward)?)
            .map_err(|e| ConfigError::Invalid(format!("--reward {}: {e}", reward.display())))?;
        let scorer = ModelScorer {
            model: reward_model,
            pad: tok.eot(),
        };
        let ranks = crate::data::RankSlice::new(run.rank, run.world_size)?;
        let objective =
            Rl::new(prompts, reference, Box::new(scorer), rl_cfg)?.with_ranks(run.seed, ranks);
        let c = &objective.cfg;
        progress(&format!(
            "rl prompts {}: {} used ({} skipped: longer than T - max_new = {}); {} prompts x k = \
             {} completions per micro-batch, kl_coef {}, clip {}, {} epochs per rollout; reward \
             model {}; reference {}",
            self.prompts.display(),
            objective.num_prompts(),
            objective.skipped(),
            c.t - c.max_new,
            c.prompts,
            c.k,
            c.kl_coef,
            c.clip,
            c.epochs,
            reward.display(),
            if ctx.model.lora.is_some() {
                "the policy with its LoRA adapters off"
            } else {
                "a frozen copy of --init"
            }
        ));
        Ok(objective)
    }
}

impl RlStage {
    /// The resolved `--reward` checkpoint, refused when its tokenizer differs from the
    /// policy's or its context is shorter than `seq_len`.
    fn check_reward_model(
        &self,
        policy: &Path,
        tok: &Tokenizer,
        seq_len: usize,
    ) -> Result<PathBuf> {
        let reward = resolve_checkpoint(&self.reward)?;
        let reward_tok = checkpoint::load_tokenizer(&reward)?;
        if !same_tokenizer(tok, &reward_tok) {
            return Err(DataError::InvalidArgument(format!(
                "tokenizer mismatch: --reward {} has {} but --init {} has {}; train the reward \
                 model from the same SFT checkpoint (`topcoat reward --init {}`)",
                reward.display(),
                describe_tokenizer(&reward_tok),
                policy.display(),
                describe_tokenizer(tok),
                policy.display()
            ))
            .into());
        }
        let reward_max = checkpoint::load_config(&reward)?.max_seq_len;
        if seq_len > reward_max {
            return Err(ConfigError::Invalid(format!(
                "seq_len {seq_len} exceeds the reward checkpoint {}'s max_seq_len {reward_max}",
                reward.display()
            ))
            .into());
        }
        Ok(reward)
    }
}
