//! Flags of `import hf` and `export hf`.

use clap::{Args, Subcommand};
use std::path::PathBuf;
use topcoat::hf::HfDtype;

#[derive(Subcommand)]
pub enum ImportCmd {
    /// A Hugging Face model directory (config.json, model.safetensors or shards,
    /// tokenizer.json) as a topcoat checkpoint directory: GPT2LMHeadModel, LlamaForCausalLM,
    /// Qwen2ForCausalLM, MistralForCausalLM.
    Hf(ImportHfArgs),
}

#[derive(Args)]
pub struct ImportHfArgs {
    /// The Hugging Face model directory.
    pub dir: PathBuf,
    /// The checkpoint directory to write (must not exist); give it to --init or --checkpoint.
    #[arg(long)]
    pub out: PathBuf,
    /// gpt2: give the model topcoat's GPT-2 tokenizer instead of the directory's
    /// tokenizer.json (needed when it has none).
    #[arg(long, value_parser = ["gpt2"])]
    pub tokenizer: Option<String>,
}

#[derive(Subcommand)]
pub enum ExportCmd {
    /// A checkpoint (or a run directory's newest) as a Hugging Face model directory that
    /// transformers loads with from_pretrained.
    Hf(ExportHfArgs),
}

#[derive(Args)]
pub struct ExportHfArgs {
    /// A checkpoint directory, or a run directory (its newest checkpoint).
    pub run: PathBuf,
    /// The Hugging Face directory to write (must not exist).
    #[arg(long)]
    pub out: PathBuf,
    /// Element type of the written weights: f32 (the checkpoint's values exactly), bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: HfDtype,
    /// A LoRA run: write the full model with the adapters merged into the base weights
    /// (without it, a LoRA run exports as a PEFT adapter directory).
    #[arg(long)]
    pub merge: bool,
}
