//! The checks a training run passes before it allocates or writes anything: the run config's
//! values ([`RunConfig::validate`](crate::config::RunConfig::validate)), the memory plan
//! against the device ([`MemoryPlan`]), and, on `--resume`, that the run directory's newest
//! checkpoint was trained with this run's tokenizer. The stage runner calls [`check`] once the
//! model's shape and tokenizer are known.

use super::inputs::check_resume_tokenizer;
use super::stage::StageContext;
use super::CommandError;
use crate::backend::Backend;
use crate::model::{MemoryPlan, ModelError, PlanOptions};
use std::path::Path;

/// Refuses a run that cannot work, naming why; `data` is the stage's prepared data directory.
pub fn check<B: Backend>(
    be: &B,
    ctx: &StageContext,
    data: Option<&Path>,
) -> Result<(), CommandError> {
    ctx.run.validate()?;
    let opts = PlanOptions {
        recompute: ctx.run.recompute,
        zero: ctx.run.zero,
        world_size: ctx.run.world_size,
    };
    check_memory(be, ctx.run.batch_size, ctx.run.seq_len, opts, &ctx.model)?;
    if ctx.resume {
        // A fresh model's tokenizer is the data's; a fine-tuned one's is the --init checkpoint's.
        let data = data.filter(|_| ctx.checkpoint.is_none());
        check_resume_tokenizer(ctx.out, &ctx.tokenizer, data)?;
    }
    Ok(())
}

/// Refuses training `model` on `b x t` micro-batches (at the recompute level and ZeRO stage
/// of `opts`) when the memory plan needs more than the device has free.
pub fn check_memory<B: Backend>(
    be: &B,
    b: usize,
    t: usize,
    opts: PlanOptions,
    model: &crate::config::ModelConfig,
) -> Result<(), CommandError> {
    MemoryPlan::training_with(model, b, t, opts, |r| be.element_bytes(r))
        .check(&be.name(), be.memory_available())
        .map_err(|e| CommandError::from(ModelError::from(e)))
}
