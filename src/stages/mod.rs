//! Training stages: each holds only its loss and data wiring; the loop lives in `train`.

pub mod dpo;
pub mod pretrain;
pub mod reward;
pub mod rl;
pub mod sft;

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
}
