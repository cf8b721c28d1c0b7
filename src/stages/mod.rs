//! Training stages: each holds only its loss and data wiring; the loop lives in `train`.
//!
//! Every stage is data-parallel the same way (data/ranks.rs): one global stream of
//! micro-batches, the same at every world size, rank `r` of `W` taking micro-batches
//! `r, r + W, ...`; the data position a checkpoint holds is the stream's, so a run resumes at
//! another world size; validation returns this rank's partial sum over batches `r, r + W, ...`
//! of the one validation set, which the loop adds up across ranks.

pub mod dpo;
pub mod pretrain;
pub mod reward;
pub mod rl;
pub mod sft;

use crate::data::RankSlice;
use std::path::Path;

/// Where a stage's prepared data is and how it is drawn: what every stage over a `prepare`
/// directory opens with (`Sft`, `Reward`, `Dpo`).
#[derive(Clone, Copy, Debug)]
pub struct PreparedData<'a> {
    pub dir: &'a Path,
    /// Rows per micro-batch (`dpo`: pairs).
    pub batch_size: usize,
    /// Tokens per row (`T`).
    pub seq_len: usize,
    /// The epoch shuffle's seed.
    pub seed: u64,
    /// Ids at or past this are refused.
    pub vocab_size: usize,
    /// The padding id of unused positions.
    pub pad: u32,
    /// Validation batches (0: none).
    pub val_batches: usize,
    /// This process's share of the data: rank `r` of `W` takes micro-batches `r, r + W, ...` of
    /// the global stream and validation batches `r, r + W, ...` (`RankSlice::SOLO`: all).
    pub ranks: RankSlice,
}
