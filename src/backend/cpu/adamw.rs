//! AdamW update (decoupled weight decay, Loshchilov & Hutter) and the global gradient norm.
//!
//! Napkin math: AdamW reads 4 and writes 3 numbers per parameter (~15 FLOPs); the norm reads
//! each gradient once.

use rayon::prelude::*;

use super::float::{sum_squares_f64, Float};
use crate::backend::AdamWStep;

/// One AdamW step, elementwise, with `g = grad * grad_scale`:
/// `m = b1 m + (1-b1) g`, `v = b2 v + (1-b2) g^2`, `mhat = m / (1 - b1^t)`,
/// `vhat = v / (1 - b2^t)`, `p -= lr (mhat / (sqrt(vhat) + eps) + wd p)`.
pub fn adamw<F: Float>(param: &mut [F], grad: &[F], m: &mut [F], v: &mut [F], hp: &AdamWStep) {
    let step = hp.step.min(i32::MAX as u64) as i32;
    let (b1, b2) = (hp.beta1 as f64, hp.beta2 as f64);
    let bc1 = F::of(1.0 - b1.powi(step));
    let bc2 = F::of(1.0 - b2.powi(step));
    let (b1, b2) = (F::of(b1), F::of(b2));
    let (lr, eps, wd) = (
        F::of(hp.lr as f64),
        F::of(hp.eps as f64),
        F::of(hp.weight_decay as f64),
    );
    let gs = F::of(hp.grad_scale as f64);
    param
        .par_iter_mut()
        .zip(grad.par_iter())
        .zip(m.par_iter_mut().zip(v.par_iter_mut()))
        .for_each(|((p, &g), (m, v))| {
            let g = g * gs;
            *m = b1 * *m + (F::one() - b1) * g;
            *v = b2 * *v + (F::one() - b2) * g * g;
            let mhat = *m / bc1;
            let vhat = *v / bc2;
            *p -= lr * (mhat / (vhat.sqrt() + eps) + wd * *p);
        });
}

/// `sqrt(sum_i sum_j g_ij^2)` over all buffers, summed in f64 in a fixed order.
pub fn global_norm<F: Float>(bufs: &[&[F]]) -> f64 {
    bufs.iter().map(|b| sum_squares_f64(b)).sum::<f64>().sqrt()
}
