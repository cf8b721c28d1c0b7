//! Flags of the commands that run a trained model: `sample`, `chat`, `eval loss|pairs|generate`.

use super::DeviceArgs;
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Args)]
pub struct SampleArgs {
    /// Checkpoint directory or run directory.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// A PEFT adapter directory (a LoRA run's checkpoint or run directory also works: its
    /// adapter/) merged into --checkpoint, which must be the adapter's base model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[arg(long, default_value = "")]
    pub prompt: String,
    /// Most new tokens.
    #[arg(long, default_value_t = 200, alias = "max-tokens")]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    /// 0 = no top-k filtering.
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Nucleus sampling: keep the most likely tokens up to this probability (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(Args)]
pub struct ChatArgs {
    /// Checkpoint directory or run directory (its newest checkpoint).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// A PEFT adapter directory (a LoRA run's checkpoint or run directory also works: its
    /// adapter/) merged into --checkpoint, which must be the adapter's base model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// A system message placed before the conversation.
    #[arg(long)]
    pub system: Option<String>,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this probability (1 = off).
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// 0 = no top-k filtering.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Most tokens per reply.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(Subcommand)]
pub enum EvalCmd {
    /// Mean token loss (and perplexity) over one split of a `prepare` directory.
    Loss(EvalLossArgs),
    /// Reward-model accuracy (r_chosen > r_rejected) on `prepare prefs` pairs, or with
    /// --reference the DPO implicit-reward accuracy and mean margin.
    Pairs(EvalPairsArgs),
    /// Replies to a prompts JSONL ({"prompt", "reference"} or {"messages"} per line), scored by
    /// exact and normalised match.
    Generate(EvalGenerateArgs),
}

#[derive(Args)]
pub struct EvalLossArgs {
    /// Checkpoint directory or run directory (its newest checkpoint).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// A PEFT adapter directory (a LoRA run's checkpoint or run directory also works: its
    /// adapter/) merged into --checkpoint, which must be the adapter's base model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Directory from `topcoat prepare`.
    #[arg(long)]
    pub data: PathBuf,
    /// val or train: the {split}_*.bin shards.
    #[arg(long, default_value = "val")]
    pub split: String,
    /// Rows per batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Tokens per row (default: the checkpoint's max_seq_len).
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// At most this many batches (default: one full pass over the split).
    #[arg(long)]
    pub max_batches: Option<usize>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(Args)]
pub struct EvalPairsArgs {
    /// A reward checkpoint, or a DPO policy (with --reference); or a run directory.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// A PEFT adapter directory (a LoRA run's checkpoint or run directory also works: its
    /// adapter/) merged into --checkpoint, which must be the adapter's base model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The DPO reference (SFT) checkpoint: score implicit rewards beta * (logp - logp_ref).
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// DPO's beta (with --reference).
    #[arg(long, default_value_t = 0.1)]
    pub beta: f64,
    /// Directory from `topcoat prepare prefs`.
    #[arg(long)]
    pub data: PathBuf,
    /// val or train: prefs_{split}.{bin,idx}.
    #[arg(long, default_value = "val")]
    pub split: String,
    /// Pairs per batch (two rows each).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Tokens per row (default: the checkpoint's max_seq_len); longer pairs are skipped.
    #[arg(long)]
    pub seq_len: Option<usize>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(Args)]
pub struct EvalGenerateArgs {
    /// Checkpoint directory or run directory (its newest checkpoint).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// A PEFT adapter directory (a LoRA run's checkpoint or run directory also works: its
    /// adapter/) merged into --checkpoint, which must be the adapter's base model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Prompts JSONL: {"prompt": string or messages, "reference": string} or {"messages": [...]}.
    #[arg(long)]
    pub prompts: PathBuf,
    /// Write one JSON result per prompt here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Most tokens per reply.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// 0 = no top-k filtering.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[command(flatten)]
    pub device: DeviceArgs,
}
