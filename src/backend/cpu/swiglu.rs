//! SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer"), the Llama MLP's gate:
//! `out = silu(gate) * up` with `silu(x) = x sigmoid(x)`, forward and backward.
//!
//! Layout: each row of `gate_up [N, 2I]` holds `gate` (first `I` columns) then `up`, as the
//! fused `gate_up_proj` matmul writes them; `out [N, I]`.
//!
//! Napkin math: forward reads `2*N*I` and writes `N*I` numbers, one `exp` and ~4 FLOPs per
//! output; backward reads `3*N*I` and writes `2*N*I`. Memory-bound.

use rayon::prelude::*;

use super::float::Float;

/// `1 / (1 + e^-x)`; `e^-x` overflowing to infinity gives 0, as it should.
#[inline]
fn sigmoid<F: Float>(x: F) -> F {
    F::one() / (F::one() + (-x).exp())
}

/// `out[r, j] = silu(gate[r, j]) * up[r, j]` over `n` rows of `i` columns.
pub fn swiglu_forward<F: Float>(out: &mut [F], gate_up: &[F], n: usize, i: usize) {
    out[..n * i]
        .par_chunks_mut(i)
        .zip(gate_up[..2 * n * i].par_chunks(2 * i))
        .for_each(|(o, gu)| {
            let (gate, up) = gu.split_at(i);
            for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
                *o = g * sigmoid(g) * u;
            }
        });
}

/// Overwrites `dgate_up [N, 2I]`: `dgate = dout * up * silu'(gate)` with
/// `silu'(g) = s (1 + g (1 - s))`, `s = sigmoid(g)`, and `dup = dout * silu(gate)`.
pub fn swiglu_backward<F: Float>(
    dgate_up: &mut [F],
    dout: &[F],
    gate_up: &[F],
    n: usize,
    i: usize,
) {
    dgate_up[..2 * n * i]
        .par_chunks_mut(2 * i)
        .zip(gate_up[..2 * n * i].par_chunks(2 * i))
        .zip(dout[..n * i].par_chunks(i))
        .for_each(|((dgu, gu), dy)| {
            let (dgate, dup) = dgu.split_at_mut(i);
            let (gate, up) = gu.split_at(i);
            for j in 0..i {
                let (g, u, d) = (gate[j], up[j], dy[j]);
                let s = sigmoid(g);
                dgate[j] = d * u * s * (F::one() + g * (F::one() - s));
                dup[j] = d * g * s;
            }
        });
}
