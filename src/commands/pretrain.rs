//! `pretrain` as a library call: a fresh model of the run config's preset, next-token
//! prediction on a prepared data directory (`stages/pretrain.rs`), on the shared stage runner.
//! Without `--data` the binary prepares the embedded corpus first ([`embedded_data`]).

use super::prepare::prepare_embedded;
use super::stage::{Init, Result, Stage, StageContext, TrainJob};
use crate::backend::Backend;
use crate::config::RunConfig;
use crate::model::BatchFlag;
use crate::stages::pretrain::Pretrain;
use crate::train::TrainError;
use std::path::{Path, PathBuf};

/// What pretraining adds to the shared set-up: the prepared data.
pub struct PretrainStage {
    /// A directory from `topcoat prepare` (or [`embedded_data`]).
    pub data: PathBuf,
}

/// A pretraining run.
pub type PretrainJob = TrainJob<PretrainStage>;

/// The embedded corpus prepared under `out/data` (on first use), for a run given no data.
pub fn embedded_data(
    out: &Path,
    progress: &dyn Fn(&str),
) -> std::result::Result<PathBuf, TrainError> {
    prepare_embedded(&out.join("data"), progress)
}

impl Stage for PretrainStage {
    const NAME: &'static str = "pretrain";
    type Objective<B: Backend + 'static> = Pretrain;

    fn defaults() -> RunConfig {
        RunConfig::default()
    }

    /// Rows, and no LoRA: pretraining trains every weight.
    fn batch_flag(&self) -> BatchFlag {
        BatchFlag::ROWS
    }

    fn init(&self) -> Init<'_> {
        Init::Fresh { data: &self.data }
    }

    fn data(&self) -> Option<(&Path, &'static str)> {
        Some((&self.data, "prepare"))
    }

    fn open<B: Backend + 'static>(
        &self,
        _be: &B,
        ctx: &StageContext,
        _progress: &dyn Fn(&str),
    ) -> Result<Pretrain> {
        let run = ctx.run;
        Ok(Pretrain::open(
            &self.data,
            run.batch_size,
            run.seq_len,
            run.seed,
            run.rank,
            run.world_size,
            ctx.model.vocab_size,
            // No validation split is opened (or required) when validation is off.
            if run.val_every == 0 {
                0
            } else {
                run.val_batches
            },
        )?)
    }
}
