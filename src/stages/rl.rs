//! On-policy RL against a reward model with a KL leash to the reference policy.
//!
//! Algorithm: per rollout, `P` prompts are drawn (uniformly, with the rollout's generator, see
//! Ranks) and the current policy samples `k` completions of each with a KV cache (temperature 1, no
//! top-k/top-p, so the samples follow the policy being trained), stopping at the stop token
//! (`<|end|>`) or after `max_new` tokens. Each completion is scored by the reward model on
//! prompt + completion (its last token). The policy's per-token log-probabilities
//! `logp_old` and the frozen reference's `logp_ref` are computed on the same rows; the KL
//! penalty is the summed per-token `logp_old - logp_ref` of the sampled tokens (a Monte Carlo
//! estimate of `KL(pi || ref)`), folded into the reward: `s_i = r_i - kl_coef * kl_i`
//! (KL-penalised RLHF, Ouyang et al. 2022, "Training language models to follow instructions
//! with human feedback"). The advantage is group-relative with a leave-one-out baseline,
//! `A_i = s_i - mean_{j != i} s_j` over the `k` completions of the same prompt (RLOO, Ahmadian
//! et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
//! Feedback in LLMs"). The update maximises the clipped surrogate of every completion token,
//! `min(rho A_i, clip(rho, 1 - clip, 1 + clip) A_i)` with `rho = exp(logp - logp_old)`
//! (PPO clipping, Schulman et al. 2017, "Proximal Policy Optimization Algorithms"), summed over
//! a completion's tokens and averaged over the `P * k` completions; the gradient reaches the
//! logits as per-position weights (`Gpt::token_logps_step`).
//!
//! Rollout reuse: a rollout serves `epochs` consecutive optimizer steps (one micro-batch slot
//! per gradient-accumulation micro-step), so from the second epoch on the ratio differs from 1
//! and the clip acts; with `epochs = 1` the update is exactly RLOO's REINFORCE step.
//!
//! Ranks: the micro-batches form one global stream; rank `r` of `W` takes micro-batches
//! `r, r + W, ...`, and a rollout is drawn (its prompts and its samples) from a generator seeded
//! by the run's seed and the global index of the micro-batch that samples it. So each rank
//! samples its own prompts and completions, never the same as another rank's, and the same
//! global micro-batch samples the same rollout at every world size. The data position saved is
//! the global micro-batch index of the next step (`global_micro_batch`; older single-rank
//! checkpoints' `micro_steps` is the same number).
//!
//! Logged per step (means over the step's rollouts): `reward` (reward-model score), `kl`
//! (per completion, summed over its tokens), `entropy` (per token, estimated as the mean
//! `-logp_old` of the sampled tokens), `response_len` (tokens), `clip_frac` (fraction of
//! tokens on the clipped branch). The step's loss is the negated mean surrogate.
//!
//! Departures: the reference model is held in memory beside the policy and the reward model
//! (three models; DPO precomputes instead, which RL cannot since its samples are new each
//! rollout), except in a LoRA run, whose reference is the policy with its adapters switched
//! off ([`RlReference::AdaptersOff`], as TRL does with PEFT models: no second copy); the KL enters as a sequence-level reward shaping (RLOO's form) rather than a
//! per-token reward or a separate loss term; no value function, no GAE, no advantage
//! whitening; the entropy is a sample estimate, not the full-distribution sum; prompts longer
//! than `T - max_new` tokens are skipped; no validation pass; a resumed run samples a fresh
//! rollout instead of reusing the one in flight (rollouts are not checkpointed).
//!
//! Command: `topcoat rl --init runs/sft --reward runs/reward --prompts prompts.jsonl
//! --out runs/rl [--k 4] [--kl-coef 0.05] [--clip 0.2] [--max-new 32] [--epochs 2]`.

pub mod terms;

use crate::backend::{Backend, SampleParams};
use crate::config::ConfigError;
use crate::data::RankSlice;
use crate::generate::generate_group;
use crate::model::{forward::Loss, Gpt, RewardModel};
use crate::rng::Rng;
use crate::train::{Extras, Objective, Result, TrainError, ValPartial};
use std::path::PathBuf;
use terms::{clipped_term, loo_advantages, shaped_rewards};

/// Scores the `k` completions of one prompt.
pub trait Scorer<B: Backend> {
    fn score(&mut self, be: &B, prompt: &[u32], completions: &[Vec<u32>]) -> Result<Vec<f32>>;
}

/// A reward model as a [`Scorer`]: reads prompt + completion, padded with `pad`.
pub struct ModelScorer<B: Backend> {
    pub model: RewardModel<B>,
    pub pad: u32,
}

impl<B: Backend> Scorer<B> for ModelScorer<B> {
    fn score(&mut self, be: &B, prompt: &[u32], completions: &[Vec<u32>]) -> Result<Vec<f32>> {
        let seqs: Vec<Vec<u32>> = completions
            .iter()
            .map(|c| prompt.iter().chain(c).copied().collect())
            .collect();
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        Ok(self.model.score(be, &refs, self.pad)?)
    }
}

/// A host function of (prompt, completion) as a [`Scorer`] (toy rewards, tests).
pub struct FnScorer<F>(pub F);

impl<B: Backend, F: FnMut(&[u32], &[u32]) -> f32> Scorer<B> for FnScorer<F> {
    fn score(&mut self, _be: &B, prompt: &[u32], completions: &[Vec<u32>]) -> Result<Vec<f32>> {
        Ok(completions.iter().map(|c| (self.0)(prompt, c)).collect())
    }
}

fn invalid(msg: String) -> TrainError {
    ConfigError::Invalid(msg).into()
}

/// The stage's settings.
#[derive(Clone, Debug)]
pub struct RlConfig {
    /// Prompts per micro-batch (`P`); the model runs `P * k` rows.
    pub prompts: usize,
    /// Completions per prompt (>= 2, for the leave-one-out baseline).
    pub k: usize,
    pub kl_coef: f64,
    pub clip: f64,
    /// Most new tokens per completion.
    pub max_new: usize,
    /// Optimizer steps each rollout serves.
    pub epochs: usize,
    /// Row length `T` of the training batch (prompt + completion must fit).
    pub t: usize,
    /// Gradient-accumulation micro-steps per optimizer step (rollout slots).
    pub accum: usize,
    pub stop: Option<u32>,
    pub pad: u32,
}

impl RlConfig {
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.k < 2 {
            return Err(format!(
                "--k must be at least 2 (leave-one-out baseline), got {}",
                self.k
            ));
        }
        if !(self.kl_coef >= 0.0 && self.kl_coef.is_finite()) {
            return Err(format!(
                "--kl-coef must be a finite number >= 0, got {}",
                self.kl_coef
            ));
        }
        if !(self.clip > 0.0 && self.clip < 1.0) {
            return Err(format!("--clip must be in (0, 1), got {}", self.clip));
        }
        if self.max_new == 0 || self.epochs == 0 || self.prompts == 0 || self.accum == 0 {
            return Err(format!(
                "--max-new, --epochs and --batch-size must be positive (got {}, {}, {})",
                self.max_new, self.epochs, self.prompts
            ));
        }
        if self.max_new >= self.t {
            return Err(format!(
                "--max-new {} leaves no room for a prompt in T = {} tokens",
                self.max_new, self.t
            ));
        }
        Ok(())
    }
}

/// One micro-batch of sampled completions, ready for updates.
struct Rollout {
    rows: usize,
    inputs: Vec<i32>,
    targets: Vec<i32>,
    /// `[rows*T]` the sampling policy's log-probabilities (0 where masked).
    old: Vec<f32>,
    /// Per row.
    advantages: Vec<f64>,
}

/// Sums over the rollouts and updates of a step.
#[derive(Clone, Copy, Debug, Default)]
struct Stats {
    completions: f64,
    reward: f64,
    kl: f64,
    tokens: f64,
    neg_logp: f64,
    updated_tokens: f64,
    clipped: f64,
}

/// The model the KL leash pulls toward.
#[allow(clippy::large_enum_variant)] // one per run: boxing the model gains nothing
pub enum RlReference<B: Backend> {
    /// A frozen model held beside the policy (the `--init` checkpoint loaded again).
    Model(Gpt<B>),
    /// The policy itself with its LoRA adapters off: the frozen base, at no extra memory.
    AdaptersOff,
}

impl<B: Backend> From<Gpt<B>> for RlReference<B> {
    fn from(model: Gpt<B>) -> Self {
        Self::Model(model)
    }
}

/// The RL objective: the policy is the model the loop trains; the reference and the scorer
/// are held here.
pub struct Rl<B: Backend> {
    prompts: Vec<Vec<u32>>,
    skipped: usize,
    reference: RlReference<B>,
    scorer: Box<dyn Scorer<B>>,
    pub cfg: RlConfig,
    /// Micro-steps this rank has taken (its share of the stream: global micro-batches
    /// `rank, rank + W, ...`).
    calls: u64,
    /// The run's seed: with a micro-batch's global index, it seeds that micro-batch's rollout.
    seed: u64,
    ranks: RankSlice,
    slots: Vec<Option<Rollout>>,
    stats: Stats,
}

impl<B: Backend> Rl<B> {
    /// Keeps the prompts that leave room for `max_new` tokens in `T`; errors if none does.
    pub fn new(
        prompts: Vec<Vec<u32>>,
        reference: impl Into<RlReference<B>>,
        scorer: Box<dyn Scorer<B>>,
        cfg: RlConfig,
    ) -> Result<Self> {
        cfg.check().map_err(invalid)?;
        let total = prompts.len();
        let prompts: Vec<Vec<u32>> = prompts
            .into_iter()
            .filter(|p| !p.is_empty() && p.len() + cfg.max_new <= cfg.t)
            .collect();
        if prompts.is_empty() {
            return Err(invalid(format!(
                "none of the {total} prompts fits in T - max_new = {} tokens",
                cfg.t - cfg.max_new
            )));
        }
        Ok(Self {
            skipped: total - prompts.len(),
            prompts,
            reference: reference.into(),
            scorer,
            slots: (0..cfg.accum).map(|_| None).collect(),
            cfg,
            calls: 0,
            seed: 0,
            ranks: RankSlice::SOLO,
            stats: Stats::default(),
        })
    }

    /// Draws rank `ranks.rank`'s share of the stream, rollouts seeded from `seed` (see the
    /// module header).
    pub fn with_ranks(mut self, seed: u64, ranks: RankSlice) -> Self {
        self.seed = seed;
        self.ranks = ranks;
        self
    }

    /// The global index of this rank's next micro-batch.
    fn global_micro_batch(&self) -> u64 {
        self.calls * self.ranks.world as u64 + self.ranks.rank as u64
    }

    /// The generator of the rollout sampled at global micro-batch `g`: distinct per micro-batch
    /// (so per rank), the same at every world size.
    fn rollout_rng(&self, g: u64) -> Rng {
        let a = Rng::new(self.seed ^ 0x726c_5f72_6f6c_6c6f).next_u64();
        Rng::new(a ^ g.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    /// Prompts drawn from.
    pub fn num_prompts(&self) -> usize {
        self.prompts.len()
    }

    /// Prompts skipped as too long.
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    /// `k` completions of `prompt` from `model`, sampled together with a `k`-row KV cache.
    fn sample(
        &self,
        be: &B,
        model: &Gpt<B>,
        prompt: &[u32],
        rng: &mut Rng,
    ) -> Result<Vec<Vec<u32>>> {
        // Temperature 1 with no top-k/top-p: the samples follow the policy being trained.
        let params = SampleParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        };
        let stops: Vec<u32> = self.cfg.stop.into_iter().collect();
        let rows = vec![prompt; self.cfg.k];
        Ok(generate_group(
            be,
            model,
            &rows,
            self.cfg.max_new,
            &stops,
            &params,
            rng,
        )?)
    }

    /// Samples, scores and prepares one micro-batch, adding its statistics.
    fn rollout(&mut self, be: &B, model: &mut Gpt<B>, rng: &mut Rng) -> Result<Rollout> {
        let (p, k, t) = (self.cfg.prompts, self.cfg.k, self.cfg.t);
        let rows = p * k;
        let mut inputs = vec![self.cfg.pad as i32; rows * t];
        let mut targets = vec![-1i32; rows * t];
        let mut rewards = Vec::with_capacity(rows);
        let mut lens = Vec::with_capacity(rows);
        for g in 0..p {
            let prompt = self.prompts[rng.below(self.prompts.len() as u64) as usize].clone();
            let completions = self.sample(be, model, &prompt, rng)?;
            let scores = self.scorer.score(be, &prompt, &completions)?;
            if scores.len() != k || scores.iter().any(|r| !r.is_finite()) {
                return Err(invalid(format!(
                    "the scorer returned {scores:?} for {k} completions"
                )));
            }
            rewards.extend(scores);
            for (i, c) in completions.iter().enumerate() {
                let row = g * k + i;
                let seq: Vec<u32> = prompt.iter().chain(c).copied().collect();
                for j in 0..seq.len() - 1 {
                    inputs[row * t + j] = seq[j] as i32;
                    if j + 1 >= prompt.len() {
                        targets[row * t + j] = seq[j + 1] as i32;
                    }
                }
                lens.push(c.len());
            }
        }
        let old = model.token_logps(be, &inputs, &targets, rows, t)?;
        let reference = match &mut self.reference {
            RlReference::Model(r) => r.token_logps(be, &inputs, &targets, rows, t)?,
            RlReference::AdaptersOff => {
                let was = model.adapters_enabled();
                model.set_adapters_enabled(false);
                let logps = model.token_logps(be, &inputs, &targets, rows, t);
                model.set_adapters_enabled(was);
                logps?
            }
        };
        let kls: Vec<f64> = (0..rows)
            .map(|r| {
                let span = r * t..(r + 1) * t;
                old[span.clone()]
                    .iter()
                    .zip(&reference[span])
                    .map(|(&a, &b)| a as f64 - b as f64)
                    .sum()
            })
            .collect();
        let shaped = shaped_rewards(&rewards, &kls, self.cfg.kl_coef);
        let advantages: Vec<f64> = shaped.chunks(k).flat_map(loo_advantages).collect();
        let s = &mut self.stats;
        s.completions += rows as f64;
        s.reward += rewards.iter().map(|&r| r as f64).sum::<f64>();
        s.kl += kls.iter().sum::<f64>();
        s.tokens += lens.iter().sum::<usize>() as f64;
        s.neg_logp -= old.iter().map(|&x| x as f64).sum::<f64>();
        Ok(Rollout {
            rows,
            inputs,
            targets,
            old,
            advantages,
        })
    }
}

impl<B: Backend> Objective<B> for Rl<B> {
    fn name(&self) -> &str {
        "rl"
    }

    /// The loss is the negated surrogate, scaled by each rollout's advantages: a jump says
    /// nothing about divergence (the demo's quick run goes from 0.43 to 17.5 in a step).
    fn loss_spike_means_divergence(&self) -> bool {
        false
    }

    fn micro_step(
        &mut self,
        be: &B,
        model: &mut Gpt<B>,
        _rng: &mut Rng,
        loss_scale: f32,
    ) -> Result<Loss> {
        let mut rng = self.rollout_rng(self.global_micro_batch());
        let slot = (self.calls % self.cfg.accum as u64) as usize;
        let step = self.calls / self.cfg.accum as u64;
        self.calls += 1;
        if step.is_multiple_of(self.cfg.epochs as u64) || self.slots[slot].is_none() {
            let fresh = self.rollout(be, model, &mut rng)?;
            self.slots[slot] = Some(fresh);
        }
        let ro = self.slots[slot].as_ref().expect("filled above");
        let (t, clip) = (self.cfg.t, self.cfg.clip);
        let scale = loss_scale as f64 / ro.rows as f64;
        let (mut objective, mut tokens, mut clipped) = (0.0f64, 0usize, 0usize);
        model.token_logps_step(be, &ro.inputs, &ro.targets, ro.rows, t, |logps| {
            let mut coef = vec![0.0f32; logps.len()];
            for (i, c) in coef.iter_mut().enumerate() {
                if ro.targets[i] < 0 {
                    continue;
                }
                let a = ro.advantages[i / t];
                let term = clipped_term(logps[i] as f64, ro.old[i] as f64, a, clip);
                objective += term.objective;
                tokens += 1;
                clipped += term.clipped as usize;
                // The loss is the negated objective.
                *c = (-scale * term.d_logp) as f32;
            }
            coef
        })?;
        self.stats.updated_tokens += tokens as f64;
        self.stats.clipped += clipped as f64;
        let loss = -objective / ro.rows as f64;
        Ok(Loss {
            mean: loss as f32,
            sum: -objective,
            tokens,
        })
    }

    fn validate(&mut self, _be: &B, _model: &mut Gpt<B>) -> Result<Option<ValPartial>> {
        Ok(None)
    }

    /// The global micro-batch index of the next step (world-size-free).
    fn data_position(&self) -> serde_json::Value {
        serde_json::json!({ "global_micro_batch": self.calls * self.ranks.world as u64 })
    }

    /// Reads `global_micro_batch`, or an older single-rank checkpoint's `micro_steps` (the same
    /// number at one rank); a position that does not start a step at this world size is refused.
    fn set_data_position(&mut self, pos: &serde_json::Value) -> Result<()> {
        let bad = |msg: String| TrainError::Checkpoint {
            path: PathBuf::from("train_state.json"),
            msg,
        };
        let g = pos["global_micro_batch"]
            .as_u64()
            .or_else(|| pos["micro_steps"].as_u64())
            .ok_or_else(|| {
                bad(format!(
                    "bad RL data position {pos}: expected {{\"global_micro_batch\": N}}"
                ))
            })?;
        let world = self.ranks.world as u64;
        if g % world != 0 {
            return Err(bad(format!(
                "RL data position: global micro-batch {g} does not start a step at world size \
                 {world}; resume with a world size that divides it (keeping the global batch)"
            )));
        }
        self.calls = g / world;
        self.slots.iter_mut().for_each(|s| *s = None);
        Ok(())
    }

    /// `reward`, `kl`, `entropy`, `response_len`, `clip_frac` over the rollouts sampled and
    /// the tokens updated since the last call (a reused rollout logs only its `clip_frac`).
    fn take_metrics(&mut self) -> Extras {
        let s = std::mem::take(&mut self.stats);
        let mut extras = Extras::default();
        if s.completions > 0.0 {
            extras.push("reward", (s.reward / s.completions) as f32);
            extras.push("kl", (s.kl / s.completions) as f32);
            extras.push("entropy", (s.neg_logp / s.tokens.max(1.0)) as f32);
            extras.push("response_len", (s.tokens / s.completions) as f32);
        }
        if s.updated_tokens > 0.0 {
            extras.push("clip_frac", (s.clipped / s.updated_tokens) as f32);
        }
        extras
    }
}
