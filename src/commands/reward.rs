//! `reward` as a library call: the SFT checkpoint plus a scalar head, trained on `prepare
//! prefs` pairs with the Bradley-Terry loss (`stages/reward.rs`), on the shared stage runner.

use super::stage::{tuning_defaults, Init, Result, Stage, StageContext, TrainJob};
use crate::backend::Backend;
use crate::config::RunConfig;
use crate::model::BatchFlag;
use crate::stages::reward::Reward;
use std::path::{Path, PathBuf};

/// What reward-model training adds to the shared set-up.
pub struct RewardStage {
    /// SFT checkpoint, or a run directory (its newest checkpoint).
    pub init: PathBuf,
    /// Directory from `prepare prefs`.
    pub data: PathBuf,
}

/// A reward-model run (`run.batch_size` counts rows, two per pair).
pub type RewardJob = TrainJob<RewardStage>;

impl Stage for RewardStage {
    const NAME: &'static str = "reward";
    type Objective<B: Backend + 'static> = Reward;

    /// A lower peak rate than SFT, one short pass.
    fn defaults() -> RunConfig {
        tuning_defaults(3e-4)
    }

    /// Rows, two per pair: an even count.
    fn batch_flag(&self) -> BatchFlag {
        BatchFlag {
            step: 2,
            ..BatchFlag::ROWS_LORA
        }
    }

    fn init(&self) -> Init<'_> {
        Init::CheckpointWithRewardHead(&self.init)
    }

    fn data(&self) -> Option<(&Path, &'static str)> {
        Some((&self.data, "prepare prefs"))
    }

    fn open<B: Backend + 'static>(
        &self,
        _be: &B,
        ctx: &StageContext,
        progress: &dyn Fn(&str),
    ) -> Result<Reward> {
        let run = ctx.run;
        let objective = Reward::open(&ctx.prepared(&self.data))?;
        progress(&format!(
            "preference data {}: {} training pairs ({} skipped: a side longer than seq_len {}), \
             {} val pairs; {} pairs per micro-batch",
            self.data.display(),
            objective.num_pairs(),
            objective.too_long(),
            run.seq_len,
            objective.num_val_pairs(),
            run.batch_size / 2
        ));
        Ok(objective)
    }
}
