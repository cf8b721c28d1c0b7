//! Preference pairs on disk, read back ([`PairSplit`], the files `prepare prefs` writes, format
//! in docs/FORMATS.md), and batches of pairs for training ([`PairLoader`], [`fill_pair_batch`]).
//!
//! Batch layout: a batch of capacity `P` pairs has `2P` rows of `T` tokens; row `2i` is the
//! chosen side of pair `i`, row `2i + 1` the rejected side. A row holds the sequence's ids then
//! `pad`; its targets are `ids[j + 1]` where the response mask of `j + 1` is set, else -1 (what a
//! log-probability over the response needs). Rows past the batch's real pairs are all padding.
//! Fit rule: a pair is used only when both sequences fit in `T` tokens (the last token, where a
//! reward is read, must be an input); the others are skipped and counted. Training draws pairs in
//! a permutation drawn from `(seed, epoch)` per epoch, `P` at a time: the global stream of
//! micro-batches, the same at every world size. Rank `r` of `W` takes micro-batches
//! `r, r + W, ...` of it (data/ranks.rs), stepping over the other ranks' pairs. The position
//! `(epoch, cursor)` saved in checkpoints is where the next group of `W` micro-batches starts
//! (the next step's first pair at one micro-batch per rank): the same on every rank, and what a
//! single process would save, so a run resumes at another world size (and from checkpoints
//! written before ranks existed).

use std::path::Path;

use super::error::{DataError, Result};
use super::prefs::PAIR_SIDECAR;
use super::prepared::read_sidecar;
use super::ranks::RankSlice;
use crate::rng::Rng;
use serde::{Deserialize, Serialize};

/// One side of a stored pair.
#[derive(Clone, Copy, Debug)]
pub struct SeqRef<'a> {
    pub ids: &'a [u32],
    pub response_start: usize,
    pub mask: &'a [bool],
}

/// The pairs of one prepared split, in memory.
#[derive(Clone, Debug)]
pub struct PairSplit {
    tokens: Vec<u32>,
    mask: Vec<bool>,
    /// Sequence `s` is `tokens[offsets[s]..offsets[s + 1]]`; pair `i` is sequences `2i`, `2i + 1`.
    offsets: Vec<usize>,
    starts: Vec<usize>,
}

impl PairSplit {
    /// Reads `{dir}/{name}.bin` and `{dir}/{name}.idx` (name: `prefs_train` or `prefs_val`),
    /// checking that they agree and that every id is below `vocab_size`.
    pub fn open(dir: &Path, name: &str, vocab_size: usize) -> Result<Self> {
        super::dataset::expect_kind(dir, super::dataset::DatasetKind::Prefs)?;
        let sidecar = read_sidecar(dir, name, vocab_size, &PAIR_SIDECAR)?;
        let starts = sidecar.fields;
        if let Some(s) =
            (0..starts.len()).find(|&s| starts[s] >= sidecar.offsets[s + 1] - sidecar.offsets[s])
        {
            return Err(DataError::InvalidArgument(format!(
                "{}: sequence {s}: response start {} is not inside its {} tokens",
                dir.join(format!("{name}.idx")).display(),
                starts[s],
                sidecar.offsets[s + 1] - sidecar.offsets[s]
            )));
        }
        Ok(Self {
            tokens: sidecar.tokens,
            mask: sidecar.mask,
            offsets: sidecar.offsets,
            starts,
        })
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.starts.len() / 2
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn seq(&self, s: usize) -> SeqRef<'_> {
        let (a, b) = (self.offsets[s], self.offsets[s + 1]);
        SeqRef {
            ids: &self.tokens[a..b],
            response_start: self.starts[s],
            mask: &self.mask[a..b],
        }
    }

    pub fn chosen(&self, i: usize) -> SeqRef<'_> {
        self.seq(2 * i)
    }

    pub fn rejected(&self, i: usize) -> SeqRef<'_> {
        self.seq(2 * i + 1)
    }

    /// Whether both sides of pair `i` fit in `t` tokens.
    pub fn fits(&self, i: usize, t: usize) -> bool {
        self.chosen(i).ids.len() <= t && self.rejected(i).ids.len() <= t
    }
}

/// A batch of pairs (layout in the module header).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairBatch {
    /// Capacity in pairs: the batch has `2 * capacity` rows.
    pub capacity: usize,
    /// Real pairs (`<= capacity`); the rows of the others are padding.
    pub pairs: usize,
    pub t: usize,
    /// `[2 * capacity * t]` input ids.
    pub inputs: Vec<i32>,
    /// `[2 * capacity * t]` targets: the next id over the response's assistant tokens, else -1.
    pub targets: Vec<i32>,
    /// Per row: the position of its last token (0 for a padding row).
    pub last: Vec<usize>,
    /// Per row: where its response starts (0 for a padding row).
    pub response_start: Vec<usize>,
    /// Per row: real (non-padding) tokens.
    pub lens: Vec<usize>,
}

impl PairBatch {
    pub fn rows(&self) -> usize {
        2 * self.capacity
    }

    /// Real tokens in the batch.
    pub fn tokens(&self) -> usize {
        self.lens.iter().sum()
    }
}

/// Builds a batch of capacity `capacity` from `pairs` (indices into `split`, at most
/// `capacity`, each fitting in `t` tokens).
pub fn fill_pair_batch(
    split: &PairSplit,
    pairs: &[usize],
    capacity: usize,
    t: usize,
    pad: u32,
) -> PairBatch {
    assert!(pairs.len() <= capacity, "more pairs than the batch holds");
    let rows = 2 * capacity;
    let mut b = PairBatch {
        capacity,
        pairs: pairs.len(),
        t,
        inputs: vec![pad as i32; rows * t],
        targets: vec![-1; rows * t],
        last: vec![0; rows],
        response_start: vec![0; rows],
        lens: vec![0; rows],
    };
    for (i, &p) in pairs.iter().enumerate() {
        for (r, s) in [(2 * i, split.chosen(p)), (2 * i + 1, split.rejected(p))] {
            let n = s.ids.len();
            assert!(n <= t, "pair {p}: {n} tokens do not fit in T = {t}");
            let (inp, tgt) = (
                &mut b.inputs[r * t..(r + 1) * t],
                &mut b.targets[r * t..(r + 1) * t],
            );
            for j in 0..n {
                inp[j] = s.ids[j] as i32;
                if j + 1 < n && s.mask[j + 1] {
                    tgt[j] = s.ids[j + 1] as i32;
                }
            }
            b.last[r] = n - 1;
            b.response_start[r] = s.response_start;
            b.lens[r] = n;
        }
    }
    b
}

/// Where the pair stream stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairPosition {
    pub epoch: u64,
    /// Index into the epoch's permutation of the next pair.
    pub cursor: usize,
}

/// A walk along the pair stream: the position and the permutation of its epoch.
#[derive(Clone, Debug, Default)]
struct Walk {
    pos: PairPosition,
    order: Vec<usize>,
    order_epoch: Option<u64>,
}

impl Walk {
    fn at(pos: PairPosition) -> Self {
        Self {
            pos,
            ..Self::default()
        }
    }

    /// Moves past one pair of the stream (the epoch rolls over after `n` pairs).
    fn advance(&mut self, n: usize) {
        self.pos.cursor += 1;
        if self.pos.cursor == n {
            self.pos = PairPosition {
                epoch: self.pos.epoch + 1,
                cursor: 0,
            };
        }
    }

    /// The pair at the position (drawing the epoch's permutation of `usable` when it changes),
    /// then moves past it.
    fn take(&mut self, usable: &[usize], seed: u64) -> usize {
        if self.order_epoch != Some(self.pos.epoch) {
            self.order = usable.to_vec();
            Rng::new(seed ^ self.pos.epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15))
                .shuffle(&mut self.order);
            self.order_epoch = Some(self.pos.epoch);
        }
        let p = self.order[self.pos.cursor];
        self.advance(usable.len());
        p
    }

    /// This rank's next micro-batch of `capacity` pairs, stepping over the other ranks' ones
    /// so the walk ends where the next group of `world` micro-batches starts.
    fn rank_batch(
        &mut self,
        usable: &[usize],
        seed: u64,
        capacity: usize,
        ranks: RankSlice,
    ) -> Vec<usize> {
        for _ in 0..ranks.before() * capacity {
            self.advance(usable.len());
        }
        let picked = (0..capacity).map(|_| self.take(usable, seed)).collect();
        for _ in 0..ranks.after() * capacity {
            self.advance(usable.len());
        }
        picked
    }
}

/// Draws training batches of pairs in a seeded per-epoch order, this rank's share, resumably.
pub struct PairLoader {
    split: PairSplit,
    /// Pairs whose sides both fit in `t` tokens.
    usable: Vec<usize>,
    capacity: usize,
    t: usize,
    pad: u32,
    seed: u64,
    ranks: RankSlice,
    walk: Walk,
    /// Pairs skipped because a side is longer than `t` tokens.
    pub too_long: usize,
}

impl PairLoader {
    /// A loader over `split` yielding batches of `capacity` pairs of `t`-token rows.
    pub fn new(split: PairSplit, capacity: usize, t: usize, pad: u32, seed: u64) -> Result<Self> {
        if capacity == 0 || t < 2 {
            return Err(DataError::InvalidArgument(format!(
                "a pair batch needs at least one pair and T >= 2 (got {capacity} pairs, T = {t})"
            )));
        }
        let usable: Vec<usize> = (0..split.len()).filter(|&i| split.fits(i, t)).collect();
        if usable.is_empty() {
            return Err(DataError::InvalidArgument(format!(
                "none of the {} pairs fits in T = {t} tokens per side",
                split.len()
            )));
        }
        Ok(Self {
            too_long: split.len() - usable.len(),
            split,
            usable,
            capacity,
            t,
            pad,
            seed,
            ranks: RankSlice::SOLO,
            walk: Walk::default(),
        })
    }

    /// This loader drawing rank `ranks.rank`'s share of the stream (see the module header).
    pub fn with_ranks(mut self, ranks: RankSlice) -> Self {
        self.ranks = ranks;
        self
    }

    pub fn ranks(&self) -> RankSlice {
        self.ranks
    }

    /// Pairs per micro-batch.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The pairs (sorted, each once) of this rank's next `micro_batches` micro-batches from
    /// `from`: what it will train on, so what it needs reference values for.
    pub fn rank_pairs(&self, from: PairPosition, micro_batches: u64) -> Vec<usize> {
        let mut walk = Walk::at(from);
        let mut seen = vec![false; self.split.len()];
        let mut count = 0;
        for _ in 0..micro_batches {
            for p in walk.rank_batch(&self.usable, self.seed, self.capacity, self.ranks) {
                count += usize::from(!seen[p]);
                seen[p] = true;
            }
            if count == self.usable.len() {
                break; // every pair is in: the rest of the walk adds nothing
            }
        }
        (0..seen.len()).filter(|&i| seen[i]).collect()
    }

    /// Pairs that are drawn (both sides fit in `T` tokens).
    pub fn num_pairs(&self) -> usize {
        self.usable.len()
    }

    /// Where the next group of `world` micro-batches starts: world-size-free.
    pub fn position(&self) -> PairPosition {
        self.walk.pos
    }

    /// Restores a position; refuses one past the usable pairs (the data changed).
    pub fn set_position(&mut self, pos: PairPosition) -> Result<()> {
        if pos.cursor >= self.usable.len() {
            return Err(DataError::InvalidArgument(format!(
                "pair position {} is past the {} usable pairs: was the data re-prepared?",
                pos.cursor,
                self.usable.len()
            )));
        }
        self.walk = Walk::at(pos);
        Ok(())
    }

    /// The split the pairs are drawn from.
    pub fn split(&self) -> &PairSplit {
        &self.split
    }

    /// This rank's next full batch's pair indices, advancing the position past the group of
    /// `world` micro-batches it belongs to (an epoch boundary may fall inside it); each epoch's
    /// order is a permutation drawn from `(seed, epoch)`.
    pub fn next_pairs(&mut self) -> Vec<usize> {
        self.walk
            .rank_batch(&self.usable, self.seed, self.capacity, self.ranks)
    }

    /// The next full batch, advancing the position (see [`PairLoader::next_pairs`]).
    pub fn next_batch(&mut self) -> PairBatch {
        let picked = self.next_pairs();
        fill_pair_batch(&self.split, &picked, self.capacity, self.t, self.pad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` pairs of 3-token sides (all fit in `T = 4`).
    fn split(n: usize) -> PairSplit {
        PairSplit {
            tokens: (0..6 * n as u32).collect(),
            mask: vec![true; 6 * n],
            offsets: (0..=2 * n).map(|s| 3 * s).collect(),
            starts: vec![1; 2 * n],
        }
    }

    #[test]
    fn rank_pairs_are_the_pairs_the_rank_draws() {
        for (world, batches) in [(1, 3), (2, 2), (3, 5), (2, 40)] {
            for rank in 0..world {
                let ranks = RankSlice::new(rank, world).unwrap();
                let mut l = PairLoader::new(split(7), 2, 4, 0, 3)
                    .unwrap()
                    .with_ranks(ranks);
                let from = PairPosition {
                    epoch: 1,
                    cursor: 5,
                };
                l.set_position(from).unwrap();
                let want = l.rank_pairs(from, batches);
                let mut drawn: Vec<usize> = (0..batches).flat_map(|_| l.next_pairs()).collect();
                drawn.sort();
                drawn.dedup();
                assert_eq!(want, drawn, "rank {rank} of {world}, {batches} batches");
            }
        }
        // Forty micro-batches of two pairs at W = 2 cover every one of the 7 pairs.
        let l = PairLoader::new(split(7), 2, 4, 0, 3)
            .unwrap()
            .with_ranks(RankSlice::new(1, 2).unwrap());
        assert_eq!(
            l.rank_pairs(PairPosition::default(), 40),
            (0..7).collect::<Vec<_>>()
        );
    }
}
