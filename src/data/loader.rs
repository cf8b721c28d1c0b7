//! `Loader`: micro-batches of `B` rows of `T + 1` tokens from the shards of one split, in a
//! per-epoch shuffled (or sequential) order, split across data-parallel ranks, resumable.
//!
//! Windows: each shard is cut into windows of `T + 1` tokens starting at `0, T, 2T, ...` (stride
//! `T`, so consecutive windows share one token: the last target of one is the first input of the
//! next); an incomplete tail is dropped. A shard of `n` tokens has `(n - 1) / T` windows.
//!
//! Order: the windows of all shards form one list of `N` windows. Epoch `e` visits them in a
//! permutation drawn from `(seed, e)` alone (sequential mode: the identity). The permutations of
//! successive epochs are concatenated into one stream of windows; global batch `g` is stream entries
//! `g*B .. g*B + B` (a batch may straddle an epoch boundary).
//!
//! Ranks: rank `r` of `W` takes global batches `r, r + W, r + 2W, ...`, so the ranks together see
//! each batch once and, within an epoch, disjoint windows; the stream itself (the windows and
//! their order) does not depend on `W`, so the `W` batches a step takes at one micro-batch per
//! rank are the ones one process takes with `W` accumulation steps.
//!
//! Resume: [`Loader::position`] is the stream index, as `(epoch, cursor)`, of the first window of
//! the next global batch of the step in progress (rank 0's next batch, whichever rank asks): it
//! does not depend on the rank or the world size. [`Loader::set_position`] on a loader opened with
//! the same shards, `T` and seed, at any rank and world size, continues the same stream: its next
//! batch is the one its rank takes after that position. A single-rank position (the only kind
//! older checkpoints hold) is the same number.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::{DataError, Result};
use super::ranks::RankSlice;
use super::shard::Shard;
use crate::rng::Rng;

/// One micro-batch: `b` rows of `t` inputs and the `t` targets (the inputs shifted by one token),
/// row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub inputs: Vec<i32>,
    pub targets: Vec<i32>,
    pub b: usize,
    pub t: usize,
}

/// Where a loader stands: the epoch and the index, within that epoch's order, of the first window
/// of rank 0's next batch (the same at every rank and world size; see the module header).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderPosition {
    pub epoch: u64,
    pub cursor: u64,
}

#[derive(Debug)]
pub struct Loader {
    shards: Vec<Shard>,
    /// `starts[i]` = index of shard `i`'s first window in the global list; `starts[len]` = N.
    starts: Vec<u64>,
    b: usize,
    t: usize,
    seed: u64,
    rank: usize,
    world: usize,
    shuffle: bool,
    /// Stream index of this rank's next batch.
    next: u64,
    /// The cached permutation and the epoch it belongs to.
    order: Vec<u64>,
    order_epoch: Option<u64>,
    row: Vec<i32>,
}

impl Loader {
    /// A loader that visits the windows in file order, no shuffle (for evaluation; for
    /// training, [`Loader::shuffled`] it): validates every shard against `vocab_size`.
    /// [`Loader::reset`] returns to the start; use [`Loader::batches_per_epoch`] batches for one
    /// pass.
    pub fn sequential(
        paths: &[impl AsRef<Path>],
        b: usize,
        t: usize,
        rank: usize,
        world: usize,
        vocab_size: usize,
    ) -> Result<Self> {
        if b == 0 || t == 0 {
            return Err(DataError::InvalidArgument(format!(
                "loader needs B >= 1 and T >= 1, got B = {b}, T = {t}"
            )));
        }
        if world == 0 || rank >= world {
            return Err(DataError::InvalidArgument(format!(
                "loader rank {rank} is not in 0..world = {world}"
            )));
        }
        if paths.is_empty() {
            return Err(DataError::NoShards {
                what: "the loader needs at least one shard path".into(),
            });
        }
        let paths: Vec<PathBuf> = paths.iter().map(|p| p.as_ref().to_path_buf()).collect();
        let mut shards = Vec::with_capacity(paths.len());
        for p in &paths {
            let s = Shard::open(p)?;
            s.validate_vocab(vocab_size)?;
            shards.push(s);
        }
        let mut starts = Vec::with_capacity(shards.len() + 1);
        let mut n = 0u64;
        for s in &shards {
            starts.push(n);
            n += windows_in(s.len(), t);
        }
        starts.push(n);
        if n == 0 {
            // A few names say enough; thousands would bury the message.
            const SHOWN: usize = 3;
            let mut files = shards
                .iter()
                .take(SHOWN)
                .map(|s| format!("{} ({} tokens)", s.path().display(), s.len()))
                .collect::<Vec<_>>()
                .join(", ");
            if shards.len() > SHOWN {
                files.push_str(&format!(", and {} more", shards.len() - SHOWN));
            }
            return Err(DataError::NoWindow {
                need: t + 1,
                count: shards.len(),
                files,
            });
        }
        Ok(Self {
            shards,
            starts,
            b,
            t,
            seed: 0,
            rank,
            world,
            shuffle: false,
            next: rank as u64 * b as u64,
            order: Vec::new(),
            order_epoch: None,
            row: vec![0; t + 1],
        })
    }

    /// This loader with each epoch's order a permutation drawn from `(seed, epoch)`, for
    /// training.
    pub fn shuffled(mut self, seed: u64) -> Self {
        self.seed = seed;
        self.shuffle = true;
        self
    }

    /// Total windows over all shards (N).
    pub fn num_windows(&self) -> u64 {
        *self.starts.last().unwrap()
    }

    /// Batches this rank draws in one pass over the windows (at least 1).
    pub fn batches_per_epoch(&self) -> u64 {
        (self.num_windows() / (self.b as u64 * self.world as u64)).max(1)
    }

    /// Global batches (all ranks together) in one pass over the windows (at least 1): the same
    /// at every world size.
    pub fn global_batches_per_epoch(&self) -> u64 {
        (self.num_windows() / self.b as u64).max(1)
    }

    /// How many of the global batches `0..n` this rank takes (`r, r + W, ...`).
    pub fn rank_share(&self, n: u64) -> u64 {
        RankSlice {
            rank: self.rank,
            world: self.world,
        }
        .share(n)
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    pub fn b(&self) -> usize {
        self.b
    }

    pub fn t(&self) -> usize {
        self.t
    }

    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    pub fn position(&self) -> LoaderPosition {
        let n = self.num_windows();
        let first = self.next - self.rank as u64 * self.b as u64;
        LoaderPosition {
            epoch: first / n,
            cursor: first % n,
        }
    }

    /// Continues from a saved position (see the module doc for what must match).
    pub fn set_position(&mut self, pos: LoaderPosition) {
        self.next = pos.epoch * self.num_windows() + pos.cursor + self.rank as u64 * self.b as u64;
    }

    /// Back to this rank's first batch of epoch 0.
    pub fn reset(&mut self) {
        self.next = self.rank as u64 * self.b as u64;
    }

    fn ensure_order(&mut self, epoch: u64) {
        if !self.shuffle || self.order_epoch == Some(epoch) {
            return;
        }
        let n = self.num_windows();
        self.order.clear();
        self.order.extend(0..n);
        let mut rng = Rng::new(epoch_seed(self.seed, epoch));
        rng.shuffle(&mut self.order);
        self.order_epoch = Some(epoch);
    }

    /// Global index of the window at stream position `s`.
    fn window_at(&mut self, s: u64) -> u64 {
        let n = self.num_windows();
        let (epoch, i) = (s / n, s % n);
        if !self.shuffle {
            return i;
        }
        self.ensure_order(epoch);
        self.order[i as usize]
    }

    fn read_window(&mut self, w: u64) {
        let si = self.starts.partition_point(|&st| st <= w) - 1;
        let start = (w - self.starts[si]) as usize * self.t;
        self.shards[si].copy_range(start, &mut self.row);
    }

    /// Draws this rank's next batch.
    pub fn next_batch(&mut self) -> Batch {
        let (b, t) = (self.b, self.t);
        let mut inputs = Vec::with_capacity(b * t);
        let mut targets = Vec::with_capacity(b * t);
        for r in 0..b {
            let w = self.window_at(self.next + r as u64);
            self.read_window(w);
            inputs.extend_from_slice(&self.row[..t]);
            targets.extend_from_slice(&self.row[1..]);
        }
        self.next += (self.world * b) as u64;
        Batch {
            inputs,
            targets,
            b,
            t,
        }
    }
}

impl Iterator for Loader {
    type Item = Batch;
    fn next(&mut self) -> Option<Batch> {
        Some(self.next_batch())
    }
}

/// Windows of `t + 1` tokens at stride `t` in `len` tokens.
pub fn windows_in(len: usize, t: usize) -> u64 {
    if len < t + 1 {
        0
    } else {
        ((len - 1) / t) as u64
    }
}

/// Seed of epoch `epoch`'s permutation: both inputs pass through SplitMix64 so neighbouring seeds
/// or epochs give unrelated orders.
fn epoch_seed(seed: u64, epoch: u64) -> u64 {
    let a = Rng::new(seed).next_u64();
    let b = Rng::new(epoch ^ 0x6c6f_6164_6572_2121).next_u64();
    Rng::new(a ^ b.rotate_left(17)).next_u64()
}
