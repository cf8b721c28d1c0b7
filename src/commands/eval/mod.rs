//! `topcoat eval` as library calls: [`eval_loss`] (mean token loss over a prepared shard split),
//! [`eval_pairs`] (reward-model accuracy, or DPO implicit-reward accuracy against a reference,
//! on a `prepare prefs` split) and [`eval_generate`] (replies to a prompts file scored by exact
//! and normalised match, `scoring.rs`), one file each. Each returns a report whose `table()` the binary prints.
//!
//! Loss: the split's windows in file order through the sequential loader, `B` rows of `T + 1`
//! tokens per batch, every full batch (or the first `max_batches`); the mean is
//! `sum of token losses / tokens`, the same sum the trainer's validation takes, so with the
//! same `B`, `T` and enough `val_batches` the two agree.
//!
//! Pairs: pairs whose sides both fit in `T` tokens, in file order, `P` per batch (`2P` rows);
//! the others are skipped and counted. Reward model (the checkpoint has a reward head and no
//! reference is given): `r` read at each side's last token. DPO: `r = beta * (logp_policy -
//! logp_reference)` over the response tokens. A pair is correct when `r_chosen > r_rejected`
//! strictly (a tie is wrong), so a policy equal to its reference scores margin 0, accuracy 0.
//!
//! Generate: each prompt is rendered with the chat template then `<|assistant|>`, the reply is
//! sampled with a KV cache (greedy by default) until `<|end|>` or end-of-text (not part of the
//! reply) or `max_new_tokens`.
//!
//! Across data-parallel ranks (`topcoat launch -- eval ...`) rank `r` of `W` takes batches
//! (loss, pairs) or prompts (generate) `r, r + W, ...`; the per-batch sums, per-pair rewards or
//! per-prompt results come back to every rank in item order ([`gather_items`]), and the totals
//! are added in that order, so rank 0 reports what one process reports, bit for bit. Only
//! rank 0 prints and writes. Sampled generation (temperature > 0) draws every reply from one
//! random stream, which cannot be split: rank 0 generates every prompt then.

mod generate;
mod loss;
mod pairs;

pub use generate::{eval_generate, EvalGenerateJob, GenExample, GenReport};
pub use loss::{eval_loss, EvalLossJob, LossReport};
pub use pairs::{eval_pairs, EvalPairsJob, PairReport};

use super::CommandError;
use crate::backend::Backend;
use crate::dist::Collective;

type Result<T> = std::result::Result<T, CommandError>;

/// `T` for a run: the flag, else the model's context; refuses one past the context.
fn seq_len(flag: Option<usize>, cfg_max: usize) -> Result<usize> {
    let t = flag.unwrap_or(cfg_max);
    if t == 0 || t > cfg_max {
        return Err(CommandError::arg(
            "--seq-len",
            format!("{t}: must be in 1..={cfg_max} (the checkpoint's max_seq_len)"),
        ));
    }
    Ok(t)
}

/// The note's tail on how the work is shared: nothing on one process.
fn across(world: usize) -> String {
    if world > 1 {
        format!(", split across {world} ranks")
    } else {
        String::new()
    }
}

/// Every rank's `width` values per item it took (item `i` by rank `i mod W`, `mine` in its own
/// item order), back in item order `0..n` at every rank. One host all-reduce of a vector zero
/// except at each rank's own items: adding zeros is exact, so the values are the ranks' bits.
fn gather_items<B: Backend>(
    comm: &dyn Collective<B>,
    n: usize,
    width: usize,
    mine: &[f64],
) -> Result<Vec<f64>> {
    let (rank, world) = (comm.rank(), comm.world_size());
    if world == 1 {
        return Ok(mine.to_vec());
    }
    let mut all = vec![0.0f64; n * width];
    for (k, v) in mine.chunks(width).enumerate() {
        let i = rank + k * world;
        all[i * width..(i + 1) * width].copy_from_slice(v);
    }
    comm.all_reduce_host(&mut all)?;
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::dist::{DistError, RankInfo};
    use std::cell::RefCell;

    /// Rank `info.rank`'s side of a host all-reduce: keeps the vector it was given, so the
    /// test adds the ranks' vectors in rank order as the host collective does.
    struct Capture {
        info: RankInfo,
        sent: RefCell<Vec<f64>>,
    }

    impl Collective<CpuBackend> for Capture {
        fn info(&self) -> &RankInfo {
            &self.info
        }
        fn engine(&self) -> String {
            "capture".into()
        }
        fn all_reduce_sum(&self, _: &CpuBackend, _: &mut [&mut Vec<f32>]) -> DistResult {
            unreachable!()
        }
        fn reduce_sum(&self, _: &CpuBackend, _: &mut [&mut Vec<f32>], _: usize) -> DistResult {
            unreachable!()
        }
        fn broadcast(&self, _: &CpuBackend, _: &mut [&mut Vec<f32>], _: usize) -> DistResult {
            unreachable!()
        }
        fn wait(&self, _: &CpuBackend) -> DistResult {
            Ok(())
        }
        fn all_reduce_host(&self, values: &mut [f64]) -> DistResult {
            *self.sent.borrow_mut() = values.to_vec();
            Ok(())
        }
        fn broadcast_bytes(&self, _: Vec<u8>, _: usize) -> std::result::Result<Vec<u8>, DistError> {
            unreachable!()
        }
    }

    type DistResult = std::result::Result<(), DistError>;

    #[test]
    fn ranks_values_come_back_in_item_order_with_their_bits() {
        let mut rng = crate::rng::Rng::new(7);
        let (n, width) = (7, 2);
        // Magnitudes far apart, so that a sum in another order would round differently.
        let items: Vec<f64> = (0..n * width)
            .map(|i| (rng.next_f64() - 0.5) * 10f64.powi(i as i32 % 9 - 4))
            .collect();
        for world in [1, 2, 3] {
            let mut total = vec![0.0f64; n * width];
            for rank in 0..world {
                let mine: Vec<f64> = (rank..n)
                    .step_by(world)
                    .flat_map(|i| items[i * width..(i + 1) * width].to_vec())
                    .collect();
                let comm = Capture {
                    info: RankInfo {
                        rank,
                        world_size: world,
                        ..RankInfo::single()
                    },
                    sent: RefCell::new(Vec::new()),
                };
                let got = gather_items(&comm, n, width, &mine).unwrap();
                let sent = if world == 1 { got } else { comm.sent.take() };
                total.iter_mut().zip(&sent).for_each(|(t, v)| *t += v);
            }
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&total), bits(&items), "world {world}");
        }
    }
}
