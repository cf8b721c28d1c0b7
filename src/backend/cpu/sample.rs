//! Drawing a token from a row of logits: the sampling rule every backend follows.
//!
//! For a row `x[0..V)` (the padded tail is ignored), parameters `T` (temperature), `k`
//! (top-k) and `p` (top-p), and a host-drawn uniform `u` in `[0, 1)`:
//!
//! 1. **Ranking**: tokens ordered by logit, largest first (`f32::total_cmp`), ties broken by
//!    the smaller index. With `T = 0` or `k = 1` the answer is the first token of the ranking
//!    (greedy; `u` is unused).
//! 2. **Top-k**: keep the first `k` tokens of the ranking (`k = 0` or `k >= V` keeps all).
//! 3. **Weights**: `w_i = exp((x_i - x_max) / T)`, computed in f32, for the kept tokens.
//! 4. **Top-p**: when `p < 1`, keep the shortest prefix of the (top-k) ranking whose weight sum
//!    reaches `p` times the top-k weight sum; it always holds at least the first token.
//! 5. **Draw**: `r = u * S`, `S` the kept weight sum; walking the kept tokens in *index* order,
//!    the answer is the first one at which the running weight sum exceeds `r` (the largest kept
//!    index if rounding leaves `r` out of reach).
//!
//! The walk in index order rather than rank order lets a GPU find the answer with a prefix scan
//! and no sort; given the same logits and uniforms, backends agree except when `r` lands within
//! rounding of a boundary between two tokens (sums here are f64, on a GPU fp32).
//!
//! Cost: `O(V)` for greedy and for top-k alone with small `k` (a selection, then a sort of `k`);
//! top-p over the whole vocabulary sorts it, `O(V log V)` (about 1 ms for V = 50k).

use rayon::prelude::*;

use crate::backend::SampleParams;

/// Rank order: larger logit first, then smaller index.
fn by_rank(x: &[f32]) -> impl Fn(&usize, &usize) -> std::cmp::Ordering + '_ {
    move |&a, &b| x[b].total_cmp(&x[a]).then(a.cmp(&b))
}

/// The greedy answer: the first token of the ranking.
pub fn argmax(x: &[f32]) -> u32 {
    let rank = by_rank(x);
    (0..x.len())
        .min_by(|a, b| rank(a, b))
        .expect("a non-empty row") as u32
}

/// One row's token under the rule of the module header. `x` holds the `V` real logits.
pub fn sample_row(x: &[f32], params: &SampleParams, u: f32) -> u32 {
    if params.is_greedy() {
        return argmax(x);
    }
    let v = x.len();
    let rank = by_rank(x);
    let k = if params.top_k == 0 || params.top_k >= v {
        v
    } else {
        params.top_k
    };
    let mut order: Vec<usize> = (0..v).collect();
    if k < v {
        order.select_nth_unstable_by(k - 1, &rank);
        order.truncate(k);
    }
    let top_p = params.top_p < 1.0;
    if top_p {
        order.sort_unstable_by(&rank);
    }
    let x_max = order
        .iter()
        .map(|&i| x[i])
        .fold(f32::NEG_INFINITY, f32::max);
    let t = params.temperature;
    let w = |i: usize| ((x[i] - x_max) / t).exp();
    if top_p {
        let total: f64 = order.iter().map(|&i| w(i) as f64).sum();
        let target = params.top_p as f64 * total;
        let mut acc = 0.0f64;
        let mut len = order.len();
        for (j, &i) in order.iter().enumerate() {
            acc += w(i) as f64;
            if acc >= target {
                len = j + 1;
                break;
            }
        }
        order.truncate(len);
    }
    order.sort_unstable();
    let total: f64 = order.iter().map(|&i| w(i) as f64).sum();
    let r = u as f64 * total;
    let mut acc = 0.0f64;
    for &i in &order {
        acc += w(i) as f64;
        if acc > r {
            return i as u32;
        }
    }
    *order.last().expect("at least one kept token") as u32
}

/// `sample_row` on each of `n` rows of `logits [N*VP]`; shapes checked by the caller.
pub fn sample_tokens(
    logits: &[f32],
    n: usize,
    v: usize,
    vp: usize,
    params: &SampleParams,
    uniforms: &[f32],
) -> Vec<u32> {
    (0..n)
        .into_par_iter()
        .map(|row| sample_row(&logits[row * vp..][..v], params, uniforms[row]))
        .collect()
}
