//! Which share of a stage's global stream of micro-batches a data-parallel rank takes.
//!
//! Every stage draws one global stream of micro-batches, the same at every world size; rank `r`
//! of `W` takes micro-batches `r, r + W, r + 2W, ...`. At one micro-batch per rank per step, step
//! `s` uses global micro-batches `s*W .. s*W + W - 1` in rank order: what one process with `W`
//! accumulation steps uses. Validation sets are split the same way (batch `i` of the set to rank
//! `i mod W`), so the ranks' partial sums cover exactly the set one process validates on.

use super::error::{DataError, Result};

/// Rank `rank` of `world`: takes global micro-batches `rank, rank + world, ...`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RankSlice {
    pub rank: usize,
    pub world: usize,
}

impl Default for RankSlice {
    fn default() -> Self {
        Self::SOLO
    }
}

impl RankSlice {
    /// One process: takes every micro-batch.
    pub const SOLO: Self = Self { rank: 0, world: 1 };

    /// Refuses a rank outside `0..world` (or a world of 0), naming both.
    pub fn new(rank: usize, world: usize) -> Result<Self> {
        if world == 0 || rank >= world {
            return Err(DataError::InvalidArgument(format!(
                "data-parallel rank {rank} is not in 0..world_size = {world}: the launcher's \
                 RANK and WORLD_SIZE disagree"
            )));
        }
        Ok(Self { rank, world })
    }

    /// Whether this rank takes global micro-batch `g`.
    pub fn takes(&self, g: u64) -> bool {
        g % self.world as u64 == self.rank as u64
    }

    /// How many of the global micro-batches `0..n` this rank takes.
    pub fn share(&self, n: u64) -> u64 {
        let (r, w) = (self.rank as u64, self.world as u64);
        if n > r {
            (n - r).div_ceil(w)
        } else {
            0
        }
    }

    /// Global micro-batches of the other ranks drawn (and dropped) before this rank's in each
    /// group of `world`.
    pub fn before(&self) -> usize {
        self.rank
    }

    /// Global micro-batches of the other ranks after this rank's in each group of `world`.
    pub fn after(&self) -> usize {
        self.world - 1 - self.rank
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_every_batch_once() {
        for world in 1..=4 {
            for n in 0..11u64 {
                let mut seen = vec![0; n as usize];
                let mut total = 0;
                for rank in 0..world {
                    let s = RankSlice::new(rank, world).unwrap();
                    let mine: Vec<u64> = (0..n).filter(|&g| s.takes(g)).collect();
                    assert_eq!(
                        mine.len() as u64,
                        s.share(n),
                        "rank {rank} of {world}, n {n}"
                    );
                    assert_eq!(s.before() + 1 + s.after(), world);
                    mine.iter().for_each(|&g| seen[g as usize] += 1);
                    total += s.share(n);
                }
                assert_eq!(total, n);
                assert!(seen.iter().all(|&c| c == 1));
            }
        }
    }

    #[test]
    fn a_rank_outside_the_world_is_named() {
        let e = RankSlice::new(3, 3).unwrap_err().to_string();
        assert!(e.contains("rank 3 is not in 0..world_size = 3"), "{e}");
        assert!(RankSlice::new(0, 0).is_err());
    }
}
