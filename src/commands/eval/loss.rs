//! `eval loss`: the mean token loss of a checkpoint over one split of a prepared data
//! directory (see the module header of `eval/mod.rs`).

use super::{across, gather_items, seq_len, Result};
use crate::backend::Backend;
use crate::commands::adapter::load_model_with_adapter;
use crate::commands::inputs::{check_tokenizers, data_tokenizer, resolve_checkpoint};
use crate::data::Loader;
use crate::dist::Collective;
use crate::model::{MemoryPlan, ModelError};
use crate::runtime::Runtime;
use crate::stages::pretrain::split_files;
use crate::train::checkpoint;
use std::path::PathBuf;

/// `eval loss`: what to measure.
#[derive(Clone, Debug)]
pub struct EvalLossJob {
    /// Checkpoint, or a run directory (its newest checkpoint).
    pub checkpoint: PathBuf,
    /// A prepared data directory (`topcoat prepare`).
    pub data: PathBuf,
    /// `val` or `train`: the `{split}_*.bin` shards.
    pub split: String,
    pub batch_size: usize,
    /// `T`; `None`: the checkpoint's max_seq_len.
    pub seq_len: Option<usize>,
    /// At most this many batches; `None`: one full pass.
    pub max_batches: Option<usize>,
    /// A PEFT adapter directory merged into the checkpoint (`--adapter`).
    pub adapter: Option<PathBuf>,
}

/// What `eval loss` measured.
#[derive(Clone, Debug, PartialEq)]
pub struct LossReport {
    pub checkpoint: PathBuf,
    pub split: String,
    pub batches: usize,
    pub tokens: usize,
    /// Mean token cross-entropy (nats).
    pub loss: f32,
}

impl LossReport {
    pub fn table(&self) -> String {
        format!(
            "| checkpoint | split | batches | tokens | loss | perplexity |\n\
             | --- | --- | --- | --- | --- | --- |\n\
             | {} | {} | {} | {} | {:.4} | {:.2} |\n",
            self.checkpoint.display(),
            self.split,
            self.batches,
            self.tokens,
            self.loss,
            (self.loss as f64).exp()
        )
    }
}

/// Mean token loss of a checkpoint over one split of a prepared data directory.
pub fn eval_loss(rt: &Runtime, job: &EvalLossJob, note: &dyn Fn(&str)) -> Result<LossReport> {
    crate::on_backend!(rt, be, comm => eval_loss_on(be, &**comm, job, note))
}

fn eval_loss_on<B: Backend>(
    be: &B,
    comm: &dyn Collective<B>,
    job: &EvalLossJob,
    note: &dyn Fn(&str),
) -> Result<LossReport> {
    let ckpt = resolve_checkpoint(&job.checkpoint)?;
    let tok = checkpoint::load_tokenizer(&ckpt)?;
    check_tokenizers(
        &ckpt,
        &tok,
        &job.data,
        &data_tokenizer(&job.data)?,
        "prepare",
    )?;
    let mut model = load_model_with_adapter(be, &ckpt, job.adapter.as_deref())?;
    let t = seq_len(job.seq_len, model.cfg.max_seq_len)?;
    // Before the loader reads a window: a batch the device cannot hold is a named error.
    MemoryPlan::training(&model.cfg, job.batch_size, t, |r| be.element_bytes(r))
        .activations_only()
        .check(&be.name(), be.memory_available())
        .map_err(ModelError::from)?;
    let files = split_files(&job.data, &job.split)?;
    // Rank r of W draws global batches r, r + W, ... of the one-process pass.
    let (rank, world) = (comm.rank(), comm.world_size());
    let mut loader =
        Loader::sequential(&files, job.batch_size, t, rank, world, model.cfg.vocab_size)?;
    let full = loader.global_batches_per_epoch() as usize;
    let n = job.max_batches.map_or(full, |m| m.clamp(1, full));
    note(&format!(
        "eval loss: {} on {} {} ({} shard(s), {} windows of T = {t}), {n} batch(es) of B = {} on {}{}",
        ckpt.display(),
        job.data.display(),
        job.split,
        files.len(),
        loader.num_windows(),
        job.batch_size,
        be.name(),
        across(world)
    ));
    let mut mine = Vec::new();
    for _ in 0..loader.rank_share(n as u64) {
        let batch = loader.next_batch();
        let loss = model.forward_loss(be, &batch.inputs, &batch.targets, batch.b, batch.t)?;
        mine.extend([loss.sum, loss.tokens as f64]);
    }
    // Per-batch sums in batch order, added as one process adds them.
    let all = gather_items(comm, n, 2, &mine)?;
    let (mut sum, mut tokens) = (0.0f64, 0usize);
    for b in all.chunks(2) {
        sum += b[0];
        tokens += b[1] as usize;
    }
    Ok(LossReport {
        checkpoint: ckpt,
        split: job.split.clone(),
        batches: n,
        tokens,
        loss: (sum / tokens.max(1) as f64) as f32,
    })
}
