//! Fused softmax + cross-entropy over a (possibly padded) vocabulary, with the logits gradient
//! written in place, scaled uniformly or per row.
//!
//! Napkin math: reads `N*V` logits twice (max, then exp-sum) and, with a gradient, writes
//! `N*VP` twice (the exponentials, then the gradient); one `exp` per logit.

use rayon::prelude::*;

use super::float::Float;

/// Per row `i` of `logits [N*VP]` (real columns `[0, V)`):
/// `losses[i] = logsumexp(logits[i,:V]) - logits[i, targets[i]]`, 0 where `targets[i] < 0`.
/// With `dloss = Some(s)`, row `i` is overwritten by the gradient of `s * w_i * losses[i]`,
/// `s * w_i * (softmax - onehot)` over `[0, V)` and 0 over `[V, VP)`, where `w_i` is
/// `row_weights[i]` (`[N]`) or 1 without weights; a masked row becomes all zeros. Targets must
/// be `< V` (the caller checks). The exponentials `exp(x - max)` are taken in `F` after the max
/// shift (so they lie in `(0, 1]`) and summed in f64; the log-sum-exp and `s * w_i` are formed
/// in f64.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy<F: Float>(
    losses: &mut [F],
    logits: &mut [F],
    targets: &[i32],
    n: usize,
    v: usize,
    vp: usize,
    dloss: Option<F>,
    row_weights: Option<&[F]>,
) {
    logits[..n * vp]
        .par_chunks_mut(vp.max(1))
        .zip(losses[..n].par_iter_mut())
        .zip(targets[..n].par_iter())
        .enumerate()
        .for_each(|(i, ((row, loss), &target))| {
            if target < 0 {
                *loss = F::zero();
                if dloss.is_some() {
                    row.fill(F::zero());
                }
                return;
            }
            let target = target as usize;
            let max = row[..v].iter().fold(F::neg_infinity(), |m, &x| m.max(x));
            let target_logit = row[target].as_f64();
            let sum: f64 = match dloss {
                // Forward only: the logits are left untouched.
                None => row[..v].iter().map(|&x| (x - max).exp().as_f64()).sum(),
                // With a gradient: keep each exp(x - max) in the row for the second pass.
                Some(_) => row[..v]
                    .iter_mut()
                    .map(|x| {
                        *x = (*x - max).exp();
                        x.as_f64()
                    })
                    .sum(),
            };
            let lse = max.as_f64() + sum.ln();
            *loss = F::of(lse - target_logit);
            if let Some(s) = dloss {
                let w = s.as_f64() * row_weights.map_or(1.0, |w| w[i].as_f64());
                // softmax_j = exp(x_j - max) / sum.
                let w_over_sum = F::of(w / sum);
                for x in row[..v].iter_mut() {
                    *x *= w_over_sum;
                }
                row[target] -= F::of(w);
                row[v..].fill(F::zero());
            }
        });
}
