//! Supervised fine-tuning (instruction tuning): next-token prediction on conversations, with the
//! loss on the assistant's tokens only.
//!
//! Algorithm: the SFT step of InstructGPT (Ouyang et al. 2022, "Training language models to
//! follow instructions with human feedback"): start from a pretrained model and minimise the mean
//! cross-entropy of the assistant's response tokens (and each response's closing `<|end|>`)
//! given the conversation so far; every other target is masked out (target -1: no loss, no
//! gradient). The shared loop in `train` supplies AdamW, the schedule, clipping and checkpoints.
//!
//! Data: an example of `n` tokens takes `n - 1` input slots: its ids but its last; the target of
//! slot `j` is id `j + 1` where that id's loss mask is set, else -1. Examples longer than `T + 1`
//! tokens are cut to `T + 1` (`prepare sft --max-len` should make this rare; those left with no
//! trained-on target are skipped). By default each row holds one example followed by
//! `<|endoftext|>` padding (target -1). With `pack = true` (run config) or `--pack`, whole
//! examples are laid end to end greedily: the next example goes into the current row if its
//! slots fit, else it starts the next row (an example is never split across rows; only the
//! tail of a row is padding). Packed examples do not see each other: positions restart at each
//! example and attention stays inside it (`model::Packing`), so each example's loss and
//! gradient are what they would be alone in a row, and a batch carries several times fewer
//! padding tokens when examples are much shorter than `T`. Examples are drawn in a permutation
//! drawn from `(seed, epoch)` per epoch (packing continues across an epoch boundary); the
//! position `(epoch, cursor)` is saved in checkpoints. Validation: the mean masked loss over the
//! first `val_batches * B` val examples in file order (packed into fewer batches with `pack`:
//! the same examples, so the same loss up to rounding).
//!
//! Ranks: the micro-batches above (packed or not) form one global stream, the same at every
//! world size; rank `r` of `W` takes micro-batches `r, r + W, ...`, laying out (and dropping)
//! the other ranks' ones to keep its place, so the packing is the global stream's. The position
//! saved is where the next group of `W` micro-batches starts: the same on every rank and what one
//! process saves, so a run resumes at another world size. Validation: batch `i` of the
//! validation batches above is scored by rank `i mod W`; each returns its summed loss and token
//! count.
//!
//! Departures: a micro-batch's loss is the mean over its own trained-on tokens, so micro-batches
//! with more response tokens do not weigh more; with packing a micro-batch holds a varying number
//! of examples.
//!
//! Command: `topcoat sft --init runs/pretrain --data DIR --out runs/sft [--pack]`
//! (DIR from `topcoat prepare sft chats.jsonl --out DIR --tokenizer runs/pretrain`).

use super::PreparedData;
use crate::backend::Backend;
use crate::data::{DataError, RankSlice, SftSplit};
use crate::model::{forward::Loss, Gpt, Packing};
use crate::rng::Rng;
use crate::train::{Objective, Result, TrainError, ValPartial};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

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
    /// Pack several whole examples per row.
    pack: bool,
    /// This rank's share of the stream and of the validation batches.
    ranks: RankSlice,
    /// Where the next group of `world` global micro-batches starts.
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
    fill_example(ids, mask, t, inputs, targets)
}

/// Input slots an example of `len` tokens takes in a row of `t`: its ids but the last, cut to `t`.
pub fn example_slots(len: usize, t: usize) -> usize {
    len.min(t + 1).saturating_sub(1)
}

/// Writes an example cut to `t + 1` tokens into the first [`example_slots`] entries of
/// `inputs`/`targets` (as [`fill_row`], without touching the rest). Returns whether any target
/// is unmasked.
pub fn fill_example(
    ids: &[u32],
    mask: &[bool],
    t: usize,
    inputs: &mut [i32],
    targets: &mut [i32],
) -> bool {
    let mut any = false;
    for j in 0..example_slots(ids.len(), t) {
        inputs[j] = ids[j] as i32;
        targets[j] = -1;
        if mask[j + 1] {
            targets[j] = ids[j + 1] as i32;
            any = true;
        }
    }
    any
}

/// One micro-batch as the model takes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SftBatch {
    /// `[B*T]` input ids and targets (-1: no loss).
    pub inputs: Vec<i32>,
    pub targets: Vec<i32>,
    /// How the examples sit in the rows when packed; `None`: one example per row.
    pub packing: Option<Packing>,
}

/// Lays examples into the `b` rows of one batch: one per row, or packed greedily.
pub struct BatchBuilder {
    b: usize,
    t: usize,
    pack: bool,
    inputs: Vec<i32>,
    targets: Vec<i32>,
    /// Slots of the examples placed in each row.
    lengths: Vec<Vec<usize>>,
    /// The row being filled and the slots used in it.
    row: usize,
    used: usize,
}

impl BatchBuilder {
    /// An empty batch: every input `pad`, every target -1.
    pub fn new(b: usize, t: usize, pad: u32, pack: bool) -> Self {
        Self {
            b,
            t,
            pack,
            inputs: vec![pad as i32; b * t],
            targets: vec![-1; b * t],
            lengths: vec![Vec::new(); b],
            row: 0,
            used: 0,
        }
    }

    /// Places a whole example (cut to `T + 1` tokens) in the current row, or at the start of the
    /// next one when it does not fit (always, without packing). Returns false, placing nothing,
    /// when the batch has no room left for it.
    pub fn push(&mut self, ids: &[u32], mask: &[bool]) -> bool {
        let slots = example_slots(ids.len(), self.t);
        let Some(placed) = self.lengths.get(self.row) else {
            return false; // no rows at all
        };
        if !placed.is_empty() && (!self.pack || self.used + slots > self.t) {
            if self.row + 1 == self.b {
                return false;
            }
            self.row += 1;
            self.used = 0;
        }
        let at = self.row * self.t + self.used;
        let end = at + slots;
        fill_example(
            ids,
            mask,
            self.t,
            &mut self.inputs[at..end],
            &mut self.targets[at..end],
        );
        self.lengths[self.row].push(slots);
        self.used += slots;
        true
    }

    /// Whether no example has been placed.
    pub fn is_empty(&self) -> bool {
        self.lengths[0].is_empty()
    }

    /// The batch, with its packing when packed.
    pub fn finish(self) -> SftBatch {
        let packing = self.pack.then(|| {
            Packing::from_lengths(&self.lengths, self.t).expect("rows are filled to at most T")
        });
        SftBatch {
            inputs: self.inputs,
            targets: self.targets,
            packing,
        }
    }
}

impl Sft {
    /// Opens `dir/sft_train.{bin,idx}` and, if present, `dir/sft_val.{bin,idx}`.
    pub fn open(data: &PreparedData) -> std::result::Result<Self, DataError> {
        let PreparedData {
            dir,
            batch_size: b,
            seq_len: t,
            seed,
            vocab_size,
            pad,
            val_batches,
            ranks,
        } = *data;
        let ranks = RankSlice::new(ranks.rank, ranks.world)?;
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
            pack: false,
            ranks,
            pos: SftPosition::default(),
            order: Vec::new(),
            order_epoch: None,
            cut,
        })
    }

    /// Packs several whole examples into each row (see the module header).
    pub fn with_packing(mut self, pack: bool) -> Self {
        self.pack = pack;
        self
    }

    /// Training examples that are drawn (those with a trained-on target within `T + 1` tokens).
    pub fn num_examples(&self) -> usize {
        self.usable.len()
    }

    pub fn num_val_examples(&self) -> usize {
        self.val.as_ref().map_or(0, SftSplit::len)
    }

    /// This rank's next micro-batch, advancing the position past the group of `world` global
    /// micro-batches it belongs to (the other ranks' ones are laid out and dropped: the packing
    /// of each depends on where the one before it ended).
    pub fn next_batch(&mut self) -> SftBatch {
        for _ in 0..self.ranks.before() {
            self.global_batch();
        }
        let mine = self.global_batch();
        for _ in 0..self.ranks.after() {
            self.global_batch();
        }
        mine
    }

    /// The next micro-batch of the global stream, advancing the position past its examples.
    fn global_batch(&mut self) -> SftBatch {
        let mut batch = BatchBuilder::new(self.b, self.t, self.pad, self.pack);
        loop {
            if self.order_epoch != Some(self.pos.epoch) {
                self.order = self.usable.clone();
                Rng::new(self.seed ^ self.pos.epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15))
                    .shuffle(&mut self.order);
                self.order_epoch = Some(self.pos.epoch);
            }
            let (ids, mask) = self.train.example(self.order[self.pos.cursor]);
            if !batch.push(ids, mask) {
                break;
            }
            self.pos.cursor += 1;
            if self.pos.cursor == self.order.len() {
                self.pos = SftPosition {
                    epoch: self.pos.epoch + 1,
                    cursor: 0,
                };
            }
        }
        batch.finish()
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
        let batch = self.next_batch();
        Ok(model.forward_backward_with(
            be,
            &batch.inputs,
            &batch.targets,
            batch.packing.as_ref(),
            self.b,
            self.t,
            loss_scale,
        )?)
    }

    fn validate(&mut self, be: &B, model: &mut Gpt<B>) -> Result<Option<ValPartial>> {
        let Some(val) = self.val.as_ref() else {
            return Ok(None);
        };
        let (b, t) = (self.b, self.t);
        let n = val.len().min(self.val_batches.max(1) * b);
        let (mut sum, mut tokens) = (0.0f64, 0usize);
        let ranks = self.ranks;
        // Batch `i` of the validation batches is this rank's when `i mod W` is its rank.
        let mut index = 0u64;
        let mut eval = |batch: BatchBuilder| -> Result<()> {
            index += 1;
            if !ranks.takes(index - 1) {
                return Ok(());
            }
            let batch = batch.finish();
            if batch.targets.iter().all(|&x| x < 0) {
                return Ok(());
            }
            let p = batch.packing.as_ref();
            let loss = model.forward_loss_with(be, &batch.inputs, &batch.targets, p, b, t)?;
            sum += loss.sum;
            tokens += loss.tokens;
            Ok(())
        };
        let mut batch = BatchBuilder::new(b, t, self.pad, self.pack);
        for i in 0..n {
            let (ids, mask) = val.example(i);
            if !batch.push(ids, mask) {
                eval(std::mem::replace(
                    &mut batch,
                    BatchBuilder::new(b, t, self.pad, self.pack),
                ))?;
                assert!(batch.push(ids, mask), "an empty batch takes any example");
            }
        }
        if !batch.is_empty() {
            eval(batch)?;
        }
        Ok(Some(ValPartial {
            sum,
            count: tokens as f64,
        }))
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
