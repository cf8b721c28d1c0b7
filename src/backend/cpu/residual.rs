//! The residual add, `out = a + b`.
//!
//! Napkin math: streams two inputs and one output once, one FLOP per element; memory-bound.

use rayon::prelude::*;

use super::float::Float;

/// `out = a + b` over `n` elements.
pub fn residual_forward<F: Float>(out: &mut [F], a: &[F], b: &[F], n: usize) {
    out[..n]
        .par_iter_mut()
        .zip(a[..n].par_iter().zip(b[..n].par_iter()))
        .for_each(|(o, (&x, &y))| *o = x + y);
}
