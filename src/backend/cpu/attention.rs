//! Causal multi-head self-attention, forward and backward, flash-attention style: the forward
//! saves only the log-sum-exp of each score row, the backward recomputes the probabilities
//! from `q`, `k` and that log-sum-exp; the `T x T` matrix is never kept between the two.
//!
//! Layout: `qkv [B, T, 3C]` holds `q | k | v` per position, head `h` owning columns
//! `h*hs .. (h+1)*hs` of each; `out [B, T, C]` heads concatenated; `lse [B, NH, T]`.
//! Each `(b, h)` pair is independent and runs as one rayon task. Within it the products are
//! GEMMs on the calling thread (`q k^T`, `P v`, and in backward `P^T dout`, `dout v^T`,
//! `dS k`, `dS^T q`), read straight out of `qkv` through strided views; the softmax and its
//! gradient are plain row loops over a local `T x T` buffer. The products skip the blocks of
//! [`BLOCK`] x [`BLOCK`] that lie wholly above the diagonal (all masked); inside the diagonal
//! blocks the masked entries of `P` and `dS` are zero. Results are computed into local buffers
//! and then copied (forward) or added (backward) into place, so the result does not depend on
//! the thread count.
//!
//! Napkin math: a product over the full square is `2 * T * T * hs` FLOPs per `(b, h)`; the
//! block-causal ones do `(1 + T/BLOCK) / (2 T/BLOCK)` of that (5/8 at T = 256). Forward runs
//! 2 products, backward 5 (the scores are recomputed).

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

/// Rows (or columns) per block of the block-causal products.
pub const BLOCK: usize = 64;

/// The blocks `[r0, r1)` of `0..t`, `BLOCK` long (the last may be shorter).
fn blocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t)
        .step_by(BLOCK)
        .map(move |r0| (r0, (r0 + BLOCK).min(t)))
}

/// `s [T, T] (row stride T) = q k^T * scale` on the blocks at or below the diagonal: row
/// block `[r0, r1)` needs columns `[0, r1)` only. Entries right of `r1` are left as they are.
fn causal_scores<F: Float>(
    s: &mut [F],
    q: View<'_, F>,
    kt: View<'_, F>,
    t: usize,
    hs: usize,
    scale: F,
) {
    for (r0, r1) in blocks(t) {
        gemm_scaled(
            r1 - r0,
            r1,
            hs,
            &mut s[r0 * t..],
            t,
            false,
            q.at(r0, 0),
            kt,
            scale,
            Threads::Serial,
        );
    }
}

/// `dst [T, hs] = a [T, T] x [T, hs] * scale` for a lower-triangular `a` (zero above the
/// diagonal, row stride T): row block `[r0, r1)` sums over `[0, r1)` only.
fn causal_times<F: Float>(dst: &mut [F], a: &[F], x: View<'_, F>, t: usize, hs: usize, scale: F) {
    let a = View {
        data: a,
        rs: t,
        cs: 1,
    };
    for (r0, r1) in blocks(t) {
        gemm_scaled(
            r1 - r0,
            hs,
            r1,
            &mut dst[r0 * hs..],
            hs,
            false,
            a.at(r0, 0),
            x,
            scale,
            Threads::Serial,
        );
    }
}

/// `dst [T, hs] = a^T [T, T] x [T, hs] * scale` for a lower-triangular `a` (row stride T):
/// output row block `[c0, c1)` (columns of `a`) sums over rows `[c0, T)` only.
fn causal_transposed_times<F: Float>(
    dst: &mut [F],
    a: &[F],
    x: View<'_, F>,
    t: usize,
    hs: usize,
    scale: F,
) {
    let at = View {
        data: a,
        rs: 1,
        cs: t,
    };
    for (c0, c1) in blocks(t) {
        gemm_scaled(
            c1 - c0,
            hs,
            t - c0,
            &mut dst[c0 * hs..],
            hs,
            false,
            at.at(c0, c0),
            x.at(c0, 0),
            scale,
            Threads::Serial,
        );
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
            causal_scores(&mut p, head.q, head.kt, t, hs, scale);
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
            causal_times(&mut o, &p, head.v, t, hs, F::one());
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
            causal_scores(&mut p, head.q, head.kt, t, hs, scale);
            for (i, row) in p.chunks_mut(t).enumerate() {
                let row_lse = lse[bh * t + i];
                let (live, masked) = row.split_at_mut(i + 1);
                for s in live.iter_mut() {
                    *s = (*s - row_lse).exp();
                }
                masked.fill(F::zero());
            }
            // ds [T, T]: dP = dout v^T, then dS_ij = P_ij (dP_ij - D_i) in place.
            let mut ds = vec![F::zero(); t * t];
            causal_scores(&mut ds, dy, head.vt, t, hs, F::one());
            for (i, (ds_row, p_row)) in ds.chunks_mut(t).zip(p.chunks(t)).enumerate() {
                let d_i = dot(&dout[(bb * t + i) * c + h * hs..][..hs], y(i));
                let (live, masked) = ds_row.split_at_mut(i + 1);
                for (d, &pij) in live.iter_mut().zip(p_row) {
                    *d = pij * (*d - d_i);
                }
                masked.fill(F::zero());
            }
            let mut g = vec![F::zero(); 3 * t * hs];
            let (dq, rest) = g.split_at_mut(t * hs);
            let (dk, dv) = rest.split_at_mut(t * hs);
            // dv = P^T dout, dq = dS k / sqrt(hs), dk = dS^T q / sqrt(hs).
            causal_transposed_times(dv, &p, dy, t, hs, F::one());
            causal_times(dq, &ds, head.k, t, hs, scale);
            causal_transposed_times(dk, &ds, head.q, t, hs, scale);
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

#[cfg(test)]
mod tests {
    //! The block-causal products against plain loops over every `(i, j)`, in f64, at a `T`
    //! spanning several blocks with a short last one (the integration tests use a short `T`).

    use super::*;

    const B: usize = 2;
    const T: usize = 2 * BLOCK + 13;
    const C: usize = 12;
    const NH: usize = 3;

    /// Deterministic pseudo-random values in [-1, 1).
    fn values(len: usize, seed: u64) -> Vec<f64> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 11) as f64 / (1u64 << 52) as f64 - 1.0
            })
            .collect()
    }

    /// Row-by-row reference: (out, lse, dqkv) from the formulas in the doc comments.
    fn naive(qkv: &[f64], dout: &[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let hs = C / NH;
        let scale = 1.0 / (hs as f64).sqrt();
        let at =
            |bb: usize, i: usize, part: usize, h: usize| (bb * T + i) * 3 * C + part * C + h * hs;
        let (mut out, mut lse, mut dqkv) = (
            vec![0.0; B * T * C],
            vec![0.0; B * NH * T],
            vec![0.0; B * T * 3 * C],
        );
        for bb in 0..B {
            for h in 0..NH {
                let s = |i: usize, j: usize| {
                    (0..hs)
                        .map(|d| qkv[at(bb, i, 0, h) + d] * qkv[at(bb, j, 1, h) + d])
                        .sum::<f64>()
                        * scale
                };
                let mut p = vec![vec![0.0; T]; T];
                for i in 0..T {
                    let max = (0..=i).map(|j| s(i, j)).fold(f64::NEG_INFINITY, f64::max);
                    let l = max + (0..=i).map(|j| (s(i, j) - max).exp()).sum::<f64>().ln();
                    lse[(bb * NH + h) * T + i] = l;
                    for j in 0..=i {
                        p[i][j] = (s(i, j) - l).exp();
                        for d in 0..hs {
                            out[(bb * T + i) * C + h * hs + d] +=
                                p[i][j] * qkv[at(bb, j, 2, h) + d];
                        }
                    }
                }
                for i in 0..T {
                    let dy = |d: usize| dout[(bb * T + i) * C + h * hs + d];
                    let d_i: f64 = (0..hs)
                        .map(|d| dy(d) * out[(bb * T + i) * C + h * hs + d])
                        .sum();
                    for j in 0..=i {
                        let dp: f64 = (0..hs).map(|d| dy(d) * qkv[at(bb, j, 2, h) + d]).sum();
                        let ds = p[i][j] * (dp - d_i) * scale;
                        for d in 0..hs {
                            dqkv[at(bb, j, 2, h) + d] += p[i][j] * dy(d);
                            dqkv[at(bb, i, 0, h) + d] += ds * qkv[at(bb, j, 1, h) + d];
                            dqkv[at(bb, j, 1, h) + d] += ds * qkv[at(bb, i, 0, h) + d];
                        }
                    }
                }
            }
        }
        (out, lse, dqkv)
    }

    fn assert_close(what: &str, got: &[f64], want: &[f64]) {
        let err = got
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f64>()
            .sqrt();
        let norm = want.iter().map(|b| b * b).sum::<f64>().sqrt();
        assert!(
            err <= 1e-12 * norm,
            "{what}: relative error {:.3e}",
            err / norm
        );
    }

    #[test]
    fn block_causal_attention_matches_row_loops_across_blocks() {
        let qkv = values(B * T * 3 * C, 1);
        let dout = values(B * T * C, 2);
        let (want_out, want_lse, want_dqkv) = naive(&qkv, &dout);
        let (mut out, mut lse) = (vec![f64::NAN; B * T * C], vec![f64::NAN; B * NH * T]);
        attention_forward(&mut out, &mut lse, &qkv, B, T, C, NH);
        assert_close("out", &out, &want_out);
        assert_close("lse", &lse, &want_lse);
        let mut dqkv = vec![0.0; B * T * 3 * C];
        attention_backward(&mut dqkv, &dout, &qkv, &out, &lse, B, T, C, NH);
        assert_close("dqkv", &dqkv, &want_dqkv);
    }
}
