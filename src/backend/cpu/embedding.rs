//! Token embedding alone (the Llama family has no position embedding), forward and backward.
//!
//! Napkin math: forward reads and writes `B*T*C` numbers; backward adds `B*T*C` numbers into
//! the table's rows. No FLOPs to speak of.

use rayon::prelude::*;

use super::encoder::scatter_add_rows;
use super::float::Float;

/// `out[b,t,:] = wte[ids[b,t],:]`. Ids must lie in `[0, V)` (checked by the caller).
pub fn embedding_forward<F: Float>(
    out: &mut [F],
    ids: &[i32],
    wte: &[F],
    b: usize,
    t: usize,
    c: usize,
) {
    out[..b * t * c]
        .par_chunks_mut(c)
        .zip(ids[..b * t].par_iter())
        .for_each(|(row, &id)| row.copy_from_slice(&wte[id as usize * c..][..c]));
}

/// `dwte[ids[b,t],:] += dout[b,t,:]`; every row sums its positions in increasing flat position
/// order (deterministic).
pub fn embedding_backward<F: Float>(
    dwte: &mut [F],
    dout: &[F],
    ids: &[i32],
    b: usize,
    t: usize,
    c: usize,
) {
    let tokens: Vec<usize> = ids[..b * t].iter().map(|&id| id as usize).collect();
    scatter_add_rows(dwte, dout, &tokens, c);
}
