//! The one training loop every stage shares, its checkpoints and its metrics.

pub mod checkpoint;
pub mod manifest;
pub mod metrics;
mod trainer;

pub use metrics::Extras;
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
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Integrity(#[from] checkpoint::CheckpointError),
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
    #[error("training diverged at step {step}: {what}")]
    Diverged { step: usize, what: String },
}

pub type Result<T> = std::result::Result<T, TrainError>;

/// Wraps an io::Error with the path it concerns.
pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> TrainError {
    let path = path.into();
    move |source| TrainError::Io { path, source }
}
