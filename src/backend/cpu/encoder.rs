//! Encoder: token embedding plus position embedding, forward and backward.
//!
//! The position of flat index `i = b*T + t` is `t` by default, or `pos[i]` when the caller
//! passes explicit positions (packed rows restart positions at each example).
//!
//! Napkin math: forward reads `2*B*T*C` and writes `B*T*C` numbers, no FLOPs to speak of.

use rayon::prelude::*;

use super::float::Float;

/// The wpe row of flat position `i`: `pos[i]` when given, else `i % t`.
fn position(pos: Option<&[i32]>, i: usize, t: usize) -> usize {
    match pos {
        Some(p) => p[i] as usize,
        None => i % t,
    }
}

/// `out[b,t,:] = wte[ids[b,t],:] + wpe[p,:]` with `p = pos[b,t]` or `t`. Ids must lie in
/// `[0, V)` and positions in `[0, Tmax)` (checked by the caller).
#[allow(clippy::too_many_arguments)]
pub fn encoder_forward<F: Float>(
    out: &mut [F],
    ids: &[i32],
    pos: Option<&[i32]>,
    wte: &[F],
    wpe: &[F],
    b: usize,
    t: usize,
    c: usize,
) {
    out[..b * t * c]
        .par_chunks_mut(c)
        .zip(ids[..b * t].par_iter())
        .enumerate()
        .for_each(|(i, (row, &id))| {
            let tok = &wte[id as usize * c..][..c];
            let p = &wpe[position(pos, i, t) * c..][..c];
            for ((o, &x), &y) in row.iter_mut().zip(tok).zip(p) {
                *o = x + y;
            }
        });
}

/// `table[keys[i],:] += dout[i,:]` for every flat position `i < keys.len()`.
///
/// Deterministic: each table row sums its positions in increasing position order (a counting
/// sort groups them first); rows are independent, so they run in parallel.
pub(super) fn scatter_add_rows<F: Float>(table: &mut [F], dout: &[F], keys: &[usize], c: usize) {
    let rows = table.len() / c;
    // Positions with key k are order[start[k]..start[k+1]].
    let mut start = vec![0usize; rows + 1];
    for &k in keys {
        start[k + 1] += 1;
    }
    for k in 0..rows {
        start[k + 1] += start[k];
    }
    let mut fill = start.clone();
    let mut order = vec![0usize; keys.len()];
    for (i, &k) in keys.iter().enumerate() {
        order[fill[k]] = i;
        fill[k] += 1;
    }
    table[..rows * c]
        .par_chunks_mut(c)
        .enumerate()
        .filter(|(k, _)| start[*k] < start[k + 1])
        .for_each(|(k, row)| {
            for &i in &order[start[k]..start[k + 1]] {
                for (g, &d) in row.iter_mut().zip(&dout[i * c..][..c]) {
                    *g += d;
                }
            }
        });
}

/// `dwte[ids[b,t],:] += dout[b,t,:]`, `dwpe[p,:] += dout[b,t,:]` with `p = pos[b,t]` or `t`.
///
/// Deterministic: every gradient row sums its contributions in increasing flat position order.
#[allow(clippy::too_many_arguments)]
pub fn encoder_backward<F: Float>(
    dwte: &mut [F],
    dwpe: &mut [F],
    dout: &[F],
    ids: &[i32],
    pos: Option<&[i32]>,
    b: usize,
    t: usize,
    c: usize,
) {
    let n = b * t;
    let tokens: Vec<usize> = ids[..n].iter().map(|&id| id as usize).collect();
    scatter_add_rows(dwte, dout, &tokens, c);
    let positions: Vec<usize> = (0..n).map(|i| position(pos, i, t)).collect();
    scatter_add_rows(dwpe, dout, &positions, c);
}
