//! Reward modelling: learn a scalar score of a conversation from pairwise human preferences.
//!
//! Algorithm: the reward-model step of Stiennon et al. 2020 ("Learning to summarize from human
//! feedback") and InstructGPT (Ouyang et al. 2022, "Training language models to follow
//! instructions with human feedback"). The model is the SFT checkpoint's transformer with the LM
//! head replaced in use by a scalar head (model/reward.rs) read at the final hidden state of each
//! sequence's last response token (the `<|end|>` closing the assistant's turn). For a pair, the
//! Bradley-Terry model says `P(chosen preferred) = sigmoid(r_chosen - r_rejected)`; the loss is
//! its negative log-likelihood, `-log sigmoid(r_chosen - r_rejected)`, averaged over the pairs of
//! a micro-batch. Logged per step and per validation: the loss, `accuracy` (the fraction of pairs
//! with `r_chosen > r_rejected`, ties count as wrong), `margin` (the mean of
//! `r_chosen - r_rejected`) and `reward_mean` / `reward_min` / `reward_max` over both sides.
//!
//! Data: a `prepare prefs` directory; a micro-batch of `batch_size` rows holds `batch_size / 2`
//! pairs, chosen and rejected side by side (data/pairs.rs); a pair with a side longer than
//! `seq_len` tokens is skipped (counted when the run starts). Pairs are drawn in a seeded
//! permutation per epoch, position saved in checkpoints. Validation: the val pairs in file order,
//! at most `val_batches` batches.
//!
//! Ranks: the micro-batches of pairs form one global stream (data/pairs.rs); rank `r` of `W`
//! takes micro-batches `r, r + W, ...` and validation batches `r, r + W, ...`, returning its
//! summed loss and pair count; the logged extras are this rank's means (averaged over ranks by
//! the loop).
//!
//! Departures: InstructGPT shows a labeller's K ranked responses to one prompt and trains on all
//! K-choose-2 pairs in one batch element; here every pair stands alone. InstructGPT also shifts
//! the final reward so that SFT demonstrations score 0 on average; not done here. The head's
//! weight starts as N(0, 1/C) (rewards of unit spread) rather than the papers' unstated
//! initialisation; the tied LM head is kept in the checkpoint but takes no part in training.
//!
//! Command: `topcoat reward --init runs/sft --data DIR --out runs/reward`
//! (DIR from `topcoat prepare prefs prefs.jsonl --out DIR --tokenizer runs/sft`).

use super::PreparedData;
use crate::backend::Backend;
use crate::data::{fill_pair_batch, DataError, PairLoader, PairPosition, PairSplit, RankSlice};
use crate::model::{forward::Loss, Gpt};
use crate::rng::Rng;
use crate::train::{Extras, Objective, Result, TrainError, ValPartial};
use std::path::PathBuf;

/// The Bradley-Terry loss of one batch of pairs, its gradient, and what is logged.
#[derive(Clone, Debug, PartialEq)]
pub struct BradleyTerry {
    /// Mean of `-log sigmoid(r_chosen - r_rejected)` over the real pairs.
    pub mean: f32,
    pub sum: f64,
    /// Per row, `scale * d(mean)/d(reward)` (zero on padding rows).
    pub drewards: Vec<f32>,
    /// Per real pair, `r_chosen - r_rejected`.
    pub margins: Vec<f32>,
}

/// `-log sigmoid(x)`, stable for large `|x|`.
fn neg_log_sigmoid(x: f64) -> f64 {
    (-x).max(0.0) + (-x.abs()).exp().ln_1p()
}

/// `sigmoid(-x)`, stable for large `|x|`.
fn sigmoid_neg(x: f64) -> f64 {
    if x >= 0.0 {
        let e = (-x).exp();
        e / (1.0 + e)
    } else {
        1.0 / (1.0 + x.exp())
    }
}

/// The Bradley-Terry loss over the first `pairs` pairs of `rewards` (rows `2i` chosen, `2i + 1`
/// rejected; later rows are padding), with gradients scaled by `scale`:
/// `dL/dr_chosen = -scale * sigmoid(-(r_c - r_r)) / pairs`, `dL/dr_rejected` its negative.
pub fn bradley_terry(rewards: &[f32], pairs: usize, scale: f32) -> BradleyTerry {
    assert!(2 * pairs <= rewards.len() && pairs > 0, "no pair to score");
    let mut drewards = vec![0.0f32; rewards.len()];
    let mut margins = Vec::with_capacity(pairs);
    let mut sum = 0.0f64;
    for i in 0..pairs {
        let m = rewards[2 * i] as f64 - rewards[2 * i + 1] as f64;
        sum += neg_log_sigmoid(m);
        let d = scale as f64 * sigmoid_neg(m) / pairs as f64;
        drewards[2 * i] = -d as f32;
        drewards[2 * i + 1] = d as f32;
        margins.push(m as f32);
    }
    BradleyTerry {
        mean: (sum / pairs as f64) as f32,
        sum,
        drewards,
        margins,
    }
}

/// Running totals of the logged values.
#[derive(Clone, Debug, Default)]
struct Tally {
    pairs: usize,
    correct: usize,
    margin_sum: f64,
    reward_sum: f64,
    rewards: usize,
    min: f32,
    max: f32,
}

impl Tally {
    fn add(&mut self, rewards: &[f32], bt: &BradleyTerry) {
        let real = &rewards[..2 * bt.margins.len()];
        if self.rewards == 0 {
            (self.min, self.max) = (f32::INFINITY, f32::NEG_INFINITY);
        }
        self.pairs += bt.margins.len();
        self.correct += bt.margins.iter().filter(|&&m| m > 0.0).count();
        self.margin_sum += bt.margins.iter().map(|&m| m as f64).sum::<f64>();
        self.reward_sum += real.iter().map(|&r| r as f64).sum::<f64>();
        self.rewards += real.len();
        for &r in real {
            self.min = self.min.min(r);
            self.max = self.max.max(r);
        }
    }

    fn extras(&self) -> Extras {
        let mut x = Extras::default();
        if self.pairs > 0 {
            x.push("accuracy", self.correct as f32 / self.pairs as f32);
            x.push("margin", (self.margin_sum / self.pairs as f64) as f32);
            x.push(
                "reward_mean",
                (self.reward_sum / self.rewards as f64) as f32,
            );
            x.push("reward_min", self.min);
            x.push("reward_max", self.max);
        }
        x
    }
}

/// Bradley-Terry reward modelling over a prepared preference directory.
pub struct Reward {
    train: PairLoader,
    val: Option<PairSplit>,
    /// Val pairs whose sides fit in `T` tokens, in file order.
    val_usable: Vec<usize>,
    /// Pairs per micro-batch (`batch_size / 2`).
    pairs: usize,
    t: usize,
    pad: u32,
    val_batches: usize,
    tally: Tally,
}

impl Reward {
    /// Opens `dir/prefs_train.{bin,idx}` and, if present, `dir/prefs_val.{bin,idx}`;
    /// `batch_size` rows (even: a chosen and a rejected row per pair) of `t` tokens.
    pub fn open(data: &PreparedData) -> std::result::Result<Self, DataError> {
        let PreparedData {
            dir,
            batch_size,
            seq_len: t,
            seed,
            vocab_size,
            pad,
            val_batches,
            ranks,
        } = *data;
        let ranks = RankSlice::new(ranks.rank, ranks.world)?;
        if batch_size < 2 || batch_size % 2 != 0 {
            return Err(DataError::InvalidArgument(format!(
                "batch_size {batch_size}: the reward stage needs an even number of rows \
                 (a chosen and a rejected row per pair)"
            )));
        }
        let pairs = batch_size / 2;
        let train = PairSplit::open(dir, "prefs_train", vocab_size)?;
        let train = PairLoader::new(train, pairs, t, pad, seed)
            .map_err(|e| DataError::InvalidArgument(format!("{}: {e}", dir.display())))?
            .with_ranks(ranks);
        let val = if dir.join("prefs_val.bin").exists() {
            Some(PairSplit::open(dir, "prefs_val", vocab_size)?)
        } else {
            None
        };
        let val_usable = val.as_ref().map_or(Vec::new(), |v| {
            (0..v.len()).filter(|&i| v.fits(i, t)).collect()
        });
        Ok(Self {
            train,
            val,
            val_usable,
            pairs,
            t,
            pad,
            val_batches,
            tally: Tally::default(),
        })
    }

    /// Training pairs drawn (both sides fit in `T` tokens).
    pub fn num_pairs(&self) -> usize {
        self.train.num_pairs()
    }

    /// Training pairs skipped because a side is longer than `T` tokens.
    pub fn too_long(&self) -> usize {
        self.train.too_long
    }

    /// Validation pairs used (both sides fit in `T` tokens).
    pub fn num_val_pairs(&self) -> usize {
        self.val_usable.len()
    }
}

impl<B: Backend> Objective<B> for Reward {
    fn name(&self) -> &str {
        "reward"
    }

    fn micro_step(
        &mut self,
        be: &B,
        model: &mut Gpt<B>,
        _rng: &mut Rng,
        loss_scale: f32,
    ) -> Result<Loss> {
        let batch = self.train.next_batch();
        let pass = model.reward_forward(be, &batch.inputs, batch.rows(), self.t, &batch.last)?;
        let bt = bradley_terry(&pass.rewards, batch.pairs, loss_scale);
        model.reward_backward(be, &batch.inputs, &pass, &bt.drewards)?;
        self.tally.add(&pass.rewards, &bt);
        Ok(Loss {
            mean: bt.mean,
            sum: bt.sum,
            tokens: batch.tokens(),
        })
    }

    fn validate(&mut self, be: &B, model: &mut Gpt<B>) -> Result<Option<ValPartial>> {
        let Some(val) = self.val.as_ref() else {
            return Ok(None);
        };
        let n = self
            .val_usable
            .len()
            .min(self.val_batches.max(1) * self.pairs);
        let ranks = self.train.ranks();
        let (mut sum, mut count) = (0.0f64, 0usize);
        let chunks = self.val_usable[..n].chunks(self.pairs);
        for (_, chunk) in chunks.enumerate().filter(|&(i, _)| ranks.takes(i as u64)) {
            let batch = fill_pair_batch(val, chunk, self.pairs, self.t, self.pad);
            let pass =
                model.reward_forward(be, &batch.inputs, batch.rows(), self.t, &batch.last)?;
            let bt = bradley_terry(&pass.rewards, batch.pairs, 1.0);
            sum += bt.sum;
            count += chunk.len();
            self.tally.add(&pass.rewards, &bt);
        }
        Ok(Some(ValPartial {
            sum,
            count: count as f64,
        }))
    }

    fn data_position(&self) -> serde_json::Value {
        serde_json::to_value(self.train.position()).expect("a position serialises")
    }

    fn set_data_position(&mut self, pos: &serde_json::Value) -> Result<()> {
        let bad = |msg: String| TrainError::Checkpoint {
            path: PathBuf::from("train_state.json"),
            msg,
        };
        let pos: PairPosition = serde_json::from_value(pos.clone())
            .map_err(|e| bad(format!("bad reward data position: {e}")))?;
        self.train.set_position(pos).map_err(|e| bad(e.to_string()))
    }

    fn take_metrics(&mut self) -> Extras {
        std::mem::take(&mut self.tally).extras()
    }
}
