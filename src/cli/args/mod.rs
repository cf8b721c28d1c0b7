//! The command-line flags of `topcoat` (clap derive): the command list and the flag groups
//! several commands share (here), then one struct per subcommand, by kind: `prepare.rs`
//! (prepare, tokenizer), `train.rs` (pretrain, sft, reward, dpo, rl), `generate.rs` (sample,
//! chat, eval), `tools.rs` (bench, demo, report) and `launch.rs` (launch). One spelling per flag across commands;
//! older spellings stay as hidden aliases so existing scripts still run.

mod generate;
mod hf;
mod launch;
mod prepare;
mod tools;
mod train;

pub use generate::*;
pub use hf::*;
pub use launch::*;
pub use prepare::*;
pub use tools::*;
pub use train::*;

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use topcoat::runtime::{CollectiveRequest, DeviceRequest};

/// `--device`, shared by every command that computes.
#[derive(Args, Clone)]
pub struct DeviceArgs {
    /// auto (a CUDA device when one is usable, else the CPU), cpu or cuda.
    #[arg(long, default_value = "auto")]
    pub device: DeviceRequest,
    /// What sums gradients across ranks: auto (NCCL on CUDA, the host collective on the CPU),
    /// nccl, or host (host copies over loopback TCP: two ranks sharing one GPU).
    #[arg(long, default_value = "auto")]
    pub collective: CollectiveRequest,
    /// Where the ranks meet (over MASTER_ADDR), for a launcher that sets none (srun).
    #[arg(long)]
    pub master_addr: Option<String>,
}

#[derive(Parser)]
#[command(
    name = "topcoat",
    version,
    about = "A CUDA-native LLM trainer: pretrain, SFT and preference tuning"
)]
pub struct Cli {
    /// Worker threads for the CPU backend, 1 to 1024 (default: all cores).
    #[arg(long, global = true, value_parser = parse_threads)]
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
    PrepareSft(PrepareChatArgs),
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
    /// Describe a token shard, a prepared data directory, a checkpoint or a run directory; or,
    /// without a path, a model configuration: parameters, FLOPs per token, the memory plan.
    Info(InfoArgs),
    /// The memory plan of a model and run shape (frozen and trainable weights, master,
    /// moments, gradients, activations at each recompute level, logits, LoRA), against
    /// --memory-gib with the flag that would make it fit.
    Plan(PlanArgs),
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
    /// Start N ranks of a data-parallel job on this node with torchrun's variables
    /// (`launch --nproc-per-node 2 -- pretrain ...`); one failing rank stops them all.
    Launch(LaunchArgs),
    /// Read a model from another format: `import hf DIR --out RUN`.
    #[command(subcommand)]
    Import(ImportCmd),
    /// Write a checkpoint in another format: `export hf RUN --out DIR`.
    #[command(subcommand)]
    Export(ExportCmd),
}

/// Most `--threads`: far past any machine's cores, far below what would exhaust the process's
/// threads (100,000 threads hang the pool's start).
pub const MAX_THREADS: usize = 1024;

/// `--threads N`, `1 <= N <= MAX_THREADS`.
fn parse_threads(s: &str) -> Result<usize, String> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    match s.parse::<usize>() {
        Ok(n) if (1..=MAX_THREADS).contains(&n) => Ok(n),
        _ => Err(format!(
            "must be a whole number from 1 to {MAX_THREADS} (this machine has {cores} cores)"
        )),
    }
}

/// The model shape beside the preset (`pretrain` of a fresh model, `bench`, `info`; a stage
/// from a checkpoint refuses values that differ from the checkpoint's).
#[derive(Args, Clone, Default)]
pub struct ShapeArgs {
    /// Transformer blocks (TOML key n_layer); default: the preset's.
    #[arg(long)]
    pub n_layer: Option<usize>,
    /// Attention heads, dividing --n-embd (TOML key n_head); default: the preset's.
    #[arg(long)]
    pub n_head: Option<usize>,
    /// Model width (TOML key n_embd); default: the preset's.
    #[arg(long)]
    pub n_embd: Option<usize>,
    /// Longest sequence, the rows of the position embedding (TOML key context); default: the
    /// preset's.
    #[arg(long)]
    pub context: Option<usize>,
}

impl ShapeArgs {
    /// Sets the overrides given here on `run` (the others keep the file's or the default).
    pub fn apply(&self, run: &mut topcoat::config::RunConfig) {
        for (flag, field) in [
            (self.n_layer, &mut run.n_layer),
            (self.n_head, &mut run.n_head),
            (self.n_embd, &mut run.n_embd),
            (self.context, &mut run.context),
        ] {
            if flag.is_some() {
                *field = flag;
            }
        }
    }
}

/// `--recompute 0|1|2`.
pub fn parse_recompute(s: &str) -> Result<u8, String> {
    match s.parse::<u8>() {
        Ok(n) if n <= 2 => Ok(n),
        _ => Err(
            "must be 0 (store every activation), 1 (recompute the GELU) or 2 (also the \
                  layernorms)"
                .into(),
        ),
    }
}

/// `--zero 0|1`.
pub fn parse_zero(s: &str) -> Result<u8, String> {
    match s.parse::<u8>() {
        Ok(n) if n <= 1 => Ok(n),
        _ => Err("must be 0 (no sharding) or 1 (shard the optimizer state across ranks)".into()),
    }
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
    /// Start afresh in an --out that holds an earlier run, deleting its checkpoints and
    /// metrics (without it, such a run is refused).
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
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
    /// Stop as diverged when a step's loss exceeds the run's lowest by more than this many
    /// times max(1, |lowest|) (0: only a non-finite loss stops it).
    #[arg(long)]
    pub divergence_factor: Option<f32>,
    #[command(flatten)]
    pub shape: ShapeArgs,
    /// Activation recompute (TOML key recompute): 0 keeps every activation, 1 recomputes the
    /// GELU in the backward pass, 2 also the layernorms; same gradients, less memory.
    #[arg(long, value_parser = parse_recompute)]
    pub recompute: Option<u8>,
    /// ZeRO stage (TOML key zero): 1 shards the AdamW moments and fp32 master weights across
    /// the data-parallel ranks (same updates, less memory per rank); 0 keeps them whole.
    #[arg(long, value_parser = parse_zero)]
    pub zero: Option<u8>,
}
