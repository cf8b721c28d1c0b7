//! Rotary position embedding (Su et al. 2021, "RoFormer"), Hugging Face's rotate-half form,
//! in place on the query and key heads of a `qkv` buffer, forward and backward.
//!
//! Layout: `qkv [B, T, W]` with `W = (NH + 2 NKV) hs` as in `attention.rs`: the first
//! `NH + NKV` heads of a row (queries, then keys) are rotated, the value heads left alone. For
//! `i < hs/2` the pair `(x[i], x[i + hs/2])` turns by `a = p * inv_freq[i]`. The angle, its
//! cosine and its sine are computed in f32 whatever the float type `F` (Hugging Face computes
//! its rotary tables in float32 even for a float64 model, then casts them); the rotation itself
//! runs in `F`. The backward turns the gradient by `-a` (a rotation's transpose is its inverse).
//!
//! Napkin math: reads and writes `B*T*(NH+NKV)*hs` numbers, 6 FLOPs per pair, plus `hs/2`
//! sine/cosine pairs per position shared by its heads. Memory-bound.

use rayon::prelude::*;

use super::float::Float;

/// The position of flat row `r`: `pos[r]` when given, else `past + r % t`.
fn position(pos: Option<&[i32]>, past: usize, r: usize, t: usize) -> usize {
    match pos {
        Some(p) => p[r] as usize,
        None => past + r % t,
    }
}

/// Turns the query and key heads of every row by `sign * a` (`sign` is 1 forward, -1 backward).
#[allow(clippy::too_many_arguments)]
fn rotate<F: Float>(
    qkv: &mut [F],
    inv_freq: &[f32],
    pos: Option<&[i32]>,
    past: usize,
    b: usize,
    t: usize,
    nh: usize,
    nkv: usize,
    hs: usize,
    sign: f32,
) {
    let w = (nh + 2 * nkv) * hs;
    let half = hs / 2;
    qkv[..b * t * w]
        .par_chunks_mut(w)
        .enumerate()
        .for_each(|(r, row)| {
            let p = position(pos, past, r, t) as f32;
            let (cos, sin): (Vec<F>, Vec<F>) = inv_freq[..half]
                .iter()
                .map(|&f| {
                    let (s, c) = (p * f).sin_cos();
                    (F::of(c as f64), F::of((sign * s) as f64))
                })
                .unzip();
            for head in row[..(nh + nkv) * hs].chunks_mut(hs) {
                let (lo, hi) = head.split_at_mut(half);
                for i in 0..half {
                    let (x, y) = (lo[i], hi[i]);
                    lo[i] = x * cos[i] - y * sin[i];
                    hi[i] = y * cos[i] + x * sin[i];
                }
            }
        });
}

/// Rotates the query and key heads of `qkv` in place: position `pos[b*T+t]`, or `past + t`
/// without `pos`. `hs` even, `inv_freq [hs/2]`, positions `>= 0` (checked by the caller).
#[allow(clippy::too_many_arguments)]
pub fn rope_forward<F: Float>(
    qkv: &mut [F],
    inv_freq: &[f32],
    pos: Option<&[i32]>,
    past: usize,
    b: usize,
    t: usize,
    nh: usize,
    nkv: usize,
    hs: usize,
) {
    rotate(qkv, inv_freq, pos, past, b, t, nh, nkv, hs, 1.0);
}

/// The transpose of `rope_forward` (with `past = 0`): turns the query and key gradients of
/// `dqkv` in place by the opposite angles.
#[allow(clippy::too_many_arguments)]
pub fn rope_backward<F: Float>(
    dqkv: &mut [F],
    inv_freq: &[f32],
    pos: Option<&[i32]>,
    b: usize,
    t: usize,
    nh: usize,
    nkv: usize,
    hs: usize,
) {
    rotate(dqkv, inv_freq, pos, 0, b, t, nh, nkv, hs, -1.0);
}
