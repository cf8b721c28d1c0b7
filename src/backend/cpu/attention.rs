//! Causal multi-head self-attention, forward and backward, flash-attention style: the forward
//! saves only the log-sum-exp of each score row, the backward recomputes the probabilities
//! from `q`, `k` and that log-sum-exp; the `T x T` matrix is never kept between the two.
//!
//! Optionally restricted to examples packed into a row: with `starts [B, T]`, query `i` of row
//! `b` attends keys `j` with `starts[b, i] <= j <= i` (`starts[b, i]` is where the example
//! holding position `i` begins); without it, keys `0 <= j <= i` (plain causal).
//!
//! Layout (grouped-query attention, Ainslie et al. 2023): `qkv [B, T, W]` with
//! `W = (NH + 2 NKV) hs` holds per position `NH` query heads, then `NKV` key heads, then `NKV`
//! value heads, each `hs` wide; query head `h` reads key/value head `h / (NH / NKV)`. With
//! `NKV = NH` this is the multi-head layout `q | k | v`, each `C` wide. `out [B, T, C]` heads
//! concatenated; `lse [B, NH, T]`. Each `(b, h)` pair (query heads) is independent and runs as
//! one rayon task; a key/value head's gradient is the sum of its group's query heads' parts,
//! added in head order. Within it the products are
//! GEMMs on the calling thread (`q k^T`, `P v`, and in backward `P^T dout`, `dout v^T`,
//! `dS k`, `dS^T q`), read straight out of `qkv` through strided views; the softmax and its
//! gradient are plain row loops over a local `T x T` buffer. The products skip the blocks of
//! [`BLOCK`] x [`BLOCK`] that lie wholly above the diagonal or wholly before every start of
//! their rows (all masked); inside the other blocks the masked entries of `P` and `dS` are zero. Results are computed into local buffers
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

/// Strided views of one query head's `q` and its key/value head's `k`, `v` inside
/// `qkv [B, T, W]`.
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

/// Where the heads sit in a `qkv` row: `NH` query heads of `hs`, then `NKV` key heads, then
/// `NKV` value heads.
#[derive(Clone, Copy)]
pub(super) struct Heads {
    pub nh: usize,
    pub nkv: usize,
    pub hs: usize,
}

impl Heads {
    pub fn new(c: usize, nh: usize, nkv: usize) -> Self {
        Heads {
            nh,
            nkv,
            hs: c / nh,
        }
    }
    /// Row width `W = (NH + 2 NKV) hs`.
    pub fn width(&self) -> usize {
        (self.nh + 2 * self.nkv) * self.hs
    }
    /// The key/value head query head `h` reads.
    pub fn kv_of(&self, h: usize) -> usize {
        h / (self.nh / self.nkv)
    }
    /// Column of query head `h`.
    pub fn q(&self, h: usize) -> usize {
        h * self.hs
    }
    /// Column of key head `g`.
    pub fn k(&self, g: usize) -> usize {
        (self.nh + g) * self.hs
    }
    /// Column of value head `g`.
    pub fn v(&self, g: usize) -> usize {
        (self.nh + self.nkv + g) * self.hs
    }
}

impl<'a, F> Head<'a, F> {
    fn new(qkv: &'a [F], bb: usize, h: usize, t: usize, heads: Heads) -> Self {
        let w = heads.width();
        let g = heads.kv_of(h);
        let at = |col: usize| &qkv[bb * t * w + col..];
        let rows = |col: usize| View::rows(at(col), w);
        let cols = |col: usize| View::cols(at(col), w);
        Head {
            q: rows(heads.q(h)),
            k: rows(heads.k(g)),
            kt: cols(heads.k(g)),
            v: rows(heads.v(g)),
            vt: cols(heads.v(g)),
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

/// Which keys each query of one row sees: `[start(i), i]`.
#[derive(Clone, Copy)]
struct Mask<'a> {
    /// `starts[i]` for the row's `T` positions, or `None` for plain causal (start 0).
    starts: Option<&'a [i32]>,
}

impl Mask<'_> {
    /// First key query `i` attends.
    fn start(&self, i: usize) -> usize {
        self.starts.map_or(0, |s| s[i] as usize)
    }

    /// First key any query in `[r0, r1)` attends.
    fn lo(&self, r0: usize, r1: usize) -> usize {
        self.starts.map_or(0, |s| {
            s[r0..r1].iter().map(|&x| x as usize).min().unwrap_or(r0)
        })
    }

    /// One past the last query (of `0..t`, at or after `c0`) that attends a key in `[c0, c1)`.
    fn hi(&self, c0: usize, c1: usize, t: usize) -> usize {
        match self.starts {
            None => t,
            Some(s) => (c0..t)
                .rev()
                .find(|&i| (s[i] as usize) < c1)
                .map_or(c0, |i| i + 1),
        }
    }
}

/// `s [T, T] (row stride T) = q k^T * scale` on the blocks that hold unmasked entries: row
/// block `[r0, r1)` needs columns `[lo, r1)` only. Other entries are left as they are.
#[allow(clippy::too_many_arguments)]
fn causal_scores<F: Float>(
    s: &mut [F],
    q: View<'_, F>,
    kt: View<'_, F>,
    mask: Mask<'_>,
    t: usize,
    hs: usize,
    scale: F,
) {
    for (r0, r1) in blocks(t) {
        let lo = mask.lo(r0, r1);
        gemm_scaled(
            r1 - r0,
            r1 - lo,
            hs,
            &mut s[r0 * t + lo..],
            t,
            false,
            q.at(r0, 0),
            kt.at(0, lo),
            scale,
            Threads::Serial,
        );
    }
}

/// `dst [T, hs] = op(a) [T, T] x [T, hs] * scale` for an `a [T, T]` (row stride T) that is
/// zero wherever the mask is, so each output row block sums over its band only:
/// - `op(a) = a`: row block `[r0, r1)` sums over `[lo, r1)`;
/// - `op(a) = a^T` (`transpose`): row block `[c0, c1)` (columns of `a`) sums over rows
///   `[c0, hi)`.
#[allow(clippy::too_many_arguments)]
fn causal_times<F: Float>(
    dst: &mut [F],
    a: &[F],
    transpose: bool,
    x: View<'_, F>,
    mask: Mask<'_>,
    t: usize,
    hs: usize,
    scale: F,
) {
    let a = if transpose {
        View::cols(a, t)
    } else {
        View::rows(a, t)
    };
    for (r0, r1) in blocks(t) {
        let (k0, k1) = if transpose {
            (r0, mask.hi(r0, r1, t))
        } else {
            (mask.lo(r0, r1), r1)
        };
        gemm_scaled(
            r1 - r0,
            hs,
            k1 - k0,
            &mut dst[r0 * hs..],
            hs,
            false,
            a.at(r0, k0),
            x.at(k0, 0),
            scale,
            Threads::Serial,
        );
    }
}

/// Multi-head attention: [`attention_gqa_forward`] with `NKV = NH` (`qkv [B, T, 3C]`).
#[allow(clippy::too_many_arguments)]
pub fn attention_forward<F: Float>(
    out: &mut [F],
    lse: &mut [F],
    qkv: &[F],
    starts: Option<&[i32]>,
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) {
    attention_gqa_forward(out, lse, qkv, starts, b, t, c, nh, nh)
}

/// Forward: `out = softmax(q k^T / sqrt(hs) + mask) v`; `lse[b,h,t]` is the log-sum-exp of the
/// scaled scores of row `t` over its keys (`starts[b,t] <= j <= t`, or `j <= t` without
/// `starts`). `starts`, when given, holds `B*T` values with `starts[b,t] <= t`
/// (the backend checks the stricter contiguous-examples rule of `shapes::attention_starts`).
/// `NKV` divides `NH` (checked by the caller).
#[allow(clippy::too_many_arguments)]
pub fn attention_gqa_forward<F: Float>(
    out: &mut [F],
    lse: &mut [F],
    qkv: &[F],
    starts: Option<&[i32]>,
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
    nkv: usize,
) {
    let heads = Heads::new(c, nh, nkv);
    let hs = heads.hs;
    let scale = F::of(1.0 / (hs as f64).sqrt());
    // Per (b, h): (out rows [T*hs], lse [T]).
    let per_head: Vec<(Vec<F>, Vec<F>)> = (0..b * nh)
        .into_par_iter()
        .map(|bh| {
            let bb = bh / nh;
            let head = Head::new(qkv, bb, bh % nh, t, heads);
            let mask = Mask {
                starts: starts.map(|s| &s[bb * t..][..t]),
            };
            // p [T, T]: scaled scores s = q k^T / sqrt(hs), then, row by row, the masked
            // softmax P_ij = exp(s_ij - lse_i) for start(i) <= j <= i and 0 elsewhere.
            let mut p = vec![F::zero(); t * t];
            causal_scores(&mut p, head.q, head.kt, mask, t, hs, scale);
            let mut l = vec![F::zero(); t];
            for (i, row) in p.chunks_mut(t).enumerate() {
                let (before, rest) = row.split_at_mut(mask.start(i));
                let (live, after) = rest.split_at_mut(i + 1 - before.len());
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
                before.fill(F::zero());
                after.fill(F::zero());
                l[i] = F::of(max.as_f64() + sum.ln());
            }
            // o [T, hs] = P v.
            let mut o = vec![F::zero(); t * hs];
            causal_times(&mut o, &p, false, head.v, mask, t, hs, F::one());
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

/// Multi-head attention: [`attention_gqa_backward`] with `NKV = NH` (`dqkv [B, T, 3C]`).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<F: Float>(
    dqkv: &mut [F],
    dout: &[F],
    qkv: &[F],
    out: &[F],
    lse: &[F],
    starts: Option<&[i32]>,
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) {
    attention_gqa_backward(dqkv, dout, qkv, out, lse, starts, b, t, c, nh, nh)
}

/// Backward: writes `dq, dk, dv` into `dqkv` (overwrites). With `P_ij = exp(s_ij - lse_i)`
/// recomputed from `s_ij = q_i . k_j / sqrt(hs)` (0 where masked) and `D_i = sum_j dP_ij P_ij
/// = dout_i . out_i`: `dv = P^T dout`, `dP = dout v^T`, `dS_ij = P_ij (dP_ij - D_i)`,
/// `dq = dS k / sqrt(hs)`, `dk = dS^T q / sqrt(hs)`, per query head; a key/value head's `dk`,
/// `dv` sum those of its group's query heads in head order. `starts` as in the forward.
#[allow(clippy::too_many_arguments)]
pub fn attention_gqa_backward<F: Float>(
    dqkv: &mut [F],
    dout: &[F],
    qkv: &[F],
    out: &[F],
    lse: &[F],
    starts: Option<&[i32]>,
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
    nkv: usize,
) {
    let heads = Heads::new(c, nh, nkv);
    let hs = heads.hs;
    let scale = F::of(1.0 / (hs as f64).sqrt());
    let w = heads.width();
    // Per (b, h): [dq | dk | dv], each T*hs.
    let per_head: Vec<Vec<F>> = (0..b * nh)
        .into_par_iter()
        .map(|bh| {
            let (bb, h) = (bh / nh, bh % nh);
            let head = Head::new(qkv, bb, h, t, heads);
            let mask = Mask {
                starts: starts.map(|s| &s[bb * t..][..t]),
            };
            let dy = View::rows(&dout[bb * t * c + h * hs..], c);
            let y = |i: usize| &out[(bb * t + i) * c + h * hs..][..hs];
            // p [T, T]: P recomputed from the scores and the saved log-sum-exp.
            let mut p = vec![F::zero(); t * t];
            causal_scores(&mut p, head.q, head.kt, mask, t, hs, scale);
            for (i, row) in p.chunks_mut(t).enumerate() {
                let row_lse = lse[bh * t + i];
                let (before, rest) = row.split_at_mut(mask.start(i));
                let (live, after) = rest.split_at_mut(i + 1 - before.len());
                for s in live.iter_mut() {
                    *s = (*s - row_lse).exp();
                }
                before.fill(F::zero());
                after.fill(F::zero());
            }
            // ds [T, T]: dP = dout v^T, then dS_ij = P_ij (dP_ij - D_i) in place.
            let mut ds = vec![F::zero(); t * t];
            causal_scores(&mut ds, dy, head.vt, mask, t, hs, F::one());
            for (i, (ds_row, p_row)) in ds.chunks_mut(t).zip(p.chunks(t)).enumerate() {
                let d_i = dot(&dout[(bb * t + i) * c + h * hs..][..hs], y(i));
                let (before, rest) = ds_row.split_at_mut(mask.start(i));
                let (live, after) = rest.split_at_mut(i + 1 - before.len());
                for (d, &pij) in live.iter_mut().zip(&p_row[mask.start(i)..]) {
                    *d = pij * (*d - d_i);
                }
                before.fill(F::zero());
                after.fill(F::zero());
            }
            let mut g = vec![F::zero(); 3 * t * hs];
            let (dq, rest) = g.split_at_mut(t * hs);
            let (dk, dv) = rest.split_at_mut(t * hs);
            // dv = P^T dout, dq = dS k / sqrt(hs), dk = dS^T q / sqrt(hs).
            causal_times(dv, &p, true, dy, mask, t, hs, F::one());
            causal_times(dq, &ds, false, head.k, mask, t, hs, scale);
            causal_times(dk, &ds, true, head.q, mask, t, hs, scale);
            g
        })
        .collect();
    // Query heads copy their dq; the first query head of a group copies its dk, dv into the
    // key/value head's columns and the others add theirs, in head order.
    dqkv[..b * t * w]
        .par_chunks_mut((t * w).max(1))
        .enumerate()
        .for_each(|(bb, dqkv_b)| {
            for h in 0..nh {
                let g = &per_head[bb * nh + h];
                let kv = heads.kv_of(h);
                let first = h == 0 || heads.kv_of(h - 1) != kv;
                let cols = [heads.q(h), heads.k(kv), heads.v(kv)];
                for (part, src) in g.chunks(t * hs).enumerate() {
                    for i in 0..t {
                        let dst = &mut dqkv_b[i * w + cols[part]..][..hs];
                        let src = &src[i * hs..][..hs];
                        if part == 0 || first {
                            dst.copy_from_slice(src);
                        } else {
                            for (d, &s) in dst.iter_mut().zip(src) {
                                *d += s;
                            }
                        }
                    }
                }
            }
        });
}

#[cfg(test)]
#[path = "attention_tests.rs"]
mod tests;
