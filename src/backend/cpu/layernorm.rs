//! LayerNorm over the last dimension, forward and backward (mean and variance in f64).
//!
//! Napkin math: forward reads `N*C` and writes `N*C` numbers (~8 FLOPs per element);
//! backward reads `3*N*C` and accumulates `N*C + 2*C`.

use rayon::prelude::*;

use super::float::{add_partials, Float, ROW_BLOCK};

/// Added to the variance before the reciprocal square root.
pub const EPS: f64 = 1e-5;

/// Per row: `out = (x - mean) * rstd * weight + bias`, `rstd = 1/sqrt(var + EPS)`, biased var.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward<F: Float>(
    out: &mut [F],
    mean: &mut [F],
    rstd: &mut [F],
    inp: &[F],
    weight: &[F],
    bias: &[F],
    n: usize,
    c: usize,
) {
    out[..n * c]
        .par_chunks_mut(c)
        .zip(mean[..n].par_iter_mut())
        .zip(rstd[..n].par_iter_mut())
        .enumerate()
        .for_each(|(i, ((row_out, m_out), r_out))| {
            let x = &inp[i * c..][..c];
            let m = x.iter().map(|v| v.as_f64()).sum::<f64>() / c as f64;
            let var = x
                .iter()
                .map(|v| (v.as_f64() - m) * (v.as_f64() - m))
                .sum::<f64>()
                / c as f64;
            let r = 1.0 / (var + EPS).sqrt();
            for j in 0..c {
                let norm = (x[j].as_f64() - m) * r;
                row_out[j] = F::of(norm) * weight[j] + bias[j];
            }
            *m_out = F::of(m);
            *r_out = F::of(r);
        });
}

/// Accumulates `dinp`, `dweight`, `dbias`. With `norm = (x - mean) * rstd` and
/// `dnorm = weight * dout`:
/// `dinp += rstd * (dnorm - mean(dnorm) - norm * mean(dnorm * norm))`,
/// `dweight += sum_rows(dout * norm)`, `dbias += sum_rows(dout)`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward<F: Float>(
    dinp: &mut [F],
    dweight: &mut [F],
    dbias: &mut [F],
    dout: &[F],
    inp: &[F],
    weight: &[F],
    mean: &[F],
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
            let (m, r) = (mean[i].as_f64(), rstd[i].as_f64());
            let mut dnorm_mean = 0.0f64;
            let mut dnorm_norm_mean = 0.0f64;
            for j in 0..c {
                let norm = (x[j].as_f64() - m) * r;
                let dnorm = weight[j].as_f64() * dy[j].as_f64();
                dnorm_mean += dnorm;
                dnorm_norm_mean += dnorm * norm;
            }
            dnorm_mean /= c as f64;
            dnorm_norm_mean /= c as f64;
            for j in 0..c {
                let norm = (x[j].as_f64() - m) * r;
                let dnorm = weight[j].as_f64() * dy[j].as_f64();
                dx[j] += F::of(r * (dnorm - dnorm_mean - norm * dnorm_norm_mean));
            }
        });
    // dweight, dbias: blocked column sums over rows (deterministic).
    let partials: Vec<Vec<f64>> = (0..n.div_ceil(ROW_BLOCK))
        .into_par_iter()
        .map(|blk| {
            // [dweight partial | dbias partial]
            let mut acc = vec![0.0f64; 2 * c];
            for i in blk * ROW_BLOCK..((blk + 1) * ROW_BLOCK).min(n) {
                let (m, r) = (mean[i].as_f64(), rstd[i].as_f64());
                for j in 0..c {
                    let dy = dout[i * c + j].as_f64();
                    acc[j] += dy * (inp[i * c + j].as_f64() - m) * r;
                    acc[c + j] += dy;
                }
            }
            acc
        })
        .collect();
    let total = add_partials(partials, 2 * c);
    for j in 0..c {
        dweight[j] += F::of(total[j]);
        dbias[j] += F::of(total[c + j]);
    }
}
