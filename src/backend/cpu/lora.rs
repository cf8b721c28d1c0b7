//! The ops LoRA adds (model/lora.rs): adding an adapter's output into a column slice of a
//! projection's output, copying a slice's gradient out, and PEFT's dropout on the adapter's
//! input with a mask recomputed from a seed instead of stored.
//!
//! Layout: `y [N, OC]` row-major; the slice is columns `col .. col + W` of each row, and
//! `x`, `out` are `[N, W]` (dense).
//!
//! Dropout's mask is a counter-based hash, so any backend computes it alone, in any order:
//! with `key = splitmix64(seed)`, element `i` is kept iff `u >= p`, where
//! `u = (splitmix64(key ^ i) >> 32) as f32 * 2^-32` (the top 32 bits rounded to f32, which
//! IEEE round-to-nearest-even does the same everywhere, then scaled exactly). Hashing the seed
//! first matters: `seed ^ i` alone would make seeds that differ in their low bits permute one
//! mask. Kept elements are scaled by `scale = 1 / (1 - p)`, computed once in f32.
//!
//! Napkin math (memory bound, no matrix products): `add_columns` reads `2 N W` numbers and
//! writes `N W`; `copy_columns` reads and writes `N W`; dropout reads and writes `n`.

use rayon::prelude::*;

use super::float::Float;

/// `y[r, col + j] += alpha * x[r, j]` for `r < n`, `j < w`.
pub fn add_columns<F: Float>(
    y: &mut [F],
    x: &[F],
    n: usize,
    oc: usize,
    col: usize,
    w: usize,
    alpha: F,
) {
    if w == 0 {
        return;
    }
    y[..n * oc]
        .par_chunks_mut(oc)
        .zip(x[..n * w].par_chunks(w))
        .for_each(|(yr, xr)| {
            for (o, &v) in yr[col..col + w].iter_mut().zip(xr) {
                *o += alpha * v;
            }
        });
}

/// `out[r, j] = alpha * y[r, col + j]` for `r < n`, `j < w` (overwrites).
pub fn copy_columns<F: Float>(
    out: &mut [F],
    y: &[F],
    n: usize,
    oc: usize,
    col: usize,
    w: usize,
    alpha: F,
) {
    if w == 0 {
        return;
    }
    out[..n * w]
        .par_chunks_mut(w)
        .zip(y[..n * oc].par_chunks(oc))
        .for_each(|(o, yr)| {
            for (o, &v) in o.iter_mut().zip(&yr[col..col + w]) {
                *o = alpha * v;
            }
        });
}

/// splitmix64's output function of `x` (Steele, Lea & Flood 2014): a bijective mix whose
/// every output bit depends on every input bit.
#[inline]
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The per-call key of dropout's hash: `splitmix64(seed)`.
pub fn dropout_key(seed: u64) -> u64 {
    splitmix64(seed)
}

/// Whether dropout keeps element `i` under `key` ([`dropout_key`]) at rate `p`.
#[inline]
pub fn dropout_keep(key: u64, i: u64, p: f32) -> bool {
    let u = (splitmix64(key ^ i) >> 32) as u32;
    (u as f32) * (1.0 / 4_294_967_296.0) >= p
}

/// `out[i] = keep(i) ? inp[i] * scale : 0` over `n` elements (overwrites).
pub fn dropout_forward<F: Float>(out: &mut [F], inp: &[F], n: usize, p: f32, scale: F, seed: u64) {
    let key = dropout_key(seed);
    out[..n]
        .par_iter_mut()
        .zip(&inp[..n])
        .enumerate()
        .for_each(|(i, (o, &x))| {
            *o = if dropout_keep(key, i as u64, p) {
                x * scale
            } else {
                F::zero()
            };
        });
}

/// The dropout scale `1 / (1 - p)` in f32, as every backend uses it.
pub fn dropout_scale(p: f32) -> f32 {
    1.0 / (1.0 - p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_add_and_copy_touch_their_slice_only() {
        let (n, oc, col, w) = (3, 5, 1, 2);
        let mut y: Vec<f64> = (0..n * oc).map(|i| i as f64).collect();
        let x: Vec<f64> = (0..n * w).map(|i| 100.0 + i as f64).collect();
        add_columns(&mut y, &x, n, oc, col, w, 0.5);
        for r in 0..n {
            for j in 0..oc {
                let base = (r * oc + j) as f64;
                let want = if (col..col + w).contains(&j) {
                    base + 0.5 * x[r * w + j - col]
                } else {
                    base
                };
                assert_eq!(y[r * oc + j], want, "({r}, {j})");
            }
        }
        let mut out = vec![f64::NAN; n * w];
        copy_columns(&mut out, &y, n, oc, col, w, 2.0);
        for r in 0..n {
            for j in 0..w {
                assert_eq!(out[r * w + j], 2.0 * y[r * oc + col + j]);
            }
        }
    }

    #[test]
    fn dropout_keeps_about_one_minus_p_and_zero_keeps_all() {
        let n = 100_000;
        let mask = |seed| (0..n).map(move |i| dropout_keep(dropout_key(seed), i, 0.25));
        let kept = mask(7).filter(|&k| k).count();
        let frac = kept as f64 / n as f64;
        assert!((frac - 0.75).abs() < 0.01, "kept {frac}");
        assert!((0..1000).all(|i| dropout_keep(dropout_key(9), i, 0.0)));
        // Seeds 7 and 8 differ in their low bits only: the masks must still be unrelated
        // (agreeing where two independent draws would, 0.75^2 + 0.25^2 = 62.5%).
        let agree = mask(7).zip(mask(8)).filter(|(a, b)| a == b).count();
        let frac = agree as f64 / n as f64;
        assert!(
            (frac - 0.625).abs() < 0.01,
            "masks of seeds 7 and 8 agree at {frac}"
        );
        // splitmix64's published first output for state 0 (seed 0 + golden gamma).
        assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
    }
}
