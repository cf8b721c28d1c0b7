//! Encoder: token embedding plus position embedding, forward and backward.
//!
//! Napkin math: forward reads `2*B*T*C` and writes `B*T*C` numbers, no FLOPs to speak of.

use rayon::prelude::*;

use super::float::Float;

/// `out[b,t,:] = wte[ids[b,t],:] + wpe[t,:]`. Ids must lie in `[0, V)` (checked by the caller).
pub fn encoder_forward<F: Float>(
    out: &mut [F],
    ids: &[i32],
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
        .for_each(|(pos, (row, &id))| {
            let tok = &wte[id as usize * c..][..c];
            let p = &wpe[(pos % t) * c..][..c];
            for ((o, &x), &y) in row.iter_mut().zip(tok).zip(p) {
                *o = x + y;
            }
        });
}

/// `dwte[ids[b,t],:] += dout[b,t,:]`, `dwpe[t,:] += dout[b,t,:]`.
///
/// Deterministic: each `dwte` row sums its positions in increasing position order, each `dwpe`
/// row sums over the batch in order; rows are independent, so they run in parallel.
#[allow(clippy::too_many_arguments)]
pub fn encoder_backward<F: Float>(
    dwte: &mut [F],
    dwpe: &mut [F],
    dout: &[F],
    ids: &[i32],
    b: usize,
    t: usize,
    c: usize,
) {
    let n = b * t;
    let vocab = dwte.len() / c;
    // Counting sort of positions by token id: positions of id v are order[start[v]..start[v+1]].
    let mut start = vec![0usize; vocab + 1];
    for &id in &ids[..n] {
        start[id as usize + 1] += 1;
    }
    for v in 0..vocab {
        start[v + 1] += start[v];
    }
    let mut fill = start.clone();
    let mut order = vec![0usize; n];
    for (pos, &id) in ids[..n].iter().enumerate() {
        order[fill[id as usize]] = pos;
        fill[id as usize] += 1;
    }
    dwte[..vocab * c]
        .par_chunks_mut(c)
        .enumerate()
        .filter(|(v, _)| start[*v] < start[v + 1])
        .for_each(|(v, row)| {
            for &pos in &order[start[v]..start[v + 1]] {
                for (g, &d) in row.iter_mut().zip(&dout[pos * c..][..c]) {
                    *g += d;
                }
            }
        });
    dwpe[..t * c]
        .par_chunks_mut(c)
        .enumerate()
        .for_each(|(tt, row)| {
            for bb in 0..b {
                for (g, &d) in row.iter_mut().zip(&dout[(bb * t + tt) * c..][..c]) {
                    *g += d;
                }
            }
        });
}
