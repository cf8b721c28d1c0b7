//! `eval pairs`: reward-model accuracy, or DPO implicit-reward accuracy against a reference,
//! on a `prepare prefs` split (see the module header of `eval/mod.rs`).

use super::{across, gather_items, seq_len, Result};
use crate::backend::Backend;
use crate::commands::inputs::{check_tokenizers, data_tokenizer, resolve_checkpoint};
use crate::commands::CommandError;
use crate::data::{fill_pair_batch, DataError, PairSplit, RankSlice, Tokenizer};
use crate::dist::Collective;
use crate::model::Gpt;
use crate::runtime::Runtime;
use crate::scoring::PairTally;
use crate::train::checkpoint;
use std::path::{Path, PathBuf};

/// `eval pairs`: what to score.
#[derive(Clone, Debug)]
pub struct EvalPairsJob {
    /// A reward checkpoint, or (with `reference`) a DPO policy; or a run directory.
    pub checkpoint: PathBuf,
    /// The DPO reference (the SFT model); `None` scores with the checkpoint's reward head.
    pub reference: Option<PathBuf>,
    /// DPO's beta (implicit reward scale).
    pub beta: f64,
    /// A `prepare prefs` directory.
    pub data: PathBuf,
    /// `val` or `train`: `prefs_{split}.{bin,idx}`.
    pub split: String,
    /// Pairs per batch (`2 *` this many rows).
    pub batch_size: usize,
    /// `T`; `None`: the checkpoint's max_seq_len.
    pub seq_len: Option<usize>,
    /// A PEFT adapter directory merged into `checkpoint` (`--adapter`; not the reference).
    pub adapter: Option<PathBuf>,
}

/// What `eval pairs` measured.
#[derive(Clone, Debug, PartialEq)]
pub struct PairReport {
    /// `reward` or `dpo`.
    pub mode: &'static str,
    pub split: String,
    /// Pairs skipped because a side is longer than `T` tokens.
    pub skipped: usize,
    pub tally: PairTally,
}

impl PairReport {
    pub fn table(&self) -> String {
        let x = &self.tally;
        format!(
            "| mode | split | pairs | skipped | accuracy | mean margin | reward chosen | reward rejected | loss |\n\
             | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n\
             | {} | {} | {} | {} | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} |\n",
            self.mode,
            self.split,
            x.pairs,
            self.skipped,
            x.accuracy(),
            x.margin(),
            x.mean_chosen(),
            x.mean_rejected(),
            x.loss()
        )
    }
}

/// Reward-model or DPO implicit-reward accuracy on the pairs of one split.
pub fn eval_pairs(rt: &Runtime, job: &EvalPairsJob, note: &dyn Fn(&str)) -> Result<PairReport> {
    crate::on_backend!(rt, be, comm => eval_pairs_on(be, &**comm, job, note))
}

/// Loads a checkpoint after checking its tokenizer against the data's.
fn load_checked<B: Backend>(
    be: &B,
    path: &Path,
    data: &Path,
    data_tok: &Tokenizer,
    adapter: Option<&Path>,
) -> Result<(PathBuf, Tokenizer, Gpt<B>)> {
    let ckpt = resolve_checkpoint(path)?;
    let tok = checkpoint::load_tokenizer(&ckpt)?;
    check_tokenizers(&ckpt, &tok, data, data_tok, "prepare prefs")?;
    let model = crate::commands::adapter::load_model_with_adapter(be, &ckpt, adapter)?;
    Ok((ckpt, tok, model))
}

fn eval_pairs_on<B: Backend>(
    be: &B,
    comm: &dyn Collective<B>,
    job: &EvalPairsJob,
    note: &dyn Fn(&str),
) -> Result<PairReport> {
    if job.batch_size == 0 {
        return Err(CommandError::arg("--batch-size", "must be at least 1 pair"));
    }
    let data_tok = data_tokenizer(&job.data)?;
    let (ckpt, tok, mut model) = load_checked(
        be,
        &job.checkpoint,
        &job.data,
        &data_tok,
        job.adapter.as_deref(),
    )?;
    let mut reference = open_reference(be, job, &ckpt, &model, &data_tok)?;
    let t = seq_len(job.seq_len, model.cfg.max_seq_len)?;
    if t < 2 {
        return Err(CommandError::arg(
            "--seq-len",
            "must be at least 2 for pairs",
        ));
    }
    let name = format!("prefs_{}", job.split);
    if !job.data.join(format!("{name}.bin")).exists() {
        return Err(DataError::InvalidArgument(format!(
            "{}: no {name}.bin (a `topcoat prepare prefs` directory has prefs_train and prefs_val)",
            job.data.display()
        ))
        .into());
    }
    let split = PairSplit::open(&job.data, &name, model.cfg.vocab_size)?;
    let usable: Vec<usize> = (0..split.len()).filter(|&i| split.fits(i, t)).collect();
    let mode = if reference.is_some() { "dpo" } else { "reward" };
    note(&format!(
        "eval pairs ({mode}): {} on {} {}: {} pairs ({} skipped: a side longer than T = {t}), {} per batch, on {}{}",
        ckpt.display(),
        job.data.display(),
        job.split,
        usable.len(),
        split.len() - usable.len(),
        job.batch_size,
        be.name(),
        across(comm.world_size())
    ));
    if usable.is_empty() {
        return Err(CommandError::invalid(format!(
            "none of the {} pairs fits in T = {t} tokens per side",
            split.len()
        )));
    }
    // Rank r of W scores batches r, r + W, ...; every pair's two rewards come back in pair
    // order and are tallied as one process tallies them.
    let slice = RankSlice::new(comm.rank(), comm.world_size())?;
    let p = job.batch_size;
    let mut mine = Vec::new();
    for (g, chunk) in usable.chunks(p).enumerate() {
        if !slice.takes(g as u64) {
            continue;
        }
        let batch = fill_pair_batch(&split, chunk, p, t, tok.eot());
        let rows = batch.rows();
        let rewards: Vec<f64> = match reference.as_mut() {
            None => model
                .reward_forward(be, &batch.inputs, rows, t, &batch.last)?
                .rewards
                .into_iter()
                .map(f64::from)
                .collect(),
            Some(r) => {
                let pi = model.sequence_logps(be, &batch.inputs, &batch.targets, rows, t)?;
                let re = r.sequence_logps(be, &batch.inputs, &batch.targets, rows, t)?;
                pi.iter()
                    .zip(&re)
                    .map(|(a, b)| job.beta * (a - b))
                    .collect()
            }
        };
        // A short last batch is padded to the batch's width, then cut off after the gather.
        mine.extend_from_slice(&rewards[..2 * batch.pairs]);
        mine.resize(mine.len() + 2 * (p - batch.pairs), 0.0);
    }
    let batches = usable.len().div_ceil(p);
    let all = gather_items(comm, batches, 2 * p, &mine)?;
    let mut tally = PairTally::default();
    tally.add(&all[..2 * usable.len()], usable.len());
    Ok(PairReport {
        mode,
        split: job.split.clone(),
        skipped: split.len() - usable.len(),
        tally,
    })
}

/// The DPO reference (`--reference`, with a valid `--beta` and the policy's shape), or `None`
/// for a reward model (which then must have a reward head).
fn open_reference<B: Backend>(
    be: &B,
    job: &EvalPairsJob,
    ckpt: &Path,
    model: &Gpt<B>,
    data_tok: &Tokenizer,
) -> Result<Option<Gpt<B>>> {
    let Some(r) = &job.reference else {
        if model.reward_head().is_none() {
            return Err(CommandError::invalid(format!(
                "{} has no reward head: give a reward checkpoint, or a DPO policy with \
                 --reference SFT_CHECKPOINT",
                ckpt.display()
            )));
        }
        return Ok(None);
    };
    if !(job.beta > 0.0 && job.beta.is_finite()) {
        return Err(CommandError::arg(
            "--beta",
            format!("{}: must be a positive number", job.beta),
        ));
    }
    let (rdir, _, rmodel) = load_checked(be, r, &job.data, data_tok, None)?;
    if rmodel.cfg != model.cfg {
        return Err(CommandError::invalid(format!(
            "reference {} has another model shape than the policy {}",
            rdir.display(),
            ckpt.display()
        )));
    }
    Ok(Some(rmodel))
}
