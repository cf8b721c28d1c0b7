//! `dpo` as a library call: preference tuning of an SFT checkpoint on `prepare prefs` pairs
//! (`stages/dpo.rs`), on the shared stage runner. Before training, the reference pass: the
//! `--init` checkpoint loaded as the frozen reference, the log-probabilities of the train pairs
//! this rank draws in the run and of its val pairs computed and stored in the run directory
//! (`ref_logps.bin`, by rank 0), the reference dropped; a resumed run reuses the stored ones
//! when they match the data, computing only those it needs and the file lacks. A LoRA run
//! loads no second model: its reference is the policy with its adapters switched off (the
//! frozen `--init` weights), so the pass runs once the policy is built ([`Stage::with_model`]).

use super::stage::{tuning_defaults, Init, Result, Stage, StageContext, TrainJob};
use crate::backend::Backend;
use crate::config::RunConfig;
use crate::model::BatchFlag;
use crate::model::Gpt;
use crate::stages::dpo::reference::RefLogps;
use crate::stages::dpo::{rank_micro_batches, Dpo, DpoLoss};
use crate::train::checkpoint;
use std::path::{Path, PathBuf};

/// What DPO adds to the shared set-up.
pub struct DpoStage {
    /// The SFT checkpoint (or a run directory: its newest checkpoint): the policy's start and
    /// the frozen reference.
    pub init: PathBuf,
    /// Directory from `prepare prefs`.
    pub data: PathBuf,
    /// Strength of the pull toward the reference.
    pub beta: f64,
    pub loss: DpoLoss,
}

/// A DPO run (`run.batch_size` counts pairs per micro-batch).
pub type DpoJob = TrainJob<DpoStage>;

impl Stage for DpoStage {
    const NAME: &'static str = "dpo";
    type Objective<B: Backend + 'static> = Dpo;

    /// A low peak rate (the policy should stay near the reference), few steps, 4 pairs (8
    /// rows) per micro-batch.
    fn defaults() -> RunConfig {
        RunConfig {
            batch_size: 4,
            weight_decay: 0.0,
            ..tuning_defaults(1e-4)
        }
    }

    /// Pairs: two rows each.
    fn batch_flag(&self) -> BatchFlag {
        BatchFlag {
            rows_per_unit: 2,
            ..BatchFlag::ROWS_LORA
        }
    }

    fn init(&self) -> Init<'_> {
        Init::Checkpoint(&self.init)
    }

    fn data(&self) -> Option<(&Path, &'static str)> {
        Some((&self.data, "prepare prefs"))
    }

    fn open<B: Backend + 'static>(
        &self,
        be: &B,
        ctx: &StageContext,
        progress: &dyn Fn(&str),
    ) -> Result<Dpo> {
        let run = ctx.run;
        let mut objective = Dpo::open(&ctx.prepared(&self.data), self.loss, self.beta)?;
        progress(&format!(
            "dpo data {}: {} training pairs ({} skipped: a side longer than T = {}), {} val \
             pairs; {:?} loss, beta {}",
            self.data.display(),
            objective.num_pairs(),
            objective.too_long(),
            run.seq_len,
            objective.num_val_pairs(),
            self.loss,
            self.beta
        ));
        if ctx.model.lora.is_none() {
            let reference = reference_logps(be, ctx, &objective, None, progress)?;
            objective.set_reference(reference)?;
        }
        Ok(objective)
    }

    /// A LoRA run's reference pass: the policy with its adapters off.
    fn with_model<B: Backend + 'static>(
        &self,
        be: &B,
        ctx: &StageContext,
        objective: &mut Dpo,
        model: &mut Gpt<B>,
        progress: &dyn Fn(&str),
    ) -> Result<()> {
        if ctx.model.lora.is_some() {
            let reference = reference_logps(be, ctx, objective, Some(model), progress)?;
            objective.set_reference(reference)?;
        }
        Ok(())
    }
}

/// The reference log-probabilities of the pairs this rank draws in the run (and its validation
/// pairs): the stored ones when resuming and they match the data, with any this rank needs and
/// the file lacks computed afresh (rank 0 stores the table before training starts). With
/// `policy` (a LoRA run's), the reference is that model with its adapters off; without, the
/// `--init` checkpoint, loaded for the pass alone.
fn reference_logps<B: Backend>(
    be: &B,
    ctx: &StageContext,
    objective: &Dpo,
    policy: Option<&mut Gpt<B>>,
    progress: &dyn Fn(&str),
) -> Result<RefLogps> {
    let path = RefLogps::path(ctx.out);
    let mut table = None;
    if ctx.resume {
        if let Some(stored) = RefLogps::load(ctx.out)? {
            let n_val = objective.num_val_pairs();
            let n_train = objective.num_pairs() + objective.too_long();
            match stored.mismatch(ctx.run.seq_len, objective.fingerprint(), n_train, n_val) {
                None => table = Some(stored),
                Some(why) => progress(&format!(
                    "reference log-probabilities in {} do not match ({why}): recomputing",
                    path.display()
                )),
            }
        }
    }
    let reused = table.is_some();
    let mut table = table.unwrap_or_else(|| objective.empty_reference());
    let needed = objective.rank_pairs(rank_micro_batches(ctx.run));
    let missing = Dpo::missing(&table, &needed);
    if reused && missing.0.is_empty() && missing.1.is_empty() {
        progress(&format!(
            "reference log-probabilities: reusing {}",
            path.display()
        ));
        return Ok(table);
    }
    let started = std::time::Instant::now();
    let ckpt = ctx.starting_checkpoint()?;
    let source = match policy {
        Some(model) => {
            let was = model.adapters_enabled();
            model.set_adapters_enabled(false);
            let filled = objective.fill_reference(be, model, &mut table, &missing);
            model.set_adapters_enabled(was);
            filled?;
            format!("{} (the policy with its LoRA adapters off)", ckpt.display())
        }
        None => {
            // The reference lives only for this pass: its memory is free again before the
            // policy loads.
            let mut reference = checkpoint::load_model(be, ckpt, None)?;
            objective.fill_reference(be, &mut reference, &mut table, &missing)?;
            ckpt.display().to_string()
        }
    };
    if ctx.run.rank == 0 {
        table.save(ctx.out)?;
    }
    progress(&format!(
        "reference pass (rank {} of {}): {} train and {} val pairs with {} in {:.1} s -> {}",
        ctx.run.rank,
        ctx.run.world_size,
        missing.0.len(),
        missing.1.len(),
        source,
        started.elapsed().as_secs_f64(),
        path.display()
    ));
    Ok(table)
}
