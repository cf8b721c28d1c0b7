//! The float type the CPU kernels are generic over, and the deterministic reduction helpers
//! they share.
//!
//! Every kernel family is written once against [`Float`]: the backend runs the `f32`
//! instantiation, the finite-difference tests the `f64` one. Reductions that cross rows are
//! split into fixed-size blocks (independent of the rayon thread count) whose partial sums are
//! added in block order, so results are bit-identical however many threads run them.

use std::fmt::Debug;
use std::iter::Sum;
use std::ops::{AddAssign, DivAssign, MulAssign, SubAssign};

use rayon::prelude::*;

/// A real number type the CPU kernels run in (`f32` for the backend, `f64` for tests).
pub trait Float:
    num_traits::Float
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
    + Sum
    + Debug
    + Default
    + Send
    + Sync
    + 'static
{
    /// Converts from f64 (rounding to nearest for f32).
    fn of(x: f64) -> Self;
    /// Widens to f64 (exact).
    fn as_f64(self) -> f64;
}

impl Float for f32 {
    #[inline]
    fn of(x: f64) -> Self {
        x as f32
    }
    #[inline]
    fn as_f64(self) -> f64 {
        self as f64
    }
}

impl Float for f64 {
    #[inline]
    fn of(x: f64) -> Self {
        x
    }
    #[inline]
    fn as_f64(self) -> f64 {
        self
    }
}

/// Rows per block in the blocked cross-row reductions (fixed, so results do not depend on the
/// number of threads).
pub const ROW_BLOCK: usize = 64;

/// Column sums of `x [n*c]` in f64: `out[j] = sum_i x[i*c + j]`, deterministic.
pub fn sum_rows_f64<F: Float>(x: &[F], n: usize, c: usize) -> Vec<f64> {
    let partials: Vec<Vec<f64>> = x[..n * c]
        .par_chunks(ROW_BLOCK * c.max(1))
        .map(|block| {
            let mut acc = vec![0.0f64; c];
            for row in block.chunks(c.max(1)) {
                for (a, &v) in acc.iter_mut().zip(row) {
                    *a += v.as_f64();
                }
            }
            acc
        })
        .collect();
    add_partials(partials, c)
}

/// Adds per-block partial vectors of length `c` in block order.
pub fn add_partials(partials: Vec<Vec<f64>>, c: usize) -> Vec<f64> {
    let mut total = vec![0.0f64; c];
    for p in partials {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    total
}

/// Sum of squares of `x` in f64, over fixed-size chunks added in order (deterministic).
pub fn sum_squares_f64<F: Float>(x: &[F]) -> f64 {
    const CHUNK: usize = 1 << 14;
    let partials: Vec<f64> = x
        .par_chunks(CHUNK)
        .map(|ch| ch.iter().map(|&v| v.as_f64() * v.as_f64()).sum::<f64>())
        .collect();
    partials.iter().sum()
}
