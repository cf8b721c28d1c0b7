//! RMSNorm over the last dimension (Zhang & Sennrich 2019; Hugging Face's `LlamaRMSNorm`),
//! forward, fused with the residual add before it, and backward. The mean square is summed in
//! f64, as layernorm's statistics are.
//!
//! Napkin math: forward reads `N*C` and writes `N*C` numbers (~4 FLOPs per element); the fused
//! residual form reads one more `N*C` and writes the sum; backward reads `3*N*C` and accumulates
//! `N*C + C`. Memory-bound.

use rayon::prelude::*;

use super::float::{add_partials, Float, ROW_BLOCK};

/// `1/sqrt(mean(x^2) + eps)` of one row, in f64.
fn row_rstd<F: Float>(x: &[F], eps: f32) -> f64 {
    let ms = x.iter().map(|v| v.as_f64() * v.as_f64()).sum::<f64>() / x.len() as f64;
    1.0 / (ms + eps as f64).sqrt()
}

/// One row: `out = (x * rstd) * weight`, rounded to `F` before the weight as Hugging Face does
/// (it normalises in fp32, casts back, then scales). Returns `rstd`.
fn norm_row<F: Float>(out: &mut [F], x: &[F], weight: &[F], eps: f32) -> F {
    let r = row_rstd(x, eps);
    for ((o, &xj), &wj) in out.iter_mut().zip(x).zip(weight) {
        *o = F::of(xj.as_f64() * r) * wj;
    }
    F::of(r)
}

/// Per row of `inp [N*C]`: `out = x * rstd * weight`, `rstd = 1/sqrt(mean(x^2) + eps)`, saved.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_forward<F: Float>(
    out: &mut [F],
    rstd: &mut [F],
    inp: &[F],
    weight: &[F],
    n: usize,
    c: usize,
    eps: f32,
) {
    out[..n * c]
        .par_chunks_mut(c)
        .zip(rstd[..n].par_iter_mut())
        .zip(inp[..n * c].par_chunks(c))
        .for_each(|((o, r), x)| *r = norm_row(o, x, weight, eps));
}

/// `residual = a + b`, then `out = rmsnorm(residual)`, one pass per row (same values as the
/// two ops run one after the other).
#[allow(clippy::too_many_arguments)]
pub fn residual_rmsnorm_forward<F: Float>(
    residual: &mut [F],
    out: &mut [F],
    rstd: &mut [F],
    a: &[F],
    b: &[F],
    weight: &[F],
    n: usize,
    c: usize,
    eps: f32,
) {
    residual[..n * c]
        .par_chunks_mut(c)
        .zip(out[..n * c].par_chunks_mut(c))
        .zip(rstd[..n].par_iter_mut())
        .enumerate()
        .for_each(|(i, ((res, o), r))| {
            let (x, y) = (&a[i * c..][..c], &b[i * c..][..c]);
            for ((s, &xj), &yj) in res.iter_mut().zip(x).zip(y) {
                *s = xj + yj;
            }
            *r = norm_row(o, res, weight, eps);
        });
}

/// Accumulates `dinp` and `dweight`. With `norm = x * rstd` and `dnorm = weight * dout`:
/// `dinp += rstd * (dnorm - norm * mean(dnorm * norm))`, `dweight += sum_rows(dout * norm)`.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward<F: Float>(
    dinp: &mut [F],
    dweight: &mut [F],
    dout: &[F],
    inp: &[F],
    weight: &[F],
    rstd: &[F],
    n: usize,
    c: usize,
) {
    // dinp: rows are independent.
    dinp[..n * c]
        .par_chunks_mut(c)
        .enumerate()
        .for_each(|(i, dx)| {
            let x = &inp[i * c..][..c];
            let dy = &dout[i * c..][..c];
            let r = rstd[i].as_f64();
            let mut dnorm_norm_mean = 0.0f64;
            for j in 0..c {
                dnorm_norm_mean += weight[j].as_f64() * dy[j].as_f64() * x[j].as_f64() * r;
            }
            dnorm_norm_mean /= c as f64;
            for j in 0..c {
                let norm = x[j].as_f64() * r;
                let dnorm = weight[j].as_f64() * dy[j].as_f64();
                dx[j] += F::of(r * (dnorm - norm * dnorm_norm_mean));
            }
        });
    // dweight: blocked column sums over rows (deterministic).
    let partials: Vec<Vec<f64>> = (0..n.div_ceil(ROW_BLOCK))
        .into_par_iter()
        .map(|blk| {
            let mut acc = vec![0.0f64; c];
            for i in blk * ROW_BLOCK..((blk + 1) * ROW_BLOCK).min(n) {
                let r = rstd[i].as_f64();
                for (j, a) in acc.iter_mut().enumerate() {
                    *a += dout[i * c + j].as_f64() * inp[i * c + j].as_f64() * r;
                }
            }
            acc
        })
        .collect();
    let total = add_partials(partials, c);
    for (dw, t) in dweight[..c].iter_mut().zip(total) {
        *dw += F::of(t);
    }
}
