//! AdamW over a model's parameters (decay on matrices only), its ZeRO-1 sharding across
//! data-parallel ranks, and the learning-rate schedule.
//!
//! ZeRO-1 (`zero = 1`): every parameter tensor has one owner rank ([`shard_owners`]: largest
//! tensors first, each to the least-loaded rank, so the split is balanced and the same on every
//! rank). A rank keeps the moments (and, where the backend has one, the fp32 master copy) of
//! the tensors it owns only; after its update each owner broadcasts its tensors to the others.
//! The gradients are summed on every rank beforehand, so the update of a tensor is the one
//! zero 0 computes, and the weights are bit-identical to zero 0 on every rank.
//!
//! Frozen tensors (a LoRA model's base, `ParamSpec::trainable` false) take no part: no
//! moments, no owner, no update, no broadcast; ZeRO-1 shares out the trained tensors only.

use crate::backend::{AdamWStep, Backend, Role};
use crate::config::RunConfig;
use crate::dist::{Collective, Result};
use crate::model::Gpt;

/// Linear warmup from `lr/warmup` to `lr` over `warmup` steps, then cosine decay to
/// `lr * min_ratio` at `max_steps` (constant after). `step` is 0-based.
pub fn lr_at(step: usize, lr: f32, warmup: usize, max_steps: usize, min_ratio: f32) -> f32 {
    if step < warmup {
        return lr * (step + 1) as f32 / warmup as f32;
    }
    if step >= max_steps || max_steps <= warmup {
        return lr * min_ratio;
    }
    let progress = (step - warmup) as f32 / (max_steps - warmup) as f32;
    let cosine = 0.5 * (1.0 + (std::f32::consts::PI * progress).cos());
    lr * (min_ratio + (1.0 - min_ratio) * cosine)
}

/// The owner rank of each tensor of sizes `numels` among `world` ranks: the largest tensors
/// first (ties by index), each to the rank holding the fewest elements so far (ties: the lowest
/// rank). Deterministic, so every rank computes the same assignment.
pub fn shard_owners(numels: &[usize], world: usize) -> Vec<usize> {
    let world = world.max(1);
    let mut order: Vec<usize> = (0..numels.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(numels[i]), i));
    let mut load = vec![0usize; world];
    let mut owner = vec![0; numels.len()];
    for i in order {
        let r = (0..world).min_by_key(|&r| (load[r], r)).unwrap_or(0);
        owner[i] = r;
        load[r] += numels[i];
    }
    owner
}

/// Bytes of optimizer state one tensor of `numel` elements costs: two fp32 moments, plus an
/// fp32 master copy where the backend's parameters are narrower than fp32 (CUDA's bf16).
pub fn state_bytes_per_tensor<B: Backend>(be: &B, numel: usize) -> u64 {
    let moments = 2 * be.element_bytes(Role::State);
    let master = if be.element_bytes(Role::Param) < 4 {
        4
    } else {
        0
    };
    (numel * (moments + master)) as u64
}

/// AdamW state: the first and second moments of the tensors this rank updates, and the step
/// count.
pub struct AdamW<B: Backend> {
    /// Per tensor, in layout order: its moments where this rank owns it, `None` elsewhere
    /// (zero 1 only; zero 0 owns every trained tensor) and for frozen tensors.
    pub m: Vec<Option<B::Buf>>,
    pub v: Vec<Option<B::Buf>>,
    /// Updates applied so far.
    pub step: u64,
    /// The ZeRO stage (0 or 1).
    pub zero: u8,
    /// Owner rank of each tensor (all this rank's under zero 0); [`FROZEN`] for a frozen one.
    pub owner: Vec<usize>,
    /// This rank.
    pub rank: usize,
    /// Elements per tensor, in layout order (0 for a frozen tensor: no state).
    numels: Vec<usize>,
}

/// The owner of a frozen tensor: no rank.
pub const FROZEN: usize = usize::MAX;

impl<B: Backend> AdamW<B> {
    /// Zeroed moments for every tensor (`zero` 0) or for the tensors this rank owns (`zero`
    /// 1, which also releases the fp32 master copies of the others: [`Backend::release_master`]).
    /// Every rank calls it with the same model layout.
    pub fn new(be: &B, comm: &dyn Collective<B>, model: &mut Gpt<B>, zero: u8) -> Result<Self> {
        let specs = &model.layout.specs;
        let numels: Vec<usize> = specs
            .iter()
            .map(|s| if s.trainable { s.numel() } else { 0 })
            .collect();
        let trained: Vec<usize> = (0..specs.len()).filter(|&i| specs[i].trainable).collect();
        let rank = comm.rank();
        let mut owner = vec![FROZEN; numels.len()];
        let shares = if zero >= 1 {
            let sizes: Vec<usize> = trained.iter().map(|&i| numels[i]).collect();
            shard_owners(&sizes, comm.world_size())
        } else {
            vec![rank; trained.len()]
        };
        for (&i, o) in trained.iter().zip(shares) {
            owner[i] = o;
        }
        let (mut m, mut v) = (
            Vec::with_capacity(numels.len()),
            Vec::with_capacity(numels.len()),
        );
        for (i, &n) in numels.iter().enumerate() {
            if owner[i] == FROZEN {
                // Its master copy went at upload (Gpt::from_values).
                m.push(None);
                v.push(None);
            } else if owner[i] == rank {
                m.push(Some(be.zeros(n, Role::State)?));
                v.push(Some(be.zeros(n, Role::State)?));
            } else {
                be.release_master(&mut model.params[i])?;
                m.push(None);
                v.push(None);
            }
        }
        Ok(Self {
            m,
            v,
            step: 0,
            zero,
            owner,
            rank,
            numels,
        })
    }

    /// Whether this rank updates (and keeps the moments of) tensor `i`.
    pub fn owns(&self, i: usize) -> bool {
        self.owner[i] == self.rank
    }

    /// Applies one update. The gradients must already be summed on every rank. Under zero 1
    /// each rank updates the tensors it owns, then every owner broadcasts its tensors (one
    /// group per owner, in rank order) and the call waits for them. Weight decay applies only
    /// to tensors the layout marks for decay (matrices), never to biases and layernorm
    /// parameters.
    pub fn update(
        &mut self,
        be: &B,
        comm: &dyn Collective<B>,
        model: &mut Gpt<B>,
        cfg: &RunConfig,
        lr: f32,
        grad_scale: f32,
    ) -> Result<()> {
        self.step += 1;
        for (i, spec) in model.layout.specs.iter().enumerate() {
            let (Some(m), Some(v)) = (self.m[i].as_mut(), self.v[i].as_mut()) else {
                continue;
            };
            let hp = AdamWStep {
                lr,
                beta1: cfg.beta1,
                beta2: cfg.beta2,
                eps: cfg.eps,
                weight_decay: if spec.decay { cfg.weight_decay } else { 0.0 },
                step: self.step,
                grad_scale,
            };
            let g =
                model.grads[i]
                    .as_ref()
                    .ok_or_else(|| crate::backend::BackendError::Invalid {
                        op: "adamw",
                        msg: format!("tensor {} has moments but no gradient", spec.name),
                    })?;
            be.adamw(&mut model.params[i], g, m, v, &hp)?;
        }
        if self.zero >= 1 && comm.world_size() > 1 {
            for root in 0..comm.world_size() {
                let mut group: Vec<&mut B::Buf> = model
                    .params
                    .iter_mut()
                    .enumerate()
                    .filter(|(i, _)| self.owner[*i] == root)
                    .map(|(_, p)| p)
                    .collect();
                if !group.is_empty() {
                    comm.broadcast(be, &mut group, root)?;
                }
            }
            comm.wait(be)?;
        }
        Ok(())
    }

    /// Bytes of optimizer state (moments, and fp32 masters where the backend keeps them) this
    /// rank holds.
    pub fn state_bytes(&self, be: &B) -> u64 {
        self.numels
            .iter()
            .enumerate()
            .filter(|(i, _)| self.owns(*i))
            .map(|(_, &n)| state_bytes_per_tensor(be, n))
            .sum()
    }

    /// Bytes of optimizer state a rank holds without sharding (zero 0).
    pub fn full_state_bytes(&self, be: &B) -> u64 {
        self.numels
            .iter()
            .filter(|&&n| n > 0)
            .map(|&n| state_bytes_per_tensor(be, n))
            .sum()
    }

    /// The line for the start of a run under zero 1 ("ZeRO-1: optimizer state 12.3 MB on rank
    /// 0 instead of 36.9 MB unsharded"); `None` under zero 0.
    pub fn zero_line(&self, be: &B) -> Option<String> {
        (self.zero >= 1).then(|| {
            format!(
                "ZeRO-1: optimizer state {} on rank {} instead of {} unsharded",
                mb(self.state_bytes(be)),
                self.rank,
                mb(self.full_state_bytes(be))
            )
        })
    }
}

/// Decimal megabytes with one decimal ("12.3 MB").
fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

#[cfg(test)]
mod tests {
    use super::{lr_at, shard_owners};

    #[test]
    fn shard_owners_are_balanced_largest_first() {
        // 40 -> 0, 30 -> 1, 20 -> 1 (30 < 40), 10 -> 0, 5 -> 0 (50 = 50: the lower rank).
        assert_eq!(shard_owners(&[10, 40, 30, 20, 5], 2), vec![0, 0, 1, 1, 0]);
        assert_eq!(shard_owners(&[10, 40, 30, 20, 5], 3), vec![2, 0, 1, 2, 1]);
        assert_eq!(shard_owners(&[7, 7, 7], 1), vec![0, 0, 0]);
        assert_eq!(
            shard_owners(&[7, 7, 7], 4),
            vec![0, 1, 2],
            "rank 3 owns nothing"
        );
    }

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let (lr, warm, max, floor) = (1.0, 10, 110, 0.1);
        assert!((lr_at(0, lr, warm, max, floor) - 0.1).abs() < 1e-6);
        assert!((lr_at(9, lr, warm, max, floor) - 1.0).abs() < 1e-6);
        assert!(
            (lr_at(60, lr, warm, max, floor) - 0.55).abs() < 1e-6,
            "half way: mid of [0.1, 1]"
        );
        assert!((lr_at(110, lr, warm, max, floor) - 0.1).abs() < 1e-6);
        let mut prev = f32::INFINITY;
        for s in warm..max {
            let x = lr_at(s, lr, warm, max, floor);
            assert!(x <= prev + 1e-7);
            prev = x;
        }
    }

    /// gpt2-124m by whole tensors: the largest rank's share is within one tensor (the 38.6M
    /// `wte.weight`) of an even split, and the shares cover every element once.
    #[test]
    fn gpt2_124m_shares_are_within_the_largest_tensor_of_even() {
        let cfg = crate::config::ModelConfig::preset("gpt2-124m", 50257).unwrap();
        let numels: Vec<usize> = crate::model::ParamLayout::new(&cfg)
            .specs
            .iter()
            .map(|s| s.numel())
            .collect();
        let total: usize = numels.iter().sum();
        let largest = *numels.iter().max().unwrap();
        for world in [2, 4, 8] {
            let owner = shard_owners(&numels, world);
            let mut share = vec![0usize; world];
            for (i, &n) in numels.iter().enumerate() {
                share[owner[i]] += n;
            }
            assert_eq!(share.iter().sum::<usize>(), total);
            let most = *share.iter().max().unwrap();
            assert!(most <= total / world + largest, "{world} ranks: {share:?}");
            println!("gpt2-124m at {world} ranks: shares {share:?} of {total}");
        }
    }
}
