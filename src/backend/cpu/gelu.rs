//! GELU (tanh approximation) forward and backward.
//!
//! Napkin math: each op streams its inputs and output once, a handful of FLOPs per element;
//! memory-bound.

use rayon::prelude::*;

use super::float::Float;

/// `sqrt(2 / pi)`.
const GELU_SCALE: f64 = 0.797_884_560_802_865_4;
const GELU_CUBIC: f64 = 0.044715;

/// `tanh(u) = 1 - 2 / (exp(2u) + 1)`: one `exp` is several times cheaper than libm's `tanh`
/// for f32, and the form saturates cleanly to +-1 (`exp` overflowing to infinity gives 1).
#[inline]
fn tanh<F: Float>(u: F) -> F {
    let two = F::of(2.0);
    F::one() - two / ((two * u).exp() + F::one())
}

/// `out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
pub fn gelu_forward<F: Float>(out: &mut [F], inp: &[F], n: usize) {
    let (s, k, half) = (F::of(GELU_SCALE), F::of(GELU_CUBIC), F::of(0.5));
    out[..n]
        .par_iter_mut()
        .zip(inp[..n].par_iter())
        .for_each(|(o, &x)| {
            let u = s * (x + k * x * x * x);
            *o = half * x * (F::one() + tanh(u));
        });
}

/// `gelu'(x) = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) sqrt(2/pi) (1 + 3 * 0.044715 x^2)`,
/// with `u = sqrt(2/pi) (x + 0.044715 x^3)`.
#[inline]
fn gelu_grad<F: Float>(x: F) -> F {
    let (s, k, half, three) = (F::of(GELU_SCALE), F::of(GELU_CUBIC), F::of(0.5), F::of(3.0));
    let u = s * (x + k * x * x * x);
    let th = tanh(u);
    let sech2 = F::one() - th * th;
    half * (F::one() + th) + half * x * sech2 * s * (F::one() + three * k * x * x)
}

/// `dinp = gelu'(inp) * dout` (overwrites).
pub fn gelu_backward<F: Float>(dinp: &mut [F], inp: &[F], dout: &[F], n: usize) {
    dinp[..n]
        .par_iter_mut()
        .zip(inp[..n].par_iter().zip(dout[..n].par_iter()))
        .for_each(|(dx, (&x, &dy))| *dx = gelu_grad(x) * dy);
}

/// `grad *= gelu'(pre)` in place: carries a gradient on `gelu(pre)` back to `pre`.
pub fn gelu_backward_in_place<F: Float>(grad: &mut [F], pre: &[F], n: usize) {
    grad[..n]
        .par_iter_mut()
        .zip(pre[..n].par_iter())
        .for_each(|(g, &x)| *g = gelu_grad(x) * *g);
}
