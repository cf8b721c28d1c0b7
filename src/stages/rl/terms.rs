//! The RL stage's arithmetic on the host, kept apart from the data flow so tests can check it by
//! hand: the KL-shaped sequence rewards, the leave-one-out advantages of a group, and the clipped
//! policy-ratio surrogate per token with its gradient.

/// `r - kl_coef * kl` per completion: the reward model's score minus the KL penalty, where `kl`
/// is the completion's summed `logp_old - logp_ref` over its tokens.
pub fn shaped_rewards(rewards: &[f32], kls: &[f64], kl_coef: f64) -> Vec<f64> {
    assert_eq!(rewards.len(), kls.len(), "one KL per reward");
    rewards
        .iter()
        .zip(kls)
        .map(|(&r, &kl)| r as f64 - kl_coef * kl)
        .collect()
}

/// Leave-one-out advantages of one group (the `k` completions of one prompt):
/// `A_i = s_i - mean_{j != i} s_j`. Needs `k >= 2`.
pub fn loo_advantages(shaped: &[f64]) -> Vec<f64> {
    let k = shaped.len();
    assert!(
        k >= 2,
        "leave-one-out needs at least two completions per prompt"
    );
    let total: f64 = shaped.iter().sum();
    shaped
        .iter()
        .map(|&s| s - (total - s) / (k - 1) as f64)
        .collect()
}

/// One token of the clipped surrogate: its objective `min(rho A, clip(rho, 1-eps, 1+eps) A)`
/// with `rho = exp(logp - logp_old)`, its derivative with respect to `logp`, and whether the
/// clipped branch is the one taken (then the derivative is 0).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenTerm {
    pub objective: f64,
    pub d_logp: f64,
    pub clipped: bool,
}

/// See [`TokenTerm`].
pub fn clipped_term(logp: f64, logp_old: f64, advantage: f64, clip: f64) -> TokenTerm {
    let rho = (logp - logp_old).exp();
    let plain = rho * advantage;
    let bounded = rho.clamp(1.0 - clip, 1.0 + clip) * advantage;
    if plain <= bounded {
        TokenTerm {
            objective: plain,
            d_logp: plain,
            clipped: false,
        }
    } else {
        TokenTerm {
            objective: bounded,
            d_logp: 0.0,
            clipped: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leave_one_out_by_hand() {
        let a = loo_advantages(&[1.0, 0.0, 0.0, 3.0]);
        // 1 - (0 + 0 + 3)/3, 0 - 4/3, 0 - 4/3, 3 - 1/3
        let want = [0.0, -4.0 / 3.0, -4.0 / 3.0, 8.0 / 3.0];
        for (x, y) in a.iter().zip(want) {
            assert!((x - y).abs() < 1e-12, "{a:?}");
        }
        // Equal rewards: no signal.
        assert!(loo_advantages(&[0.5; 3]).iter().all(|&x| x == 0.0));
    }

    #[test]
    fn clipping_stops_the_gradient_only_past_the_bound_in_the_advantage_direction() {
        let on = clipped_term(0.0, 0.0, 2.0, 0.2);
        assert_eq!((on.objective, on.d_logp, on.clipped), (2.0, 2.0, false));
        // rho = 1.5 > 1.2 with A > 0: clipped, no gradient.
        let up = clipped_term(1.5f64.ln(), 0.0, 1.0, 0.2);
        assert!(up.clipped && up.d_logp == 0.0 && (up.objective - 1.2).abs() < 1e-12);
        // rho = 1.5 with A < 0: the unclipped (more pessimistic) term, gradient flows.
        let down = clipped_term(1.5f64.ln(), 0.0, -1.0, 0.2);
        assert!(!down.clipped && (down.d_logp + 1.5).abs() < 1e-12);
        // rho = 0.5 < 0.8 with A < 0: clipped.
        let low = clipped_term(0.5f64.ln(), 0.0, -1.0, 0.2);
        assert!(low.clipped && low.d_logp == 0.0);
    }
}
