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
//! The reference log-probabilities are computed once, in a pass over every train and val pair
//! before training, with the reference model that is then dropped (run/dpo.rs), so only the
//! policy lives in memory while training; they are stored in the run directory
//! (`ref_logps.bin`, docs/FORMATS.md) and reused on `--resume`.
//!
//! Data: a micro-batch of `batch_size` pairs runs as one model batch of `2 * batch_size` rows,
//! the chosen rows first, then the rejected rows in the same order. A row is a sequence cut to
//! `T + 1` tokens as in SFT (`stages/sft.rs::fill_row`): inputs then `<|endoftext|>` padding,
//! targets only on the response tokens. Pairs where either response has no target within
//! `T + 1` tokens are skipped. Pairs are drawn in a seeded per-epoch permutation; the position
//! `(epoch, cursor)` is saved in checkpoints. The gradient reaches the model through per-row
//! coefficients `dL/dlogp` (model/logprobs.rs).
//!
//! Departures: log-probabilities are sequence sums for both losses (the IPO paper's form; some
//! libraries average IPO's per token); no label smoothing (conservative DPO) or reference-free
//! variant; a micro-batch's loss is the mean over its pairs; one data-parallel rank only.
//!
//! Command: `topcoat dpo --init runs/sft --data DIR --out runs/dpo [--beta 0.1] [--loss sigmoid|ipo]`.

use serde::{Deserialize, Serialize};

/// Which preference loss to minimise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DpoLoss {
    /// `-log sigmoid(beta * h)` (DPO).
    Sigmoid,
    /// `(h - 1 / (2 beta))^2` (IPO).
    Ipo,
}

impl std::str::FromStr for DpoLoss {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sigmoid" => Ok(Self::Sigmoid),
            "ipo" => Ok(Self::Ipo),
            other => Err(format!("unknown DPO loss `{other}` (expected sigmoid or ipo)")),
        }
    }
}

/// The loss, its derivatives and the implicit rewards of one pair.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PairTerms {
    pub loss: f64,
    /// `dL / dlogp_pi(chosen)` and `dL / dlogp_pi(rejected)`.
    pub d_chosen: f64,
    pub d_rejected: f64,
    /// `beta * (logp_pi - logp_ref)` of each response.
    pub reward_chosen: f64,
    pub reward_rejected: f64,
}

/// `log(1 + exp(x))` without overflow.
fn softplus(x: f64) -> f64 {
    if x > 0.0 {
        x + (-x).exp().ln_1p()
    } else {
        x.exp().ln_1p()
    }
}

/// `1 / (1 + exp(-x))` without overflow.
fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// The terms of one pair from the policy's and the reference's log-probabilities of the chosen
/// (`pc`, `rc`) and rejected (`pr`, `rr`) responses.
pub fn pair_terms(loss: DpoLoss, beta: f64, pc: f64, pr: f64, rc: f64, rr: f64) -> PairTerms {
    let (reward_chosen, reward_rejected) = (beta * (pc - rc), beta * (pr - rr));
    let h = (pc - rc) - (pr - rr);
    let (value, dh) = match loss {
        // d/dh -log sigmoid(beta h) = -beta sigmoid(-beta h).
        DpoLoss::Sigmoid => (softplus(-beta * h), -beta * sigmoid(-beta * h)),
        DpoLoss::Ipo => {
            let gap = h - 1.0 / (2.0 * beta);
            (gap * gap, 2.0 * gap)
        }
    };
    PairTerms {
        loss: value,
        d_chosen: dh,
        d_rejected: -dh,
        reward_chosen,
        reward_rejected,
    }
}

/// Sums over pairs of what DPO logs; [`DpoStats::metrics`] turns them into means.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DpoStats {
    pub pairs: usize,
    pub loss: f64,
    pub reward_chosen: f64,
    pub reward_rejected: f64,
    pub correct: usize,
    pub logp_chosen: f64,
    pub logp_rejected: f64,
}

impl DpoStats {
    pub fn add(&mut self, terms: &PairTerms, pc: f64, pr: f64) {
        self.pairs += 1;
        self.loss += terms.loss;
        self.reward_chosen += terms.reward_chosen;
        self.reward_rejected += terms.reward_rejected;
        self.correct += usize::from(terms.reward_chosen > terms.reward_rejected);
        self.logp_chosen += pc;
        self.logp_rejected += pr;
    }

    pub fn merge(&mut self, other: &DpoStats) {
        self.pairs += other.pairs;
        self.loss += other.loss;
        self.reward_chosen += other.reward_chosen;
        self.reward_rejected += other.reward_rejected;
        self.correct += other.correct;
        self.logp_chosen += other.logp_chosen;
        self.logp_rejected += other.logp_rejected;
    }

    /// Mean loss over the pairs (0 with none).
    pub fn mean_loss(&self) -> f64 {
        self.loss / self.pairs.max(1) as f64
    }

    /// The logged means, keys prefixed by `prefix` (`""` for training, `"val_"`).
    pub fn metrics(&self, prefix: &str) -> Vec<(String, f64)> {
        let n = self.pairs.max(1) as f64;
        let (c, r) = (self.reward_chosen / n, self.reward_rejected / n);
        [
            ("rewards/chosen", c),
            ("rewards/rejected", r),
            ("rewards/margins", c - r),
            ("rewards/accuracies", self.correct as f64 / n),
            ("logps/chosen", self.logp_chosen / n),
            ("logps/rejected", self.logp_rejected / n),
        ]
        .into_iter()
        .map(|(k, v)| (format!("{prefix}{k}"), v))
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigmoid_loss_and_derivatives() {
        let t = pair_terms(DpoLoss::Sigmoid, 0.1, -10.0, -12.0, -10.0, -12.0);
        assert_eq!(t.loss, std::f64::consts::LN_2);
        assert_eq!((t.d_chosen, t.d_rejected), (-0.05, 0.05));
        // h = 2: loss = log(1 + exp(-0.2)); a central difference of the loss in pc.
        let f = |pc: f64| pair_terms(DpoLoss::Sigmoid, 0.1, pc, -5.0, -2.0, -4.0);
        let t = f(-1.0);
        assert!((t.loss - (-0.2f64).exp().ln_1p()).abs() < 1e-15);
        let fd = (f(-1.0 + 1e-6).loss - f(-1.0 - 1e-6).loss) / 2e-6;
        assert!((t.d_chosen - fd).abs() < 1e-9, "{} vs {fd}", t.d_chosen);
        assert!((t.reward_chosen - 0.1).abs() < 1e-15 && (t.reward_rejected + 0.1).abs() < 1e-15);
        // Far from zero the loss neither overflows nor loses its slope.
        let big = pair_terms(DpoLoss::Sigmoid, 1.0, 0.0, 2000.0, 0.0, 0.0);
        assert!((big.loss - 2000.0).abs() < 1e-9 && (big.d_chosen + 1.0).abs() < 1e-12);
    }

    #[test]
    fn ipo_loss_regresses_the_margin_to_half_over_beta() {
        let t = pair_terms(DpoLoss::Ipo, 0.25, 0.0, 0.0, 0.0, 0.0);
        assert_eq!((t.loss, t.d_chosen, t.d_rejected), (4.0, -4.0, 4.0));
        let at_target = pair_terms(DpoLoss::Ipo, 0.25, 1.0, -1.0, 0.0, 0.0);
        assert_eq!((at_target.loss, at_target.d_chosen), (0.0, 0.0));
        assert_eq!("ipo".parse::<DpoLoss>(), Ok(DpoLoss::Ipo));
        assert!("hinge".parse::<DpoLoss>().unwrap_err().contains("sigmoid or ipo"));
    }
}
