//! Flags of `bench`, `info`, `plan`, `demo` and `report`.

use super::{parse_recompute, DeviceArgs, ShapeArgs};
use clap::Args;
use std::path::PathBuf;

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
    #[command(flatten)]
    pub shape: ShapeArgs,
    /// Activation recompute of the timed steps: 0, 1 (the GELU) or 2 (also the layernorms).
    #[arg(long, default_value_t = 0, value_parser = parse_recompute)]
    pub recompute: u8,
    #[command(flatten)]
    pub lora: PlanLoraArgs,
}

#[derive(Args)]
pub struct InfoArgs {
    /// A token shard (.bin), a prepared data directory, a checkpoint or a run directory;
    /// without it, the model configuration of the flags below is described (as `plan`).
    pub path: Option<PathBuf>,
    #[command(flatten)]
    pub plan: PlanArgs,
}

/// The model and run shape whose memory plan `plan` (and `info` without a path) prints.
#[derive(Args)]
pub struct PlanArgs {
    /// Model preset, with the shape flags below.
    #[arg(long, default_value = "gpt2-124m")]
    pub preset: String,
    #[command(flatten)]
    pub shape: ShapeArgs,
    /// Vocabulary size (50257: GPT-2; 128256: Llama 3).
    #[arg(long, default_value_t = 50257)]
    pub vocab_size: usize,
    /// Micro-batch rows of the memory plan.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Tokens per row of the memory plan (default: the model's context).
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Activation recompute level of the memory plan (the other levels are shown beside it).
    #[arg(long, default_value_t = 0, value_parser = parse_recompute)]
    pub recompute: u8,
    /// Whose storage the memory plan counts: cuda (bf16 weights and activations, fp32
    /// master, gradients and moments) or cpu (f32 everywhere).
    #[arg(long, default_value = "cuda", value_parser = ["cuda", "cpu"])]
    pub backend: String,
    #[command(flatten)]
    pub lora: PlanLoraArgs,
    /// Device memory in GiB to check the plan against (e.g. 24 for an RTX 4090): says
    /// whether it fits and, if not, the flag that would make it fit.
    #[arg(long)]
    pub memory_gib: Option<f64>,
}

/// LoRA adapters in a plan or a bench (the training stages' flags of the same names).
#[derive(Args, Clone, Default)]
pub struct PlanLoraArgs {
    /// LoRA adapters of this rank on the --lora-targets projections, the base frozen.
    #[arg(long)]
    pub lora_rank: Option<usize>,
    /// LoRA's alpha (the adapters' output scaled by alpha / rank); default 2 x --lora-rank.
    #[arg(long, requires = "lora_rank")]
    pub lora_alpha: Option<f32>,
    /// Projections with adapters: q,k,v,o,gate,up,down (GPT-2: q,k,v together, or qkv; o,
    /// up, down), or all.
    #[arg(long, default_value = "all", requires = "lora_rank")]
    pub lora_targets: String,
}

impl PlanLoraArgs {
    /// Sets the adapters on `cfg` (none without --lora-rank), validated against its family.
    pub fn apply(
        &self,
        cfg: &mut topcoat::config::ModelConfig,
    ) -> Result<(), topcoat::config::ConfigError> {
        let Some(rank) = self.lora_rank else {
            return Ok(());
        };
        let targets = topcoat::config::LoraTarget::parse_list(&self.lora_targets, cfg)?;
        cfg.lora = Some(topcoat::config::LoraConfig {
            rank,
            alpha: self.lora_alpha.unwrap_or(2.0 * rank as f32),
            dropout: 0.0,
            targets,
        });
        cfg.validate()
    }
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
pub struct ReportArgs {
    /// Demo run directory (holds report_card.json and each stage's metrics.jsonl).
    pub run_dir: PathBuf,
    /// Where to write the page (default: RUN_DIR/report.html).
    #[arg(long)]
    pub out: Option<PathBuf>,
}
