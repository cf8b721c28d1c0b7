//! Cached causal attention for generation: `Tn` new positions attend to a key/value cache.
//!
//! Layout: `qkv [B, Tn, 3C]` (`q | k | v` per new position, head `h` owning columns
//! `h*hs .. (h+1)*hs` of each), `k_cache`, `v_cache` `[B, Tmax, C]`, `out [B, Tn, C]`. The new
//! keys and values are copied into cache rows `past .. past+Tn` first; then new position `i`
//! (absolute position `past + i`) attends to cache rows `0 ..= past + i`, exactly the causal
//! rule of `attention_forward`. Each output row `(b, i)` is one rayon task (heads in turn
//! inside it), so the result does not depend on the thread count.
//!
//! Napkin math: a decode step (`Tn = 1`) with `L = past + 1` keys reads `2 * L * C` cached
//! numbers and does `4 * L * C` FLOPs per row: memory bound, and small next to the layer's
//! matmuls (`~24 C^2` FLOPs per row) until `L` reaches about `6 C`.

use rayon::prelude::*;

use super::float::Float;

/// `attention_forward` for `Tn` new positions over a cache holding `past` positions (see the
/// module header). Shapes are checked by the caller.
#[allow(clippy::too_many_arguments)]
pub fn attention_cached_forward<F: Float>(
    out: &mut [F],
    qkv: &[F],
    k_cache: &mut [F],
    v_cache: &mut [F],
    b: usize,
    tn: usize,
    past: usize,
    tmax: usize,
    c: usize,
    nh: usize,
) {
    let c3 = 3 * c;
    for bb in 0..b {
        for i in 0..tn {
            let src = &qkv[(bb * tn + i) * c3..][..c3];
            let dst = (bb * tmax + past + i) * c;
            k_cache[dst..dst + c].copy_from_slice(&src[c..2 * c]);
            v_cache[dst..dst + c].copy_from_slice(&src[2 * c..]);
        }
    }
    let (k_cache, v_cache) = (&*k_cache, &*v_cache);
    let hs = c / nh;
    let scale = F::of(1.0 / (hs as f64).sqrt());
    out[..b * tn * c]
        .par_chunks_mut(c)
        .enumerate()
        .for_each(|(row, o)| {
            let (bb, i) = (row / tn, row % tn);
            let keys = past + i + 1;
            let q_row = &qkv[row * c3..][..c];
            let mut p = vec![F::zero(); keys];
            for h in 0..nh {
                let q = &q_row[h * hs..][..hs];
                let key = |j: usize| &k_cache[(bb * tmax + j) * c + h * hs..][..hs];
                let val = |j: usize| &v_cache[(bb * tmax + j) * c + h * hs..][..hs];
                for (j, s) in p.iter_mut().enumerate() {
                    *s = key(j)
                        .iter()
                        .zip(q)
                        .fold(F::zero(), |acc, (&x, &y)| acc + x * y)
                        * scale;
                }
                let max = p.iter().fold(F::neg_infinity(), |m, &s| m.max(s));
                let mut sum = 0.0f64;
                for s in p.iter_mut() {
                    *s = (*s - max).exp();
                    sum += s.as_f64();
                }
                let inv_sum = F::of(1.0 / sum);
                let oh = &mut o[h * hs..][..hs];
                oh.fill(F::zero());
                for (j, &pj) in p.iter().enumerate() {
                    let w = pj * inv_sum;
                    for (od, &vd) in oh.iter_mut().zip(val(j)) {
                        *od += w * vd;
                    }
                }
            }
        });
}
