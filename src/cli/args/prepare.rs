//! Flags of `prepare` (text, `sft`, `prefs`) and `tokenizer train`.

use clap::{Args, Subcommand};
use std::path::PathBuf;
use topcoat::commands::inputs::TokenizerArg;

/// `prepare INPUTS... --out DIR` (text), or `prepare sft ...` / `prepare prefs ...`. A first
/// input literally named `sft` or `prefs` selects the subcommand: write `./sft` for a directory.
#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct PrepareArgs {
    #[command(subcommand)]
    pub kind: Option<PrepareKind>,
    #[command(flatten)]
    pub text: PrepareTextArgs,
}

#[derive(Subcommand)]
pub enum PrepareKind {
    /// Render conversations JSONL into SFT shards with assistant-only loss masks.
    Sft(PrepareChatArgs),
    /// Render preference pairs JSONL ({"prompt", "chosen", "rejected"}) into a pair shard.
    Prefs(PrepareChatArgs),
}

#[derive(Args)]
pub struct PrepareTextArgs {
    /// Text files, directories (searched recursively) or JSONL files with a "text" field.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Output directory for train_*.bin, val_*.bin and tokenizer.json.
    #[arg(long, required = true)]
    pub out: Option<PathBuf>,
    /// gpt2, bpe (train a byte-level BPE on the inputs), a tokenizer.json (topcoat's or
    /// Hugging Face's), a Hugging Face model directory, or a checkpoint, run or prepared data
    /// directory (its tokenizer).
    #[arg(long, default_value = "gpt2")]
    pub tokenizer: TokenizerArg,
    /// Vocabulary size when training a BPE.
    #[arg(long, default_value_t = 4096)]
    pub vocab_size: usize,
    /// Fraction of documents held out for validation.
    #[arg(long, default_value_t = 0.05)]
    pub val_fraction: f64,
    /// Most tokens per shard file.
    #[arg(long, default_value_t = 100_000_000)]
    pub shard_tokens: usize,
}

/// `prepare sft` and `prepare prefs`: a JSONL file rendered with a model's tokenizer.
#[derive(Args)]
pub struct PrepareChatArgs {
    /// Conversations JSONL (`prepare sft`: one {"messages": [...]} per line) or preference
    /// JSONL (`prepare prefs`: one {"prompt", "chosen", "rejected"} per line, strings or
    /// message lists).
    pub input: PathBuf,
    /// Output directory for {sft,prefs}_train.{bin,idx}, {sft,prefs}_val.{bin,idx} and
    /// tokenizer.json.
    #[arg(long)]
    pub out: PathBuf,
    /// The tokenizer of the model to train: gpt2, a tokenizer.json (topcoat's or Hugging
    /// Face's), a Hugging Face model directory (tokenizer.json, and tokenizer_config.json with
    /// its chat template, which then renders the conversations), or a checkpoint, run or
    /// prepared data directory (its tokenizer).
    #[arg(long)]
    pub tokenizer: TokenizerArg,
    /// Most tokens per example (`sft`: longer ones are cut, or dropped if no response token
    /// fits; `prefs`: a pair with a longer side is dropped).
    #[arg(long, default_value_t = 256)]
    pub max_len: usize,
    /// Fraction of examples held out for validation.
    #[arg(long, default_value_t = 0.1)]
    pub val_fraction: f64,
}

#[derive(Subcommand)]
pub enum TokenizerCmd {
    /// Train a byte-level BPE tokenizer.
    Train(TokenizerTrainArgs),
}

#[derive(Args)]
pub struct TokenizerTrainArgs {
    /// Text files, directories or JSONL files.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    #[arg(long)]
    pub vocab_size: usize,
    /// Where to write tokenizer.json.
    #[arg(long)]
    pub out: PathBuf,
}
