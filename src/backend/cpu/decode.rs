//! Cached causal attention for generation: `Tn` new positions attend to a key/value cache.
//!
//! Layout: `qkv [B, Tn, W]` with `W = (NH + 2 NKV) hs` (`NH` query heads, then `NKV` key
//! heads, then `NKV` value heads per new position, as in `attention.rs`; query head `h` reads
//! key/value head `h / (NH / NKV)`), `k_cache`, `v_cache` `[B, Tmax, NKV hs]`, `out [B, Tn, C]`.
//! Multi-head attention is `NKV = NH` (`qkv [B, Tn, 3C]`, caches `[B, Tmax, C]`). The new
//! keys and values are copied into cache rows `past .. past+Tn` first; then new position `i`
//! (absolute position `past + i`) attends to cache rows `0 ..= past + i`, exactly the causal
//! rule of `attention_forward`. Each output row `(b, i)` is one rayon task (heads in turn
//! inside it), so the result does not depend on the thread count.
//!
//! Napkin math: a decode step (`Tn = 1`) with `L = past + 1` keys reads `2 * L * C` cached
//! numbers and does `4 * L * C` FLOPs per row: memory bound, and small next to the layer's
//! matmuls (`~24 C^2` FLOPs per row) until `L` reaches about `6 C`. Grouped KV heads read
//! `NH / NKV` times fewer cached numbers for the same FLOPs.

use rayon::prelude::*;

use super::attention::Heads;
use super::float::Float;

/// Multi-head attention: [`attention_gqa_cached_forward`] with `NKV = NH`.
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
    attention_gqa_cached_forward(out, qkv, k_cache, v_cache, b, tn, past, tmax, c, nh, nh)
}

/// `attention_gqa_forward` for `Tn` new positions over a cache holding `past` positions (see
/// the module header). Shapes are checked by the caller.
#[allow(clippy::too_many_arguments)]
pub fn attention_gqa_cached_forward<F: Float>(
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
    nkv: usize,
) {
    let heads = Heads::new(c, nh, nkv);
    let (hs, w) = (heads.hs, heads.width());
    // Width of a cache row: the key (or value) heads of one position.
    let kvw = nkv * hs;
    for bb in 0..b {
        for i in 0..tn {
            let src = &qkv[(bb * tn + i) * w..][..w];
            let dst = (bb * tmax + past + i) * kvw;
            k_cache[dst..dst + kvw].copy_from_slice(&src[heads.k(0)..][..kvw]);
            v_cache[dst..dst + kvw].copy_from_slice(&src[heads.v(0)..][..kvw]);
        }
    }
    let (k_cache, v_cache) = (&*k_cache, &*v_cache);
    let scale = F::of(1.0 / (hs as f64).sqrt());
    out[..b * tn * c]
        .par_chunks_mut(c)
        .enumerate()
        .for_each(|(row, o)| {
            let (bb, i) = (row / tn, row % tn);
            let keys = past + i + 1;
            let q_row = &qkv[row * w..][..c];
            let mut p = vec![F::zero(); keys];
            for h in 0..nh {
                let q = &q_row[heads.q(h)..][..hs];
                let g = heads.kv_of(h) * hs;
                let key = |j: usize| &k_cache[(bb * tmax + j) * kvw + g..][..hs];
                let val = |j: usize| &v_cache[(bb * tmax + j) * kvw + g..][..hs];
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
