//! Hugging Face model directories in and out (docs/FORMATS.md, "Hugging Face import and
//! export"): `config.json` <-> [`ModelConfig`](crate::config::ModelConfig) (config.rs),
//! safetensors files, single or sharded, in f32, bf16 or f16 (read.rs), the tensor names and
//! the fusing, transposing and vocabulary padding between the two layouts (names.rs), and the
//! two directions: a Hugging Face directory into a topcoat checkpoint (import.rs) and back
//! (export.rs). PEFT's LoRA adapter directories are read and written by peft.rs (which
//! modules a PEFT config targets: peft_targets.rs).
//!
//! Supported: `GPT2LMHeadModel`, `LlamaForCausalLM`, `Qwen2ForCausalLM` and
//! `MistralForCausalLM` without a sliding window; everything else is refused by name.

mod config;
pub(crate) mod export;
mod import;
mod names;
pub mod peft;
mod peft_targets;
mod read;

pub use config::{Arch, HfModel, SUPPORTED};
pub use export::{export_hf, ExportOptions, ExportSummary};
pub use import::{import_hf, read_model, HfImport, ImportOptions, ImportSummary};
pub use peft::{read_adapter, write_adapter, write_adapter_with_base};
pub use read::HfWeights;

use crate::data::DataError;
use crate::model::ModelError;
use crate::train::TrainError;
use std::path::PathBuf;
use thiserror::Error;

/// Why an import or export failed; each names the file, the key or the tensor.
#[derive(Debug, Error)]
pub enum HfError {
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: invalid JSON: {msg}", .path.display())]
    Json { path: PathBuf, msg: String },
    #[error("{}: no key \"{key}\" ({why})", .path.display())]
    MissingKey {
        path: PathBuf,
        key: &'static str,
        why: &'static str,
    },
    #[error("{}: \"{key}\" is {found}, expected {expected}", .path.display())]
    BadKey {
        path: PathBuf,
        key: String,
        found: String,
        expected: String,
    },
    #[error(
        "{}: unsupported architecture {found}; topcoat imports {}",
        .path.display(), SUPPORTED.join(", ")
    )]
    UnknownArchitecture { path: PathBuf, found: String },
    /// A setting of a supported architecture that topcoat's graph does not compute.
    #[error("{}: \"{key}\" = {found} is not supported: {why}", .path.display())]
    Unsupported {
        path: PathBuf,
        key: String,
        found: String,
        why: String,
    },
    #[error(
        "{}: no model.safetensors and no model.safetensors.index.json (PyTorch .bin weights \
         are not read: save the model with safe_serialization)",
        .dir.display()
    )]
    NoWeights { dir: PathBuf },
    #[error(
        "{}: truncated safetensors file: its header says {expected} bytes, the file has \
         {found}",
        .file.display()
    )]
    TruncatedShard {
        file: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("{}: invalid safetensors file: {msg}", .file.display())]
    BadSafetensors { file: PathBuf, msg: String },
    #[error("{}: tensor {tensor} is {dtype}; topcoat reads F32, BF16 and F16", .file.display())]
    UnsupportedDtype {
        file: PathBuf,
        tensor: String,
        dtype: String,
    },
    #[error("{}: missing tensor {tensor}", .file.display())]
    MissingTensor { file: PathBuf, tensor: String },
    #[error("{}: tensor {tensor} has shape {found:?}, expected {expected:?}", .file.display())]
    ShapeMismatch {
        file: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{}: unexpected tensor {tensor}: {why}", .file.display())]
    UnexpectedTensor {
        file: PathBuf,
        tensor: String,
        why: String,
    },
    #[error(
        "{}: no tokenizer.json; pass --tokenizer gpt2 to give the model GPT-2's tokenizer \
         (docs/FORMATS.md)",
        .dir.display()
    )]
    NoTokenizer { dir: PathBuf },
    #[error("{}: {what}", .dir.display())]
    NotAModel { dir: PathBuf, what: &'static str },
    /// A directory given as a PEFT adapter that is none (what it is instead, where known).
    #[error("{}: {what}", .dir.display())]
    NotAnAdapter { dir: PathBuf, what: String },
    /// A PEFT adapter whose tensors name the other family's modules.
    #[error(
        "{}: tensor {tensor} is an adapter on a {found} model's module, but the base model is \
         a {expected}",
        .file.display()
    )]
    AdapterBaseMismatch {
        file: PathBuf,
        tensor: String,
        found: &'static str,
        expected: String,
    },
    /// Adapters handed to the writer that do not fit the model's layout.
    #[error("{}: cannot write the adapter: {what}", .dir.display())]
    BadAdapterInput { dir: PathBuf, what: String },
    #[error("{}: already exists; choose a new --out or remove it", .path.display())]
    OutputExists { path: PathBuf },
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Train(#[from] TrainError),
}

impl From<ModelError> for HfError {
    fn from(e: ModelError) -> Self {
        Self::Train(e.into())
    }
}

pub type Result<T> = std::result::Result<T, HfError>;

/// An I/O error on `path`.
fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> HfError + '_ {
    move |source| HfError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Element type of exported tensors (`--dtype`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HfDtype {
    F32,
    Bf16,
    F16,
}

impl HfDtype {
    /// The name `config.json` gives it (`"dtype"`, `"torch_dtype"`).
    pub fn torch_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::Bf16 => "bfloat16",
            Self::F16 => "float16",
        }
    }
}

impl std::str::FromStr for HfDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "f16" | "float16" => Ok(Self::F16),
            _ => Err(format!("{s}: expected f32, bf16 or f16")),
        }
    }
}
