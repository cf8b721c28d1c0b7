//! Causal multi-head self-attention, forward and backward, flash-attention style: the forward
//! saves only the log-sum-exp of each score row, the backward recomputes the probabilities
//! from `q`, `k` and that log-sum-exp; the `T x T` matrix is never stored.
//!
//! Layout: `qkv [B, T, 3C]` holds `q | k | v` per position, head `h` owning columns
//! `h*hs .. (h+1)*hs` of each; `out [B, T, C]` heads concatenated; `lse [B, NH, T]`.
//! Each `(b, h)` pair is independent and runs as one rayon task. Within it the products are
//! whole-matrix GEMMs on the calling thread (`q k^T`, `P v`, and in backward `P^T dout`,
//! `dout v^T`, `dS k`, `dS^T q`), read straight out of `qkv` through strided views; the softmax
//! and its gradient are plain row loops over the `T x T` block. Results are computed into
//! local buffers and then copied (forward) or added (backward) into place, so the result does
//! not depend on the thread count.
//!
//! Napkin math: each product is `2 * T * T * hs` FLOPs per `(b, h)` (the GEMMs compute the
//! full square; the causal mask zeroes the upper triangle of `P`): forward 2 products,
//! backward 5 (the scores are recomputed), so `2 * B * NH * T^2 * hs * 7` FLOPs per layer for
//! forward + backward.

use rayon::prelude::*;

use super::float::Float;
use super::matmul::{gemm_scaled, Threads, View};

fn dot<F: Float>(a: &[F], b: &[F]) -> F {
    a.iter().zip(b).fold(F::zero(), |s, (&x, &y)| s + x * y)
}

/// Strided views of one `(b, h)` pair's `q`, `k`, `v` inside `qkv [B, T, 3C]`.
struct Head<'a, F> {
    /// `q [T, hs]`.
    q: View<'a, F>,
    /// `k [T, hs]`.
    k: View<'a, F>,
    /// `k^T [hs, T]`.
    kt: View<'a, F>,
    /// `v [T, hs]`.
    v: View<'a, F>,
    /// `v^T [hs, T]`.
    vt: View<'a, F>,
}

impl<'a, F> Head<'a, F> {
    fn new(qkv: &'a [F], bb: usize, h: usize, t: usize, c: usize, hs: usize) -> Self {
        let c3 = 3 * c;
        let at = |part: usize| &qkv[bb * t * c3 + part * c + h * hs..];
        let rows = |part: usize| View {
            data: at(part),
            rs: c3,
            cs: 1,
        };
        let cols = |part: usize| View {
            data: at(part),
            rs: 1,
            cs: c3,
        };
        Head {
            q: rows(0),
            k: rows(1),
            kt: cols(1),
            v: rows(2),
            vt: cols(2),
        }
    }
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
    let scale = F::of(1.0 / (hs as f64).sqrt());
    // Per (b, h): (out rows [T*hs], lse [T]).
    let per_head: Vec<(Vec<F>, Vec<F>)> = (0..b * nh)
        .into_par_iter()
        .map(|bh| {
            let head = Head::new(qkv, bh / nh, bh % nh, t, c, hs);
            // p [T, T]: scaled scores s = q k^T / sqrt(hs), then, row by row, the causal
            // softmax P_ij = exp(s_ij - lse_i) for j <= i and 0 above the diagonal.
            let mut p = vec![F::zero(); t * t];
            gemm_scaled(
                t,
                t,
                hs,
                &mut p,
                false,
                head.q,
                head.kt,
                scale,
                Threads::Serial,
            );
            let mut l = vec![F::zero(); t];
            for (i, row) in p.chunks_mut(t).enumerate() {
                let (live, masked) = row.split_at_mut(i + 1);
                let max = live.iter().fold(F::neg_infinity(), |m, &s| m.max(s));
                let mut sum = 0.0f64;
                for s in live.iter_mut() {
                    *s = (*s - max).exp();
                    sum += s.as_f64();
                }
                let inv_sum = F::of(1.0 / sum);
                for s in live.iter_mut() {
                    *s *= inv_sum;
                }
                masked.fill(F::zero());
                l[i] = F::of(max.as_f64() + sum.ln());
            }
            // o [T, hs] = P v.
            let mut o = vec![F::zero(); t * hs];
            let pv = View {
                data: &p[..],
                rs: t,
                cs: 1,
            };
            gemm_scaled(
                t,
                hs,
                t,
                &mut o,
                false,
                pv,
                head.v,
                F::one(),
                Threads::Serial,
            );
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
/// from `s_ij = q_i . k_j / sqrt(hs)` (0 for `j > i`) and `D_i = sum_j dP_ij P_ij =
/// dout_i . out_i`: `dv = P^T dout`, `dP = dout v^T`, `dS_ij = P_ij (dP_ij - D_i)`,
/// `dq = dS k / sqrt(hs)`, `dk = dS^T q / sqrt(hs)`.
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
    let scale = F::of(1.0 / (hs as f64).sqrt());
    let c3 = 3 * c;
    // Per (b, h): [dq | dk | dv], each T*hs.
    let per_head: Vec<Vec<F>> = (0..b * nh)
        .into_par_iter()
        .map(|bh| {
            let (bb, h) = (bh / nh, bh % nh);
            let head = Head::new(qkv, bb, h, t, c, hs);
            let dy = View {
                data: &dout[bb * t * c + h * hs..],
                rs: c,
                cs: 1,
            };
            let y = |i: usize| &out[(bb * t + i) * c + h * hs..][..hs];
            // p [T, T]: P recomputed from the scores and the saved log-sum-exp.
            let mut p = vec![F::zero(); t * t];
            gemm_scaled(
                t,
                t,
                hs,
                &mut p,
                false,
                head.q,
                head.kt,
                scale,
                Threads::Serial,
            );
            for (i, row) in p.chunks_mut(t).enumerate() {
                let row_lse = lse[bh * t + i];
                let (live, masked) = row.split_at_mut(i + 1);
                for s in live.iter_mut() {
                    *s = (*s - row_lse).exp();
                }
                masked.fill(F::zero());
            }
            let mut g = vec![F::zero(); 3 * t * hs];
            let (dq, rest) = g.split_at_mut(t * hs);
            let (dk, dv) = rest.split_at_mut(t * hs);
            // dv [T, hs] = P^T dout.
            let pt = View {
                data: &p[..],
                rs: 1,
                cs: t,
            };
            gemm_scaled(t, hs, t, dv, false, pt, dy, F::one(), Threads::Serial);
            // ds [T, T]: dP = dout v^T, then dS_ij = P_ij (dP_ij - D_i) in place.
            let mut ds = vec![F::zero(); t * t];
            gemm_scaled(
                t,
                t,
                hs,
                &mut ds,
                false,
                dy,
                head.vt,
                F::one(),
                Threads::Serial,
            );
            for (i, (ds_row, p_row)) in ds.chunks_mut(t).zip(p.chunks(t)).enumerate() {
                let d_i = dot(&dout[(bb * t + i) * c + h * hs..][..hs], y(i));
                let (live, masked) = ds_row.split_at_mut(i + 1);
                for (d, &pij) in live.iter_mut().zip(p_row) {
                    *d = pij * (*d - d_i);
                }
                masked.fill(F::zero());
            }
            // dq = dS k / sqrt(hs), dk = dS^T q / sqrt(hs).
            let dsv = View {
                data: &ds[..],
                rs: t,
                cs: 1,
            };
            let dst = View {
                data: &ds[..],
                rs: 1,
                cs: t,
            };
            gemm_scaled(t, hs, t, dq, false, dsv, head.k, scale, Threads::Serial);
            gemm_scaled(t, hs, t, dk, false, dst, head.q, scale, Threads::Serial);
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
