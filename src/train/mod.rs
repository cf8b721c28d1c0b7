//! The one training loop every stage shares, its checkpoints and its metrics.

pub mod checkpoint;
pub mod manifest;
pub mod metrics;
pub mod run_dir;
mod trainer;

pub use metrics::{Extras, ValPartial};
pub use trainer::{train, Objective, TrainOptions, TrainSummary};

use crate::backend::BackendError;
use crate::data::DataError;
use crate::model::ModelError;
use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A collective operation failed (it names the rank).
    #[error(transparent)]
    Dist(#[from] crate::dist::DistError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Integrity(#[from] checkpoint::CheckpointError),
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
    /// `what` went wrong at `step`; `then` says where the last good checkpoint is and what to do.
    #[error("training diverged at step {step}: {what}; {then}")]
    Diverged {
        step: usize,
        what: String,
        then: String,
    },
    #[error(
        "run directory {dir} is in use by another topcoat process ({holder}); wait for it to \
         finish or choose another --out"
    )]
    RunDirInUse { dir: PathBuf, holder: String },
    #[error(
        "run directory {dir} already holds a run ({files}); continue it with --resume, or start \
         over with --overwrite (which deletes them), or choose another --out"
    )]
    RunDirNotEmpty { dir: PathBuf, files: String },
    #[error("cannot resume from {ckpt}: {why}")]
    ResumeMismatch { ckpt: PathBuf, why: String },
}

pub type Result<T> = std::result::Result<T, TrainError>;

/// Wraps an io::Error with the path it concerns.
pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> TrainError {
    let path = path.into();
    move |source| TrainError::Io { path, source }
}
