//! The checks a training run passes before it allocates or writes anything: the run config's
//! values ([`RunConfig::validate`](crate::config::RunConfig::validate)), the memory plan
//! against the device ([`MemoryPlan`]), and, on `--resume`, that the run directory's newest
//! checkpoint was trained with this run's tokenizer. The stage runner calls [`check`] once the
//! model's shape and tokenizer are known.

use super::inputs::check_resume_tokenizer;
use super::stage::StageContext;
use super::CommandError;
use crate::backend::Backend;
use crate::config::ModelConfig;
use crate::model::{BatchFlag, FitQuery, MemoryPlan, ModelError, PlanOptions};
use std::path::Path;

/// Refuses a run that cannot work, naming why; `data` is the stage's prepared data directory,
/// `batch` how the stage counts `--batch-size`. Returns the memory plan the run fits in.
pub fn check<B: Backend>(
    be: &B,
    ctx: &StageContext,
    data: Option<&Path>,
    batch: BatchFlag,
) -> Result<MemoryPlan, CommandError> {
    ctx.run.validate()?;
    let opts = PlanOptions {
        recompute: ctx.run.recompute,
        zero: ctx.run.zero,
        world_size: ctx.run.world_size,
    };
    let plan = check_memory(
        be,
        &ctx.model,
        ctx.run.batch_size,
        ctx.run.seq_len,
        opts,
        batch,
    )?;
    if ctx.resume {
        // A fresh model's tokenizer is the data's; a fine-tuned one's is the --init checkpoint's.
        let data = data.filter(|_| ctx.checkpoint.is_none());
        check_resume_tokenizer(ctx.out, &ctx.tokenizer, data)?;
    }
    Ok(plan)
}

/// Refuses training `model` on micro-batches of `units` of `batch` (rows, pairs, prompts) of
/// `t` tokens (at the recompute level and ZeRO stage of `opts`) when the memory plan needs
/// more than the device has free, naming the flag that would make it fit (`model::fit`).
pub fn check_memory<B: Backend>(
    be: &B,
    model: &ModelConfig,
    units: usize,
    t: usize,
    opts: PlanOptions,
    batch: BatchFlag,
) -> Result<MemoryPlan, CommandError> {
    let query = FitQuery {
        cfg: model,
        units,
        seq_len: t,
        opts,
        batch,
    };
    query
        .check(&|r| be.element_bytes(r), &be.name(), be.memory_available())
        .map_err(|e| CommandError::from(ModelError::from(e)))
}
