//! `sft` as a library call: instruction tuning of a pretrained checkpoint on `prepare sft`
//! data, loss on the assistant's tokens only (`stages/sft.rs`), on the shared stage runner.

use super::stage::{tuning_defaults, Init, Result, Stage, StageContext, TrainJob};
use crate::backend::Backend;
use crate::config::RunConfig;
use crate::stages::sft::Sft;
use std::path::{Path, PathBuf};

/// What SFT adds to the shared set-up.
pub struct SftStage {
    /// Pretrained checkpoint, or a run directory (its newest checkpoint).
    pub init: PathBuf,
    /// Directory from `prepare sft`.
    pub data: PathBuf,
}

/// An SFT run (`run.pack` lays several examples in each row).
pub type SftJob = TrainJob<SftStage>;

impl Stage for SftStage {
    const NAME: &'static str = "sft";
    type Objective<B: Backend + 'static> = Sft;

    /// A lower peak rate than pretraining, fewer steps.
    fn defaults() -> RunConfig {
        tuning_defaults(1e-3)
    }

    fn init(&self) -> Init<'_> {
        Init::Checkpoint(&self.init)
    }

    fn data(&self) -> Option<(&Path, &'static str)> {
        Some((&self.data, "prepare sft"))
    }

    fn open<B: Backend + 'static>(
        &self,
        _be: &B,
        ctx: &StageContext,
        progress: &dyn Fn(&str),
    ) -> Result<Sft> {
        let run = ctx.run;
        let objective = Sft::open(&ctx.prepared(&self.data))?.with_packing(run.pack);
        progress(&format!(
            "sft data {}: {} training examples ({} cut to T + 1 = {} tokens), {} val examples, {}",
            self.data.display(),
            objective.num_examples(),
            objective.cut,
            run.seq_len + 1,
            objective.num_val_examples(),
            if run.pack {
                "packed several to a row"
            } else {
                "one to a row"
            }
        ));
        Ok(objective)
    }
}
