//! Causal multi-head self-attention, forward and backward, flash-attention style: the forward
//! saves only the log-sum-exp of each score row, the backward recomputes the probabilities
//! from `q`, `k` and that log-sum-exp; the `T x T` matrix is never stored.
//!
//! Layout: `qkv [B, T, 3C]` holds `q | k | v` per position, head `h` owning columns
//! `h*hs .. (h+1)*hs` of each; `out [B, T, C]` heads concatenated; `lse [B, NH, T]`.
//! Each `(b, h)` pair is independent and runs as one rayon task; its results are computed into
//! local buffers and then copied (forward) or added (backward) into place, so the result does
//! not depend on the thread count.
//!
//! Napkin math: forward ~`2 * B * NH * T^2/2 * hs * 2` FLOPs (scores and weighted sum, causal
//! half); backward recomputes the scores and does four more such products, ~2.5x the forward.

use rayon::prelude::*;

use super::float::Float;

fn dot<F: Float>(a: &[F], b: &[F]) -> F {
    a.iter().zip(b).fold(F::zero(), |s, (&x, &y)| s + x * y)
}

/// Forward: `out = softmax(q k^T / sqrt(hs) + causal mask) v`; `lse[b,h,t]` is the
/// log-sum-exp of the scaled scores of row `t` (over `j <= t`).
#[allow(clippy::too_many_arguments)]
pub fn attention_forward<F: Float>(
    out: &mut [F],
    lse: &mut [F],
    qkv: &[F],
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) {
    let hs = c / nh;
    let scale = 1.0 / (hs as f64).sqrt();
    let c3 = 3 * c;
    // Per (b, h): (out rows [T*hs], lse [T]).
    let per_head: Vec<(Vec<F>, Vec<F>)> = (0..b * nh)
        .into_par_iter()
        .map(|bh| {
            let (bb, h) = (bh / nh, bh % nh);
            let q = |i: usize| &qkv[(bb * t + i) * c3 + h * hs..][..hs];
            let k = |j: usize| &qkv[(bb * t + j) * c3 + c + h * hs..][..hs];
            let v = |j: usize| &qkv[(bb * t + j) * c3 + 2 * c + h * hs..][..hs];
            let mut o = vec![F::zero(); t * hs];
            let mut l = vec![F::zero(); t];
            let mut scores = vec![0.0f64; t];
            for i in 0..t {
                let mut max = f64::NEG_INFINITY;
                for (j, s) in scores[..=i].iter_mut().enumerate() {
                    *s = dot(q(i), k(j)).as_f64() * scale;
                    max = max.max(*s);
                }
                let sum: f64 = scores[..=i].iter().map(|s| (s - max).exp()).sum();
                let row_lse = max + sum.ln();
                let oi = &mut o[i * hs..][..hs];
                for (j, &s) in scores[..=i].iter().enumerate() {
                    let p = F::of((s - row_lse).exp());
                    for (od, &vd) in oi.iter_mut().zip(v(j)) {
                        *od += p * vd;
                    }
                }
                l[i] = F::of(row_lse);
            }
            (o, l)
        })
        .collect();
    lse[..b * nh * t]
        .par_chunks_mut(t.max(1))
        .zip(per_head.par_iter())
        .for_each(|(dst, (_, l))| dst.copy_from_slice(l));
    out[..b * t * c]
        .par_chunks_mut((t * c).max(1))
        .enumerate()
        .for_each(|(bb, out_b)| {
            for h in 0..nh {
                let o = &per_head[bb * nh + h].0;
                for i in 0..t {
                    out_b[i * c + h * hs..][..hs].copy_from_slice(&o[i * hs..][..hs]);
                }
            }
        });
}

/// Backward: accumulates `dq, dk, dv` into `dqkv`. With `P_ij = exp(s_ij - lse_i)` recomputed
/// from `s_ij = q_i . k_j / sqrt(hs)` and `D_i = sum_j dP_ij P_ij = dout_i . out_i`:
/// `dv_j += sum_i P_ij dout_i`, `dP_ij = dout_i . v_j`, `dS_ij = P_ij (dP_ij - D_i)`,
/// `dq_i += sum_j dS_ij k_j / sqrt(hs)`, `dk_j += sum_i dS_ij q_i / sqrt(hs)`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<F: Float>(
    dqkv: &mut [F],
    dout: &[F],
    qkv: &[F],
    out: &[F],
    lse: &[F],
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) {
    let hs = c / nh;
    let scale = 1.0 / (hs as f64).sqrt();
    let scale_f = F::of(scale);
    let c3 = 3 * c;
    // Per (b, h): [dq | dk | dv], each T*hs.
    let per_head: Vec<Vec<F>> = (0..b * nh)
        .into_par_iter()
        .map(|bh| {
            let (bb, h) = (bh / nh, bh % nh);
            let q = |i: usize| &qkv[(bb * t + i) * c3 + h * hs..][..hs];
            let k = |j: usize| &qkv[(bb * t + j) * c3 + c + h * hs..][..hs];
            let v = |j: usize| &qkv[(bb * t + j) * c3 + 2 * c + h * hs..][..hs];
            let dy = |i: usize| &dout[(bb * t + i) * c + h * hs..][..hs];
            let y = |i: usize| &out[(bb * t + i) * c + h * hs..][..hs];
            let mut g = vec![F::zero(); 3 * t * hs];
            let (dq, rest) = g.split_at_mut(t * hs);
            let (dk, dv) = rest.split_at_mut(t * hs);
            for i in 0..t {
                let row_lse = lse[bh * t + i].as_f64();
                let d_i = dot(dy(i), y(i));
                for j in 0..=i {
                    let p = F::of((dot(q(i), k(j)).as_f64() * scale - row_lse).exp());
                    for (g, &d) in dv[j * hs..][..hs].iter_mut().zip(dy(i)) {
                        *g += p * d;
                    }
                    let dp = dot(dy(i), v(j));
                    let ds = p * (dp - d_i) * scale_f;
                    for (g, &kd) in dq[i * hs..][..hs].iter_mut().zip(k(j)) {
                        *g += ds * kd;
                    }
                    for (g, &qd) in dk[j * hs..][..hs].iter_mut().zip(q(i)) {
                        *g += ds * qd;
                    }
                }
            }
            g
        })
        .collect();
    dqkv[..b * t * c3]
        .par_chunks_mut((t * c3).max(1))
        .enumerate()
        .for_each(|(bb, dqkv_b)| {
            for h in 0..nh {
                let g = &per_head[bb * nh + h];
                for (part, src) in g.chunks(t * hs).enumerate() {
                    for i in 0..t {
                        let dst = &mut dqkv_b[i * c3 + part * c + h * hs..][..hs];
                        for (d, &s) in dst.iter_mut().zip(&src[i * hs..][..hs]) {
                            *d += s;
                        }
                    }
                }
            }
        });
}
