//! Checkpoints of a data-parallel run: [`save_ranked`] gathers what the ranks hold to rank 0,
//! which writes the ordinary checkpoint (the same files at every world size and ZeRO stage);
//! [`resume_ranked`] has every rank read the same checkpoint from a shared filesystem and keep
//! its shard of the moments, cut afresh for the current world size.

use super::save::{write_checkpoint, write_synced, Contents};
use super::{load_model, read_training, sharded_optimizer, CheckpointError, Tensors, TrainState};
use crate::backend::{Backend, Role};
use crate::config::ModelConfig;
use crate::data::Tokenizer;
use crate::dist::Collective;
use crate::model::Gpt;
use crate::optim::AdamW;
use crate::train::{Result, TrainError};
use std::path::{Path, PathBuf};

/// Host values of every tensor for rank 0 (the weights and the moments `m`, `v`, in layout
/// order); the other ranks get empty lists. Under zero 1 the tensors another rank owns are
/// broadcast from it into temporary buffers, one tensor at a time (memory stays bounded by the
/// largest tensor); only rank 0 keeps what they carry.
fn gather<B: Backend>(
    be: &B,
    comm: &dyn Collective<B>,
    model: &Gpt<B>,
    opt: &AdamW<B>,
) -> Result<(Tensors, Tensors, Tensors)> {
    let writer = comm.rank() == 0;
    let (mut w, mut m, mut v) = (Vec::new(), Vec::new(), Vec::new());
    for (i, spec) in model.layout.specs.iter().enumerate() {
        // Under zero 0 every rank holds everything, and every rank holds a frozen tensor (a
        // LoRA model's base, which has no moments): rank 0 writes its own.
        let frozen = !spec.trainable;
        let owner = if opt.zero == 0 || frozen {
            0
        } else {
            opt.owner[i]
        };
        let local = |slot: &Option<B::Buf>| -> Result<Vec<f32>> {
            match slot {
                Some(b) => Ok(be.download(b)?),
                None if frozen => Ok(Vec::new()),
                None => unreachable!("the owner holds the moments"),
            }
        };
        if owner == comm.rank() && writer {
            w.push(be.download(&model.params[i])?);
            m.push(local(&opt.m[i])?);
            v.push(local(&opt.v[i])?);
            continue;
        }
        if owner == 0 {
            // Rank 0 holds it already; the others have nothing to send.
            continue;
        }
        let n = spec.numel();
        let mut tmp = [
            be.zeros(n, Role::State)?,
            be.zeros(n, Role::State)?,
            be.zeros(n, Role::State)?,
        ];
        if owner == comm.rank() {
            // The fp32 master (a download of an owned parameter) and the moments.
            be.write(&mut tmp[0], &be.download(&model.params[i])?)?;
            be.write(&mut tmp[1], &local(&opt.m[i])?)?;
            be.write(&mut tmp[2], &local(&opt.v[i])?)?;
        }
        let [a, b, c] = &mut tmp;
        comm.broadcast(be, &mut [a, b, c], owner)?;
        comm.wait(be)?;
        if writer {
            w.push(be.download(&tmp[0])?);
            m.push(be.download(&tmp[1])?);
            v.push(be.download(&tmp[2])?);
        }
    }
    Ok((w, m, v))
}

/// What rank 0 tells the others after its write: empty when the checkpoint is in place, else
/// `kind\0detail`.
fn outcome_bytes(result: &Result<PathBuf>) -> Vec<u8> {
    match result {
        Ok(_) => Vec::new(),
        Err(TrainError::Integrity(CheckpointError::NotFinite { what, .. })) => {
            format!("not_finite\0{what}").into_bytes()
        }
        Err(e) => format!("failed\0{e}").into_bytes(),
    }
}

/// Saves checkpoint `dest` of a data-parallel run; every rank calls it, in step. Under zero
/// 1 the weights and moments each rank owns are gathered to rank 0 first; rank 0 writes the
/// ordinary checkpoint ([`super::save`]: atomic, with its manifest; the files do not depend on
/// the world size or the ZeRO stage). Then every rank learns rank 0's outcome (a barrier): a
/// refused non-finite tensor is [`CheckpointError::NotFinite`] on every rank, any other failure
/// is rank 0's own error there and [`CheckpointError::RankFailed`] (naming rank 0 and its
/// error) on the others. Returns `dest` on every rank.
pub fn save_ranked<B: Backend>(
    be: &B,
    comm: &dyn Collective<B>,
    dest: &Path,
    model: &Gpt<B>,
    tokenizer: &Tokenizer,
    opt: &AdamW<B>,
    state: &TrainState,
) -> Result<PathBuf> {
    let (weights, m, v) = gather(be, comm, model, opt)?;
    let result = if comm.rank() == 0 {
        let contents = Contents {
            cfg: &model.cfg,
            specs: &model.layout.specs,
            weights,
            tokenizer,
            training: Some((m, v, state)),
        };
        write_checkpoint(dest, contents, &write_synced)
    } else {
        Ok(dest.to_path_buf())
    };
    let told = comm.broadcast_bytes(outcome_bytes(&result), 0)?;
    if comm.rank() == 0 || told.is_empty() {
        return result;
    }
    let text = String::from_utf8_lossy(&told);
    let (kind, detail) = text.split_once('\0').unwrap_or(("failed", &text));
    Err(match kind {
        "not_finite" => CheckpointError::NotFinite {
            dir: dest.to_path_buf(),
            what: detail.into(),
        },
        _ => CheckpointError::RankFailed {
            dir: dest.to_path_buf(),
            rank: 0,
            msg: detail.into(),
        },
    }
    .into())
}

/// Resumes a data-parallel run of stage `stage` from checkpoint `dir`; every rank calls it.
/// Each rank reads the whole checkpoint itself (the run directory must be on a filesystem all
/// ranks share), checks it like [`super::resume`], and keeps the moments of the tensors it
/// owns under `zero` at the current world size, which may differ from the one that wrote it.
/// When a rank cannot read it, every rank fails with
/// [`CheckpointError::RanksCannotRead`] naming the ranks (the failing rank with its own error).
pub fn resume_ranked<B: Backend>(
    be: &B,
    comm: &dyn Collective<B>,
    dir: &Path,
    wanted: &ModelConfig,
    stage: &str,
    zero: u8,
) -> Result<(Gpt<B>, AdamW<B>, TrainState)> {
    let read = (|| {
        super::load_state(dir, stage)?;
        let model = load_model(be, dir, Some(wanted))?;
        let (m, v, state) = read_training(dir, &model.layout.specs, stage)?;
        Ok::<_, TrainError>((model, m, v, state))
    })();
    if comm.world_size() > 1 {
        let mut failed = vec![0.0; comm.world_size()];
        failed[comm.rank()] = f64::from(u8::from(read.is_err()));
        comm.all_reduce_host(&mut failed)?;
        let ranks: Vec<String> = (0..failed.len())
            .filter(|&r| failed[r] != 0.0 && r != comm.rank())
            .map(|r| r.to_string())
            .collect();
        if read.is_ok() && !ranks.is_empty() {
            return Err(CheckpointError::RanksCannotRead {
                dir: dir.to_path_buf(),
                what: format!("rank(s) {} could not read it", ranks.join(", ")),
            }
            .into());
        }
    }
    let (mut model, m, v, state) = read?;
    let opt = sharded_optimizer(be, comm, &mut model, zero, m, v, &state)?;
    Ok((model, opt, state))
}
