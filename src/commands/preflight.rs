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
/// `held` are the models the stage holds beside the trained one, each with the rows and
/// tokens of its forward passes ([`Stage::held_models`](super::stage::Stage::held_models)).
pub fn check<B: Backend>(
    be: &B,
    ctx: &StageContext,
    data: Option<&Path>,
    batch: BatchFlag,
    held: &[HeldModel],
) -> Result<MemoryPlan, CommandError> {
    ctx.run.validate()?;
    let opts = PlanOptions {
        recompute: ctx.run.recompute,
        zero: ctx.run.zero,
        world_size: ctx.run.world_size,
        logit_rows: None,
    };
    let bytes = |r| be.element_bytes(r);
    let held = held.iter().map(|h| h.bytes(&bytes)).sum();
    let plan = check_memory(
        be,
        &ctx.model,
        ctx.run.batch_size,
        ctx.run.seq_len,
        opts,
        batch,
        held,
    )?;
    if ctx.resume {
        // A fresh model's tokenizer is the data's; a fine-tuned one's is the --init checkpoint's.
        let data = data.filter(|_| ctx.checkpoint.is_none());
        check_resume_tokenizer(ctx.out, &ctx.tokenizer, data)?;
    }
    Ok(plan)
}

/// A model a stage holds beside the one it trains, for forward passes of `rows x seq_len`
/// (RL's reference and reward model), with `extra` elements of its own (a reward head).
#[derive(Clone, Debug)]
pub struct HeldModel {
    pub cfg: ModelConfig,
    pub rows: usize,
    pub seq_len: usize,
    pub extra: usize,
}

impl HeldModel {
    /// Its bytes at `bytes(role)` per element ([`MemoryPlan::held_model`]).
    pub fn bytes(&self, bytes: &dyn Fn(crate::backend::Role) -> usize) -> u128 {
        let param = bytes(crate::backend::Role::Param) as u128;
        MemoryPlan::held_model(&self.cfg, self.rows, self.seq_len, bytes)
            + self.extra as u128 * param
    }
}

/// Refuses training `model` on micro-batches of `units` of `batch` (rows, pairs, prompts) of
/// `t` tokens (at the recompute level and ZeRO stage of `opts`) when the memory plan needs
/// more than the device has free besides `held` bytes of other models, naming the flag that would make it fit (`model::fit`).
pub fn check_memory<B: Backend>(
    be: &B,
    model: &ModelConfig,
    units: usize,
    t: usize,
    opts: PlanOptions,
    batch: BatchFlag,
    held: u128,
) -> Result<MemoryPlan, CommandError> {
    let query = FitQuery {
        cfg: model,
        units,
        seq_len: t,
        opts,
        batch,
        held,
    };
    query
        .check(&|r| be.element_bytes(r), &be.name(), be.memory_available())
        .map_err(|e| CommandError::from(ModelError::from(e)))
}
