//! Supervised fine-tuning (instruction tuning): next-token prediction on conversations, with the
//! loss on the assistant's tokens only.
//!
//! Algorithm: the SFT step of InstructGPT (Ouyang et al. 2022, "Training language models to
//! follow instructions with human feedback"): start from a pretrained model and minimise the mean
//! cross-entropy of the assistant's response tokens (and each response's closing `<|end|>`)
//! given the conversation so far; every other target is masked out (target -1: no loss, no
//! gradient). The shared loop in `train` supplies AdamW, the schedule, clipping and checkpoints.
//!
//! Data: one example per row, no packing. A row holds `T` inputs: the example's ids but its last,
//! then `<|endoftext|>` padding; target `j` is id `j + 1` where that id's loss mask is set, else
//! -1. Examples longer than `T + 1` tokens are cut to `T + 1` (`prepare sft --max-len` should
//! make this rare; those left with no trained-on target are skipped). Examples are drawn in a
//! permutation drawn from `(seed, epoch)` per epoch; the position `(epoch, cursor)` is saved in
//! checkpoints. Validation: the mean masked loss over the val examples (at most `val_batches`
//! batches), in file order.
//!
//! Departures: no packing (packing several conversations in one row without letting them attend
//! to each other needs a per-document attention mask, which the Backend does not have yet); a
//! micro-batch's loss is the mean over its own trained-on tokens, so micro-batches with more
//! response tokens do not weigh more; one data-parallel rank only.
//!
//! Command: `topcoat sft --init runs/pretrain --data DIR --out runs/sft`
//! (DIR from `topcoat prepare sft chats.jsonl --out DIR --tokenizer runs/pretrain`).

use crate::backend::Backend;
use crate::data::{DataError, SftSplit};
use crate::model::{forward::Loss, Gpt};
use crate::rng::Rng;
use crate::train::{Objective, Result, TrainError};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where the example stream stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SftPosition {
    pub epoch: u64,
    /// Index into the epoch's permutation of the next example.
    pub cursor: usize,
}

/// Assistant-only next-token loss over a prepared SFT directory.
pub struct Sft {
    train: SftSplit,
    val: Option<SftSplit>,
    /// Training examples with at least one trained-on target within `T + 1` tokens.
    usable: Vec<usize>,
    b: usize,
    t: usize,
    pad: u32,
    seed: u64,
    val_batches: usize,
    pos: SftPosition,
    order: Vec<usize>,
    order_epoch: Option<u64>,
    /// Training examples longer than `T + 1` tokens (cut to fit).
    pub cut: usize,
}

/// Fills one row of `inputs`/`targets` (`t` wide each) with an example cut to `t + 1` tokens:
/// inputs are the ids but the last then `pad`; target `j` is `ids[j + 1]` where `mask[j + 1]`, else -1.
/// Returns whether any target is unmasked.
pub fn fill_row(
    ids: &[u32],
    mask: &[bool],
    t: usize,
    pad: u32,
    inputs: &mut [i32],
    targets: &mut [i32],
) -> bool {
    inputs.fill(pad as i32);
    targets.fill(-1);
    let n = (ids.len().min(t + 1)).saturating_sub(1);
    let mut any = false;
    for j in 0..n {
        inputs[j] = ids[j] as i32;
        if mask[j + 1] {
            targets[j] = ids[j + 1] as i32;
            any = true;
        }
    }
    any
}

impl Sft {
    /// Opens `dir/sft_train.{bin,idx}` and, if present, `dir/sft_val.{bin,idx}`.
    pub fn open(
        dir: &Path,
        b: usize,
        t: usize,
        seed: u64,
        vocab_size: usize,
        pad: u32,
        val_batches: usize,
    ) -> std::result::Result<Self, DataError> {
        let train = SftSplit::open(dir, "sft_train", vocab_size)?;
        let val = if dir.join("sft_val.bin").exists() {
            Some(SftSplit::open(dir, "sft_val", vocab_size)?)
        } else {
            None
        };
        let (mut inp, mut tgt) = (vec![0; t], vec![0; t]);
        let mut usable = Vec::new();
        let mut cut = 0;
        for i in 0..train.len() {
            let (ids, mask) = train.example(i);
            cut += usize::from(ids.len() > t + 1);
            if fill_row(ids, mask, t, pad, &mut inp, &mut tgt) {
                usable.push(i);
            }
        }
        if usable.is_empty() {
            return Err(DataError::InvalidArgument(format!(
                "{}: no training example has an assistant token within T + 1 = {} tokens",
                dir.display(),
                t + 1
            )));
        }
        Ok(Self {
            train,
            val,
            usable,
            b,
            t,
            pad,
            seed,
            val_batches,
            pos: SftPosition::default(),
            order: Vec::new(),
            order_epoch: None,
            cut,
        })
    }

    /// Training examples that are drawn (those with a trained-on target within `T + 1` tokens).
    pub fn num_examples(&self) -> usize {
        self.usable.len()
    }

    pub fn num_val_examples(&self) -> usize {
        self.val.as_ref().map_or(0, SftSplit::len)
    }

    /// The next micro-batch's `(inputs, targets)`, advancing the position.
    pub fn next_batch(&mut self) -> (Vec<i32>, Vec<i32>) {
        let (b, t) = (self.b, self.t);
        let (mut inputs, mut targets) = (vec![0; b * t], vec![0; b * t]);
        for r in 0..b {
            if self.order_epoch != Some(self.pos.epoch) {
                self.order = self.usable.clone();
                Rng::new(self.seed ^ self.pos.epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15))
                    .shuffle(&mut self.order);
                self.order_epoch = Some(self.pos.epoch);
            }
            let (ids, mask) = self.train.example(self.order[self.pos.cursor]);
            let rows = r * t..(r + 1) * t;
            fill_row(
                ids,
                mask,
                t,
                self.pad,
                &mut inputs[rows.clone()],
                &mut targets[rows],
            );
            self.pos.cursor += 1;
            if self.pos.cursor == self.order.len() {
                self.pos = SftPosition {
                    epoch: self.pos.epoch + 1,
                    cursor: 0,
                };
            }
        }
        (inputs, targets)
    }
}

impl<B: Backend> Objective<B> for Sft {
    fn name(&self) -> &str {
        "sft"
    }

    fn micro_step(
        &mut self,
        be: &B,
        model: &mut Gpt<B>,
        _rng: &mut Rng,
        loss_scale: f32,
    ) -> Result<Loss> {
        let (inputs, targets) = self.next_batch();
        Ok(model.forward_backward(be, &inputs, &targets, self.b, self.t, loss_scale)?)
    }

    fn validate(&mut self, be: &B, model: &mut Gpt<B>) -> Result<Option<f32>> {
        let Some(val) = self.val.as_ref() else {
            return Ok(None);
        };
        let (b, t) = (self.b, self.t);
        let n = val.len().min(self.val_batches.max(1) * b);
        let (mut sum, mut tokens) = (0.0f64, 0usize);
        for start in (0..n).step_by(b) {
            let (mut inputs, mut targets) = (vec![0; b * t], vec![0; b * t]);
            for r in 0..b {
                let rows = r * t..(r + 1) * t;
                let (inp, tgt) = (&mut inputs[rows.clone()], &mut targets[rows]);
                if start + r < n {
                    let (ids, mask) = val.example(start + r);
                    fill_row(ids, mask, t, self.pad, inp, tgt);
                } else {
                    inp.fill(self.pad as i32);
                    tgt.fill(-1);
                }
            }
            if targets.iter().all(|&x| x < 0) {
                continue;
            }
            let loss = model.forward_loss(be, &inputs, &targets, b, t)?;
            sum += loss.sum;
            tokens += loss.tokens;
        }
        Ok((tokens > 0).then(|| (sum / tokens as f64) as f32))
    }

    fn data_position(&self) -> serde_json::Value {
        serde_json::to_value(self.pos).expect("a position serialises")
    }

    fn set_data_position(&mut self, pos: &serde_json::Value) -> Result<()> {
        let pos: SftPosition =
            serde_json::from_value(pos.clone()).map_err(|e| TrainError::Checkpoint {
                path: PathBuf::from("train_state.json"),
                msg: format!("bad SFT data position: {e}"),
            })?;
        if pos.cursor >= self.usable.len() {
            return Err(TrainError::Checkpoint {
                path: PathBuf::from("train_state.json"),
                msg: format!(
                    "SFT data position {} is past the {} training examples: was the data re-prepared?",
                    pos.cursor,
                    self.usable.len()
                ),
            });
        }
        self.pos = pos;
        Ok(())
    }
}
