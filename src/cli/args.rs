//! The command-line flags of `topcoat` (clap derive): one struct per subcommand, and the
//! groups several share (the device, the training flags). One spelling per flag across
//! commands; older spellings stay as hidden aliases so existing scripts still run.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use topcoat::commands::inputs::TokenizerArg;
use topcoat::runtime::DeviceRequest;
use topcoat::stages::dpo::DpoLoss;

/// `--device`, shared by every command that computes.
#[derive(Args, Clone, Copy)]
pub struct DeviceArgs {
    /// auto (a CUDA device when one is usable, else the CPU), cpu or cuda.
    #[arg(long, default_value = "auto")]
    pub device: DeviceRequest,
}

#[derive(Parser)]
#[command(
    name = "topcoat",
    version,
    about = "A CUDA-native LLM trainer: pretrain, SFT and preference tuning"
)]
pub struct Cli {
    /// Worker threads for the CPU backend (default: all cores).
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Tokenize text into train/val token shards; `prepare sft` and `prepare prefs` for chat data.
    Prepare(PrepareArgs),
    /// Tokenizer tools.
    #[command(subcommand)]
    Tokenizer(TokenizerCmd),
    /// Pretrain a GPT-2 model (no --data: the embedded corpus).
    Pretrain(PretrainArgs),
    /// Old name of `prepare sft`, kept so existing scripts still run.
    #[command(hide = true)]
    PrepareSft(PrepareSftArgs),
    /// Instruction-tune a pretrained checkpoint on prepared conversations (loss on the assistant only).
    Sft(SftArgs),
    /// Train a reward model (the SFT checkpoint plus a scalar head) on prepared preference pairs.
    ///
    /// `--batch-size` counts rows, two per pair (chosen and rejected), so it must be even.
    Reward(RewardArgs),
    /// Preference-tune an SFT checkpoint with DPO (or IPO) on prepared pairs (--batch-size counts pairs).
    Dpo(DpoArgs),
    /// On-policy RL against a reward model with a KL leash (RLOO advantages, clipped ratio;
    /// --batch-size counts prompts, each sampled --k times).
    Rl(RlArgs),
    /// Generate text from a checkpoint (or a run directory's newest checkpoint).
    Sample(SampleArgs),
    /// Describe a token shard, a checkpoint or a run directory.
    Info { path: PathBuf },
    /// Time training steps of a preset on random tokens (--generate: generation speed).
    Bench(BenchArgs),
    /// Chat with a checkpoint: one message per line on stdin, replies streamed to stdout.
    Chat(ChatArgs),
    /// Evaluate a checkpoint: validation loss, preference-pair accuracy, or scored generation.
    #[command(subcommand)]
    Eval(EvalCmd),
    /// All three rounds on the embedded demo data (pretrain, SFT, reward model, DPO, RL),
    /// measured, ending with a report card.
    Demo(DemoArgs),
    /// Render a demo run directory as one self-contained HTML page (card, samples, plots).
    Report(ReportArgs),
}

#[derive(Args)]
pub struct DemoArgs {
    /// The demo run directory; a stopped demo started again on it continues where it stopped.
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    /// A demo data directory from scripts/make_demo_data.py (default: the embedded small set).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// A reduced run (a few minutes on a CPU): fewer steps and questions.
    #[arg(long)]
    pub quick: bool,
    #[arg(long, default_value_t = 1337)]
    pub seed: u64,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(Args)]
pub struct BenchArgs {
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Vocabulary size (4096: a small BPE; 50257: GPT-2).
    #[arg(long, default_value_t = 4096)]
    pub vocab_size: usize,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Timed steps (after the warm-up steps).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Time forward + backward only (no gradient norm, no AdamW).
    #[arg(long)]
    pub no_optimizer: bool,
    /// Per-kernel mode: run the steps through a profiler that waits for every op and print
    /// each kernel family's time, share of the step, and achieved GB/s or TFLOP/s.
    #[arg(long)]
    pub kernels: bool,
    /// Peak dense TFLOP/s for MFU; 0 measures it with the backend's own matmul.
    #[arg(long, default_value_t = 0.0)]
    pub peak_tflops: f64,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Time greedy generation with and without the KV cache instead of training steps.
    #[arg(long)]
    pub generate: bool,
    /// Prompt tokens (random) for --generate.
    #[arg(long, default_value_t = 16)]
    pub prompt_len: usize,
    /// New tokens per run for --generate (prompt + new must fit the preset's context).
    #[arg(long, default_value_t = 128)]
    pub new_tokens: usize,
    /// Timed runs of each path for --generate (after one warm-up run each).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Which micro-step to time: pretrain, sft, dpo (B/2 pairs), or all three side by side
    /// with their tokens/s relative to pretrain.
    #[arg(long, default_value = "pretrain")]
    pub stage: String,
    /// CUDA attention kernels (an A/B switch): mma (tensor cores) or cuda-cores.
    #[arg(long, default_value = "mma")]
    pub attention: String,
    /// cuBLASLt's GELU epilogues in the MLP matmuls (an A/B switch): on or off (the matmul,
    /// then separate GELU kernels).
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    pub gelu_epilogue: String,
}

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
    Sft(PrepareSftArgs),
    /// Render preference pairs JSONL ({"prompt", "chosen", "rejected"}) into a pair shard.
    Prefs(PreparePrefsArgs),
}

#[derive(Args)]
pub struct PrepareTextArgs {
    /// Text files, directories (searched recursively) or JSONL files with a "text" field.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Output directory for train_*.bin, val_*.bin and tokenizer.json.
    #[arg(long, required = true)]
    pub out: Option<PathBuf>,
    /// gpt2, bpe (train a byte-level BPE on the inputs), a tokenizer.json, or a checkpoint,
    /// run or prepared data directory (its tokenizer).
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

#[derive(Args)]
pub struct PreparePrefsArgs {
    /// Preference JSONL: one {"prompt", "chosen", "rejected"} per line (strings or message lists).
    pub input: PathBuf,
    /// Output directory for prefs_train.{bin,idx}, prefs_val.{bin,idx} and tokenizer.json.
    #[arg(long)]
    pub out: PathBuf,
    /// The tokenizer of the model to train: gpt2, a tokenizer.json, or a checkpoint, run or
    /// prepared data directory (its tokenizer).
    #[arg(long)]
    pub tokenizer: TokenizerArg,
    /// Most tokens per sequence (prompt + response); a pair with a longer sequence is dropped.
    #[arg(long, default_value_t = 256)]
    pub max_len: usize,
    /// Fraction of pairs held out for validation.
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
pub struct PrepareSftArgs {
    /// Conversations JSONL: one {"messages": [{"role": ..., "content": ...}]} per line.
    pub input: PathBuf,
    /// Output directory for sft_train.{bin,idx}, sft_val.{bin,idx} and tokenizer.json.
    #[arg(long)]
    pub out: PathBuf,
    /// The tokenizer of the model to fine-tune: gpt2, a tokenizer.json, or a checkpoint, run
    /// or prepared data directory (its tokenizer).
    #[arg(long)]
    pub tokenizer: TokenizerArg,
    /// Most tokens per example; longer ones are cut (or dropped if no response token fits).
    #[arg(long, default_value_t = 256)]
    pub max_len: usize,
    /// Fraction of conversations held out for validation.
    #[arg(long, default_value_t = 0.1)]
    pub val_fraction: f64,
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
    pub flags: RunFlags,
}

/// Flags shared by the training commands.
#[derive(Args)]
pub struct RunFlags {
    /// TOML run config; flags below override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Continue from the newest checkpoint in --out.
    #[arg(long)]
    pub resume: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
    #[arg(long)]
    pub preset: Option<String>,
    #[arg(long)]
    pub max_steps: Option<usize>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub seq_len: Option<usize>,
    #[arg(long)]
    pub total_batch_tokens: Option<usize>,
    #[arg(long)]
    pub lr: Option<f32>,
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    #[arg(long)]
    pub weight_decay: Option<f32>,
    #[arg(long)]
    pub grad_clip: Option<f32>,
    #[arg(long)]
    pub val_every: Option<usize>,
    #[arg(long)]
    pub checkpoint_every: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
}

#[derive(Args)]
pub struct SampleArgs {
    /// Checkpoint directory or run directory.
    #[arg(long)]
    pub checkpoint: PathBuf,
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

#[derive(Args)]
pub struct ReportArgs {
    /// Demo run directory (holds report_card.json and each stage's metrics.jsonl).
    pub run_dir: PathBuf,
    /// Where to write the page (default: RUN_DIR/report.html).
    #[arg(long)]
    pub out: Option<PathBuf>,
}
