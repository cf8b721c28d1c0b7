//! Training stages: each holds only its loss and data wiring; the loop lives in `train`.

pub mod dpo;
pub mod pretrain;
pub mod reward;
pub mod rl;
pub mod sft;
