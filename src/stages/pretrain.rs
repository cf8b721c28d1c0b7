//! Pretraining: next-token prediction on raw text (the data labels itself).
//!
//! Algorithm: the GPT-2 recipe (Radford et al. 2019, "Language Models are Unsupervised
//! Multitask Learners"): minimise the mean cross-entropy of every next token over windows of
//! `T + 1` tokens drawn from token shards, with AdamW, warmup + cosine decay and global-norm
//! clipping (the shared loop in `train`). Departures: windows are drawn in a seeded shuffled
//! order per epoch rather than streamed, and documents are separated only by `<|endoftext|>`
//! (attention crosses document boundaries, as in GPT-2 and llm.c).
//!
//! Ranks: the windows form one global stream of micro-batches (data/loader.rs), shuffled per
//! epoch the same way at every world size; rank `r` of `W` takes micro-batches `r, r + W, ...`,
//! and the data position saved in checkpoints is the stream's (world-size-free). Validation:
//! the first `val_batches` batches of the val split, batch `i` scored by rank `i mod W`.
//!
//! Command: `topcoat pretrain --data DIR --out runs/NAME` (no `--data`: the embedded corpus).

use crate::backend::Backend;
use crate::data::dataset::expect_kind;
use crate::data::{DataError, DatasetKind, Loader, LoaderPosition};
use crate::model::{forward::Loss, Gpt};
use crate::rng::Rng;
use crate::train::{Objective, Result, TrainError, ValPartial};
use std::path::{Path, PathBuf};

/// The shard files of one split (`train` or `val`) in a prepared data directory, sorted; an SFT
/// or preference dataset is refused by name.
pub fn split_files(dir: &Path, split: &str) -> std::result::Result<Vec<PathBuf>, DataError> {
    expect_kind(dir, DatasetKind::Text)?;
    let entries = std::fs::read_dir(dir).map_err(|source| DataError::Io {
        path: dir.to_path_buf(),
        op: "list",
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            name.starts_with(&format!("{split}_")) && name.ends_with(".bin")
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(DataError::NoShards {
            what: format!("no {split}_*.bin files in {}", dir.display()),
        });
    }
    Ok(files)
}

/// Next-token prediction over a prepared data directory.
pub struct Pretrain {
    train: Loader,
    val: Option<Loader>,
    val_batches: usize,
}

impl Pretrain {
    /// Opens `dir/train_*.bin` (shuffled, this rank's share of the global stream) and, unless `val_batches` is 0
    /// (validation off), `dir/val_*.bin` if present.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        dir: &Path,
        b: usize,
        t: usize,
        seed: u64,
        rank: usize,
        world: usize,
        vocab_size: usize,
        val_batches: usize,
    ) -> std::result::Result<Self, DataError> {
        let train_files = split_files(dir, "train")?;
        let train = Loader::sequential(&train_files, b, t, rank, world, vocab_size)?.shuffled(seed);
        let val = match split_files(dir, "val") {
            _ if val_batches == 0 => None,
            Ok(files) => Some(
                Loader::sequential(&files, b, t, rank, world, vocab_size).map_err(|e| match e {
                    DataError::NoWindow { .. } => DataError::InvalidArgument(format!(
                        "the validation split of {}: {e}; or turn validation off with \
                         --val-every 0",
                        dir.display()
                    )),
                    other => other,
                })?,
            ),
            Err(DataError::NoShards { .. }) => None,
            Err(e) => return Err(e),
        };
        Ok(Self {
            train,
            val,
            val_batches,
        })
    }
}

impl<B: Backend> Objective<B> for Pretrain {
    fn name(&self) -> &str {
        "pretrain"
    }

    fn micro_step(
        &mut self,
        be: &B,
        model: &mut Gpt<B>,
        _rng: &mut Rng,
        loss_scale: f32,
    ) -> Result<Loss> {
        let batch = self.train.next_batch();
        Ok(model.forward_backward(
            be,
            &batch.inputs,
            &batch.targets,
            batch.b,
            batch.t,
            loss_scale,
        )?)
    }

    fn validate(&mut self, be: &B, model: &mut Gpt<B>) -> Result<Option<ValPartial>> {
        let Some(val) = self.val.as_mut() else {
            return Ok(None);
        };
        val.reset();
        // The validation set is the first `val_batches` global batches (at most one pass), the
        // same at every world size; this rank scores batches `rank, rank + W, ...` of it.
        let n = (self.val_batches as u64)
            .min(val.global_batches_per_epoch())
            .max(1);
        let (mut sum, mut tokens) = (0.0f64, 0usize);
        for _ in 0..val.rank_share(n) {
            let batch = val.next_batch();
            let loss = model.forward_loss(be, &batch.inputs, &batch.targets, batch.b, batch.t)?;
            sum += loss.sum;
            tokens += loss.tokens;
        }
        Ok(Some(ValPartial {
            sum,
            count: tokens as f64,
        }))
    }

    fn data_position(&self) -> serde_json::Value {
        serde_json::to_value(self.train.position()).expect("a position serialises")
    }

    fn set_data_position(&mut self, pos: &serde_json::Value) -> Result<()> {
        let pos: LoaderPosition =
            serde_json::from_value(pos.clone()).map_err(|e| TrainError::Checkpoint {
                path: PathBuf::from("train_state.json"),
                msg: format!("bad data position: {e}"),
            })?;
        self.train.set_position(pos);
        Ok(())
    }
}
