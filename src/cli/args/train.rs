//! Flags of the training commands: `pretrain`, `sft`, `reward`, `dpo`, `rl` (each flattens
//! [`RunFlags`]; the fine-tuning stages also [`LoraArgs`]).

use super::RunFlags;
use clap::Args;
use std::path::PathBuf;
use topcoat::config::RunConfig;
use topcoat::stages::dpo::DpoLoss;

/// LoRA: train low-rank adapters beside the frozen `--init` model instead of every weight.
#[derive(Args)]
pub struct LoraArgs {
    /// Turns LoRA on with adapters of this rank (TOML key lora_rank); the --init model stays
    /// frozen and only the adapters train.
    #[arg(long)]
    pub lora_rank: Option<usize>,
    /// The adapters' scale numerator: their output is multiplied by alpha / rank (TOML key
    /// lora_alpha); default 2 x --lora-rank.
    #[arg(long)]
    pub lora_alpha: Option<f32>,
    /// Dropout on the adapters' input while training, in [0, 1) (TOML key lora_dropout);
    /// default 0.
    #[arg(long)]
    pub lora_dropout: Option<f32>,
    /// The projections that get adapters: all, or a list of q,k,v,o,gate,up,down (GPT-2: q,k,v
    /// together, or qkv; o, up, down) (TOML key lora_targets); default all.
    #[arg(long)]
    pub lora_targets: Option<String>,
}

impl LoraArgs {
    /// Sets the LoRA keys given here on `run` (the others keep the file's or the default).
    pub fn apply(&self, run: &mut RunConfig) {
        if self.lora_rank.is_some() {
            run.lora_rank = self.lora_rank;
        }
        if self.lora_alpha.is_some() {
            run.lora_alpha = self.lora_alpha;
        }
        if let Some(p) = self.lora_dropout {
            run.lora_dropout = p;
        }
        if let Some(t) = &self.lora_targets {
            run.lora_targets = t.clone();
        }
    }
}

#[derive(Args)]
pub struct PretrainArgs {
    /// Prepared data directory (from `topcoat prepare`); default: the embedded corpus.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Run directory for metrics.jsonl and checkpoints.
    #[arg(long, default_value = "runs/pretrain")]
    pub out: PathBuf,
    #[command(flatten)]
    pub flags: RunFlags,
}

#[derive(Args)]
pub struct SftArgs {
    /// Pretrained checkpoint, or a run directory (its newest checkpoint).
    #[arg(long)]
    pub init: PathBuf,
    /// Directory from `topcoat prepare sft`.
    #[arg(long)]
    pub data: PathBuf,
    /// Run directory for metrics.jsonl and checkpoints.
    #[arg(long, default_value = "runs/sft")]
    pub out: PathBuf,
    /// Pack several whole examples into each row (they do not attend to each other); sets
    /// `pack = true` in the run config.
    #[arg(long)]
    pub pack: bool,
    #[command(flatten)]
    pub lora: LoraArgs,
    #[command(flatten)]
    pub flags: RunFlags,
}

#[derive(Args)]
pub struct RewardArgs {
    /// SFT checkpoint, or a run directory (its newest checkpoint).
    #[arg(long)]
    pub init: PathBuf,
    /// Directory from `topcoat prepare prefs`.
    #[arg(long)]
    pub data: PathBuf,
    /// Run directory for metrics.jsonl and checkpoints.
    #[arg(long, default_value = "runs/reward")]
    pub out: PathBuf,
    #[command(flatten)]
    pub lora: LoraArgs,
    #[command(flatten)]
    pub flags: RunFlags,
}

#[derive(Args)]
pub struct DpoArgs {
    /// SFT checkpoint, or a run directory (its newest checkpoint): the policy's start and the
    /// frozen reference.
    #[arg(long)]
    pub init: PathBuf,
    /// Directory from `topcoat prepare prefs`.
    #[arg(long)]
    pub data: PathBuf,
    /// Run directory for metrics.jsonl, ref_logps.bin and checkpoints.
    #[arg(long, default_value = "runs/dpo")]
    pub out: PathBuf,
    /// Strength of the pull toward the reference (the KL coefficient of the implicit reward).
    #[arg(long, default_value_t = 0.1)]
    pub beta: f64,
    /// sigmoid (DPO) or ipo.
    #[arg(long, default_value = "sigmoid")]
    pub loss: DpoLoss,
    #[command(flatten)]
    pub lora: LoraArgs,
    #[command(flatten)]
    pub flags: RunFlags,
}

#[derive(Args)]
pub struct RlArgs {
    /// SFT checkpoint, or a run directory (its newest checkpoint): the policy's start and the
    /// frozen reference.
    #[arg(long)]
    pub init: PathBuf,
    /// Reward checkpoint, or a run directory (from `topcoat reward`).
    #[arg(long)]
    pub reward: PathBuf,
    /// JSON Lines of prompts, one `{"prompt": "text"}` per line.
    #[arg(long)]
    pub prompts: PathBuf,
    /// Run directory for metrics.jsonl and checkpoints.
    #[arg(long, default_value = "runs/rl")]
    pub out: PathBuf,
    /// Completions sampled per prompt (>= 2: the leave-one-out baseline).
    #[arg(long, default_value_t = 4)]
    pub k: usize,
    /// Weight of the KL penalty to the reference in the shaped reward.
    #[arg(long, default_value_t = 0.05)]
    pub kl_coef: f64,
    /// Policy-ratio clip range (ratio kept in [1 - clip, 1 + clip]).
    #[arg(long, default_value_t = 0.2)]
    pub clip: f64,
    /// Most new tokens per completion.
    #[arg(long, default_value_t = 32, alias = "max-new")]
    pub max_new_tokens: usize,
    /// Optimizer steps each rollout serves (1: plain RLOO, the clip never acts).
    #[arg(long, default_value_t = 2)]
    pub epochs: usize,
    #[command(flatten)]
    pub lora: LoraArgs,
    #[command(flatten)]
    pub flags: RunFlags,
}
