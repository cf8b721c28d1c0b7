//! Fused softmax + cross-entropy over a (possibly padded) vocabulary, with the logits gradient
//! written in place.
//!
//! Napkin math: reads `N*V` logits twice (max, then exp-sum) and, with a gradient, writes
//! `N*VP`; memory-bound.

use rayon::prelude::*;

use super::float::Float;

/// Per row `i` of `logits [N*VP]` (real columns `[0, V)`):
/// `losses[i] = logsumexp(logits[i,:V]) - logits[i, targets[i]]`, 0 where `targets[i] < 0`.
/// With `dloss = Some(s)`, row `i` is overwritten by `s * (softmax - onehot)` over `[0, V)`
/// and 0 over `[V, VP)`; a masked row becomes all zeros. Targets must be `< V` (the caller
/// checks). The log-sum-exp is taken in f64 after a max shift.
pub fn cross_entropy<F: Float>(
    losses: &mut [F],
    logits: &mut [F],
    targets: &[i32],
    n: usize,
    v: usize,
    vp: usize,
    dloss: Option<F>,
) {
    logits[..n * vp]
        .par_chunks_mut(vp.max(1))
        .zip(losses[..n].par_iter_mut())
        .zip(targets[..n].par_iter())
        .for_each(|((row, loss), &target)| {
            if target < 0 {
                *loss = F::zero();
                if dloss.is_some() {
                    row.fill(F::zero());
                }
                return;
            }
            let target = target as usize;
            let max = row[..v]
                .iter()
                .fold(f64::NEG_INFINITY, |m, x| m.max(x.as_f64()));
            let sum: f64 = row[..v].iter().map(|x| (x.as_f64() - max).exp()).sum();
            let lse = max + sum.ln();
            *loss = F::of(lse - row[target].as_f64());
            if let Some(s) = dloss {
                let s = s.as_f64();
                for (j, x) in row[..v].iter_mut().enumerate() {
                    let p = (x.as_f64() - lse).exp();
                    let onehot = if j == target { 1.0 } else { 0.0 };
                    *x = F::of(s * (p - onehot));
                }
                row[v..].fill(F::zero());
            }
        });
}
