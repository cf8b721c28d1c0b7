//! Direct preference optimisation: train the policy straight on "chosen beats rejected" pairs,
//! against a frozen reference (the SFT checkpoint), with no reward model and no RL loop.
//!
//! Algorithm: DPO (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is
//! Secretly a Reward Model"). For a pair with prompt `x`, chosen `y_w` and rejected `y_l`, let
//! `logp(y|x)` be the sum of the response tokens' log-probabilities and
//! `h = [logp_pi(y_w) - logp_ref(y_w)] - [logp_pi(y_l) - logp_ref(y_l)]`. The sigmoid loss is
//! `-log sigmoid(beta * h)` (default `beta = 0.1`); the IPO loss (Azar et al. 2023, "A General
//! Theoretical Paradigm to Understand Learning from Human Preferences") is
//! `(h - 1 / (2 * beta))^2`, which regresses the margin to a fixed target instead of pushing it
//! without bound. The implicit rewards are `beta * (logp_pi - logp_ref)`; logged per step and per
//! validation: `rewards/chosen`, `rewards/rejected`, `rewards/margins` (their difference),
//! `rewards/accuracies` (the fraction of pairs whose chosen reward is strictly higher) and the
//! policy's `logps/chosen`, `logps/rejected` (means over pairs; validation keys get `val_`).
//!
//! The reference log-probabilities are computed once, before training, with the reference
//! model that is then dropped (commands/dpo.rs), so only the policy lives in memory while
//! training; they are stored in the run directory (`ref_logps.bin`, docs/FORMATS.md) and reused
//! on `--resume`. The pass covers only the pairs this rank's stream takes in the run
//! ([`Dpo::rank_pairs`]: with `W` ranks each computes about `1/W` of an epoch's pairs, shard by
//! shard, instead of every pair on every rank), and the val pairs of its validation batches.
//!
//! Data: `topcoat prepare prefs` output (data/prefs.rs, data/pairs.rs). A micro-batch of
//! `batch_size` pairs runs as one model batch of `2 * batch_size` rows, row `2k` the chosen side
//! of pair `k` and row `2k + 1` its rejected side: the rendered conversation then
//! `<|endoftext|>` padding, targets only on the response's assistant tokens. Pairs with a side
//! longer than `T` tokens are skipped (nothing is cut). Pairs are drawn in a seeded per-epoch
//! permutation; the position `(epoch, cursor)` is saved in checkpoints. Validation: the val
//! pairs in file order, at most `val_batches` batches. The gradient reaches the model through
//! per-row coefficients `dL/dlogp` (model/logprobs.rs).
//!
//! Ranks: the micro-batches of pairs form one global stream (data/pairs.rs); rank `r` of `W`
//! takes micro-batches `r, r + W, ...` and validation batches `r, r + W, ...` (returning its
//! summed loss and pair count); the logged extras are this rank's means.
//!
//! Departures: log-probabilities are sequence sums for both losses (the IPO paper's form; some
//! libraries average IPO's per token); no label smoothing (conservative DPO) or reference-free
//! variant; a micro-batch's loss is the mean over its pairs.
//!
//! Command: `topcoat dpo --init runs/sft --data DIR --out runs/dpo [--beta 0.1] [--loss sigmoid|ipo]`.

pub mod loss;
pub mod reference;

pub use loss::{pair_terms, DpoLoss, DpoStats, PairTerms};

use super::PreparedData;
use crate::backend::Backend;
use crate::config::RunConfig;
use crate::data::{fill_pair_batch, DataError, PairLoader, PairPosition, PairSplit, RankSlice};
use crate::model::{forward::Loss, Gpt};
use crate::rng::Rng;
use crate::train::{Extras, Objective, Result, TrainError, ValPartial};
use reference::{PairLogps, RefLogps};
use std::path::PathBuf;

/// DPO over a prepared preference directory, against stored reference log-probabilities.
pub struct Dpo {
    /// The training pairs in their seeded per-epoch order (only those whose sides fit in `T`).
    train: PairLoader,
    val: Option<PairSplit>,
    reference: Option<RefLogps>,
    pub loss: DpoLoss,
    pub beta: f64,
    /// Pairs per micro-batch (the model runs `2 * pairs` rows).
    pairs: usize,
    t: usize,
    pad: u32,
    val_batches: usize,
    /// What the micro-steps since the last [`Dpo::take_train_stats`] saw.
    train_stats: DpoStats,
    /// What the last validation saw.
    val_stats: DpoStats,
    /// The last validation's stats until the loop takes them as metrics.
    val_pending: Option<DpoStats>,
}

impl Dpo {
    /// Opens `dir/prefs_train.{bin,idx}` and, if present, `dir/prefs_val.{bin,idx}`.
    pub fn open(
        data: &PreparedData,
        loss: DpoLoss,
        beta: f64,
    ) -> std::result::Result<Self, DataError> {
        let PreparedData {
            dir,
            batch_size: pairs,
            seq_len: t,
            seed,
            vocab_size,
            pad,
            val_batches,
            ranks,
        } = *data;
        let ranks = RankSlice::new(ranks.rank, ranks.world)?;
        if !(beta > 0.0 && beta.is_finite()) {
            return Err(DataError::InvalidArgument(format!(
                "--beta must be a positive number, got {beta}"
            )));
        }
        if pairs == 0 || t < 2 {
            return Err(DataError::InvalidArgument(format!(
                "DPO needs at least one pair per batch and T >= 2 (got {pairs} pairs, T = {t})"
            )));
        }
        let train = PairSplit::open(dir, "prefs_train", vocab_size)?;
        let train = PairLoader::new(train, pairs, t, pad, seed)
            .map_err(|e| {
                DataError::InvalidArgument(format!("{}: prefs_train: {e}", dir.display()))
            })?
            .with_ranks(ranks);
        let val = if dir.join("prefs_val.bin").exists() {
            Some(PairSplit::open(dir, "prefs_val", vocab_size)?)
        } else {
            None
        };
        Ok(Self {
            train,
            val,
            reference: None,
            loss,
            beta,
            pairs,
            t,
            pad,
            val_batches,
            train_stats: DpoStats::default(),
            val_stats: DpoStats::default(),
            val_pending: None,
        })
    }

    /// Training pairs that are drawn (both sides fit in `T` tokens).
    pub fn num_pairs(&self) -> usize {
        self.train.num_pairs()
    }

    /// Training pairs skipped because a side is longer than `T` tokens.
    pub fn too_long(&self) -> usize {
        self.train.too_long
    }

    pub fn num_val_pairs(&self) -> usize {
        self.val.as_ref().map_or(0, PairSplit::len)
    }

    /// The fingerprint stored reference log-probabilities must carry to serve this data.
    pub fn fingerprint(&self) -> u64 {
        reference::fingerprint(self.t, &[Some(self.train.split()), self.val.as_ref()])
    }

    /// The pairs this rank needs reference values for, in file order: the train pairs its
    /// stream takes in its first `micro_batches` micro-batches (a resumed run, at any world
    /// size, takes a subset of these), and the val pairs of its validation batches.
    pub fn rank_pairs(&self, micro_batches: u64) -> (Vec<usize>, Vec<usize>) {
        let train = self
            .train
            .rank_pairs(PairPosition::default(), micro_batches);
        let ranks = self.train.ranks();
        let val = self
            .val_chunks()
            .into_iter()
            .enumerate()
            .filter(|&(i, _)| ranks.takes(i as u64))
            .flat_map(|(_, c)| c)
            .collect::<Vec<_>>();
        (train, val)
    }

    /// The validation batches, every rank's: the val pairs that fit, in file order, at most
    /// `val_batches` batches of `P`.
    fn val_chunks(&self) -> Vec<Vec<usize>> {
        let Some(val) = self.val.as_ref() else {
            return Vec::new();
        };
        let fitting: Vec<usize> = (0..val.len()).filter(|&i| val.fits(i, self.t)).collect();
        let n = fitting.len().min(self.val_batches.max(1) * self.pairs);
        fitting[..n]
            .chunks(self.pairs)
            .map(<[usize]>::to_vec)
            .collect()
    }

    /// A table for this data with no value computed yet (every entry NaN).
    pub fn empty_reference(&self) -> RefLogps {
        RefLogps {
            t: self.t,
            fingerprint: self.fingerprint(),
            train: vec![[f64::NAN; 2]; self.train.split().len()],
            val: vec![[f64::NAN; 2]; self.num_val_pairs()],
        }
    }

    /// Of `(train, val)` pairs, those `table` holds no value for.
    pub fn missing(
        table: &RefLogps,
        (train, val): &(Vec<usize>, Vec<usize>),
    ) -> (Vec<usize>, Vec<usize>) {
        let gaps = |have: &PairLogps, want: &[usize]| -> Vec<usize> {
            want.iter()
                .copied()
                .filter(|&p| have[p][0].is_nan())
                .collect()
        };
        (gaps(&table.train, train), gaps(&table.val, val))
    }

    /// Computes the reference values of `(train, val)` pairs (each fitting in `T`) with
    /// `reference` into `table`, in this run's batch shape, in the order given.
    pub fn fill_reference<B: Backend>(
        &self,
        be: &B,
        reference: &mut Gpt<B>,
        table: &mut RefLogps,
        (train, val): &(Vec<usize>, Vec<usize>),
    ) -> Result<()> {
        let (p, t, pad) = (self.pairs, self.t, self.pad);
        let split = self.train.split();
        reference::pairs_logps(be, reference, split, train, p, t, pad, &mut table.train)?;
        if let Some(v) = &self.val {
            reference::pairs_logps(be, reference, v, val, p, t, pad, &mut table.val)?;
        }
        Ok(())
    }

    /// Computes the reference log-probabilities of every train and val pair with `reference`
    /// (the model the policy starts from), in this run's batch shape.
    pub fn reference_pass<B: Backend>(&self, be: &B, reference: &mut Gpt<B>) -> Result<RefLogps> {
        let (p, t, pad) = (self.pairs, self.t, self.pad);
        let train = reference::split_logps(be, reference, self.train.split(), p, t, pad)?;
        let val = match &self.val {
            Some(v) => reference::split_logps(be, reference, v, p, t, pad)?,
            None => Vec::new(),
        };
        Ok(RefLogps {
            t,
            fingerprint: self.fingerprint(),
            train,
            val,
        })
    }

    /// Installs reference log-probabilities, refusing ones computed for other data.
    pub fn set_reference(&mut self, r: RefLogps) -> Result<()> {
        let n_val = self.num_val_pairs();
        if let Some(why) = r.mismatch(self.t, self.fingerprint(), self.train.split().len(), n_val) {
            return Err(TrainError::Checkpoint {
                path: PathBuf::from(reference::REF_FILE),
                msg: format!("reference log-probabilities do not match the data: {why}"),
            });
        }
        self.reference = Some(r);
        Ok(())
    }

    /// Means of what the micro-steps since the last call saw (`rewards/...`, `logps/...`),
    /// and resets them.
    pub fn take_train_stats(&mut self) -> DpoStats {
        std::mem::take(&mut self.train_stats)
    }

    /// What the last validation saw.
    pub fn val_stats(&self) -> DpoStats {
        self.val_stats
    }

    /// Refuses a micro-batch with a pair the reference pass did not compute (a run longer
    /// than the one the pass was sized for), naming the pair and the rank.
    fn check_reference(&self, picked: &[usize]) -> Result<()> {
        let table = &self.reference()?.train;
        match picked.iter().find(|&&p| table[p][0].is_nan()) {
            None => Ok(()),
            Some(p) => Err(TrainError::Checkpoint {
                path: PathBuf::from(reference::REF_FILE),
                msg: format!(
                    "rank {} of {}: no reference log-probability for train pair {p}: the                      reference pass covered fewer micro-batches than this run draws; delete                      {} from the run directory to recompute it",
                    self.train.ranks().rank,
                    self.train.ranks().world,
                    reference::REF_FILE
                ),
            }),
        }
    }

    fn reference(&self) -> Result<&RefLogps> {
        self.reference
            .as_ref()
            .ok_or_else(|| TrainError::Checkpoint {
                path: PathBuf::from(reference::REF_FILE),
                msg: "DPO needs the reference log-probabilities before training (reference_pass)"
                    .into(),
            })
    }
}

/// The terms of every pair of a batch (rows `2k` chosen, `2k + 1` rejected) against the
/// reference values of pairs `picked`, added to `stats`; returns the per-row coefficients
/// `scale * dL/dlogp`.
#[allow(clippy::too_many_arguments)]
fn batch_terms(
    loss: DpoLoss,
    beta: f64,
    logps: &[f64],
    picked: &[usize],
    reference: &PairLogps,
    rows: usize,
    scale: f64,
    stats: &mut DpoStats,
) -> Vec<f32> {
    let mut coef = vec![0.0f32; rows];
    for (k, &p) in picked.iter().enumerate() {
        let (pc, pr) = (logps[2 * k], logps[2 * k + 1]);
        let [rc, rr] = reference[p];
        let terms = pair_terms(loss, beta, pc, pr, rc, rr);
        stats.add(&terms, pc, pr);
        coef[2 * k] = (scale * terms.d_chosen) as f32;
        coef[2 * k + 1] = (scale * terms.d_rejected) as f32;
    }
    coef
}

impl<B: Backend> Objective<B> for Dpo {
    fn name(&self) -> &str {
        "dpo"
    }

    fn micro_step(
        &mut self,
        be: &B,
        model: &mut Gpt<B>,
        _rng: &mut Rng,
        loss_scale: f32,
    ) -> Result<Loss> {
        let picked = self.train.next_pairs();
        self.check_reference(&picked)?;
        let (p, t) = (self.pairs, self.t);
        let batch = fill_pair_batch(self.train.split(), &picked, p, t, self.pad);
        let reference = &self.reference()?.train;
        let (loss, beta) = (self.loss, self.beta);
        let scale = loss_scale as f64 / p as f64;
        let mut stats = DpoStats::default();
        model.sequence_logps_step(be, &batch.inputs, &batch.targets, 2 * p, t, |logps| {
            batch_terms(
                loss,
                beta,
                logps,
                &picked,
                reference,
                2 * p,
                scale,
                &mut stats,
            )
        })?;
        self.train_stats.merge(&stats);
        Ok(Loss {
            mean: stats.mean_loss() as f32,
            sum: stats.loss,
            tokens: batch.targets.iter().filter(|&&x| x >= 0).count(),
        })
    }

    fn validate(&mut self, be: &B, model: &mut Gpt<B>) -> Result<Option<ValPartial>> {
        let Some(val) = self.val.as_ref() else {
            return Ok(None);
        };
        let (p, t) = (self.pairs, self.t);
        let reference = &self.reference()?.val;
        let ranks = self.train.ranks();
        let mut stats = DpoStats::default();
        let chunks = self.val_chunks();
        for (_, chunk) in chunks
            .iter()
            .enumerate()
            .filter(|&(i, _)| ranks.takes(i as u64))
        {
            let batch = fill_pair_batch(val, chunk, p, t, self.pad);
            let logps = model.sequence_logps(be, &batch.inputs, &batch.targets, 2 * p, t)?;
            batch_terms(
                self.loss,
                self.beta,
                &logps,
                chunk,
                reference,
                2 * p,
                0.0,
                &mut stats,
            );
        }
        self.val_stats = stats;
        self.val_pending = Some(stats);
        Ok(Some(ValPartial {
            sum: stats.loss,
            count: stats.pairs as f64,
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
            .map_err(|e| bad(format!("bad DPO data position: {e}")))?;
        self.train
            .set_position(pos)
            .map_err(|e| bad(format!("DPO data: {e}")))
    }

    /// After a step: the means over its micro-batches; after a validation: over the val pairs
    /// (the loop adds the `val_` prefix).
    fn take_metrics(&mut self) -> Extras {
        let stats = match self.val_pending.take() {
            Some(val) => val,
            None => self.take_train_stats(),
        };
        let mut extras = Extras::default();
        for (name, value) in stats.metrics("") {
            extras.push(name, value as f32);
        }
        extras
    }
}

/// The micro-batches one rank draws in a run of `run.max_steps` steps: the global micro-batches
/// per step (`total_batch_tokens / (batch_size * seq_len)`, or one per rank when 0) shared out
/// over the ranks, rounded up. What the reference pass is sized for.
pub fn rank_micro_batches(run: &RunConfig) -> u64 {
    let world = run.world_size.max(1);
    let micro = (run.batch_size * run.seq_len).max(1);
    let global = if run.total_batch_tokens == 0 {
        world
    } else {
        run.total_batch_tokens.div_ceil(micro)
    };
    run.max_steps as u64 * global.div_ceil(world) as u64
}
