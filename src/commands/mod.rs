//! What each CLI command does, as library calls: one module per command. A command builds its
//! job, asks the [`Runtime`](crate::runtime::Runtime) for the backend when it computes, and
//! returns what the binary prints; it prints nothing itself but progress lines through the
//! callback it is given. The training commands share one stage runner (`stage.rs`).

pub mod adapter;
pub mod bench;
pub mod chat;
pub mod demo;
pub mod dpo;
pub mod eval;
pub mod hf;
pub mod info;
pub mod inputs;
pub mod launch;
pub mod plan;
pub mod preflight;
pub mod prepare;
pub mod pretrain;
pub mod report;
pub mod reward;
pub mod rl;
pub mod sample;
pub mod sft;
pub mod stage;

use crate::backend::BackendError;
use crate::config::ConfigError;
use crate::data::DataError;
use crate::model::ModelError;
use crate::train::TrainError;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// A flag's value is wrong: names the flag and what was expected.
    #[error("{arg}: {msg}")]
    Argument { arg: &'static str, msg: String },
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Report(#[from] report::ReportError),
    #[error(transparent)]
    Hf(#[from] crate::hf::HfError),
}

impl CommandError {
    /// A model or data condition that makes the command impossible (not a flag's fault).
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::Train(ModelError::Invalid(msg.into()).into())
    }

    /// A wrong value of flag `arg`.
    pub fn arg(arg: &'static str, msg: impl Into<String>) -> Self {
        Self::Argument {
            arg,
            msg: msg.into(),
        }
    }
}

macro_rules! via_train_error {
    ($($error:ty),*) => {$(
        impl From<$error> for CommandError {
            fn from(e: $error) -> Self {
                Self::Train(e.into())
            }
        }
    )*};
}
via_train_error!(
    BackendError,
    ConfigError,
    DataError,
    ModelError,
    crate::dist::DistError
);
