//! The DPO and IPO losses of one pair, their derivatives in the policy's log-probabilities, the
//! implicit rewards, and the per-pair sums the stage logs (formulas in the `stages/dpo.rs`
//! header).

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
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "sigmoid" => Ok(Self::Sigmoid),
            "ipo" => Ok(Self::Ipo),
            other => Err(format!(
                "unknown DPO loss `{other}` (expected sigmoid or ipo)"
            )),
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
        assert!("hinge"
            .parse::<DpoLoss>()
            .unwrap_err()
            .contains("sigmoid or ipo"));
    }
}
