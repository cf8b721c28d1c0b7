//! Matmul of a linear layer (`nn.Linear` layout), forward and backward, through the `gemm`
//! crate (chosen over `matrixmultiply` by measurement: see docs/PERF.md "CPU GEMM crate choice").
//!
//! Napkin math: forward `2*N*C*OC` FLOPs; backward twice that (`dinp` and `dweight`) plus the
//! `N*OC` bias column sums. The GEMM crate splits output tiles across rayon threads, never the
//! inner dimension, so results do not depend on the thread count.

use rayon::prelude::*;

use super::float::{sum_rows_f64, Float, ROW_BLOCK};

/// A strided read-only matrix view: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct View<'a, F> {
    pub data: &'a [F],
    pub rs: usize,
    pub cs: usize,
}

impl<'a, F> View<'a, F> {
    /// Row-major with row stride `stride`: element `(i, j)` is `data[i * stride + j]`.
    pub fn rows(data: &'a [F], stride: usize) -> Self {
        View {
            data,
            rs: stride,
            cs: 1,
        }
    }

    /// The transpose of [`View::rows`]: element `(i, j)` is `data[j * stride + i]`.
    pub fn cols(data: &'a [F], stride: usize) -> Self {
        View {
            data,
            rs: 1,
            cs: stride,
        }
    }

    /// The view whose element `(0, 0)` is this view's `(i, j)`.
    pub fn at(self, i: usize, j: usize) -> Self {
        View {
            data: &self.data[i * self.rs + j * self.cs..],
            ..self
        }
    }
}

/// Where a product runs: split over the rayon pool, or on the calling thread (for products
/// that already run inside a parallel task, such as attention's per-head products).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threads {
    Pool,
    Serial,
}

/// `dst (m x n, row-major, contiguous) = [dst +] lhs (m x k) @ rhs (k x n)`, on the pool.
///
/// Panics if a view does not fit inside its slice (the backend checks shapes before calling).
pub fn gemm<F: Float>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [F],
    accumulate: bool,
    lhs: View<'_, F>,
    rhs: View<'_, F>,
) {
    gemm_scaled(
        m,
        n,
        k,
        dst,
        n,
        accumulate,
        lhs,
        rhs,
        F::one(),
        Threads::Pool,
    );
}

/// `dst (m x n, row-major, row stride dst_rs) = [dst +] scale * lhs (m x k) @ rhs (k x n)`.
///
/// Panics if a view does not fit inside its slice (the backend checks shapes before calling).
#[allow(clippy::too_many_arguments)]
pub fn gemm_scaled<F: Float>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [F],
    dst_rs: usize,
    accumulate: bool,
    lhs: View<'_, F>,
    rhs: View<'_, F>,
    scale: F,
    threads: Threads,
) {
    if m == 0 || n == 0 {
        return;
    }
    let fits = |v: &View<'_, F>, rows: usize, cols: usize| {
        rows == 0 || cols == 0 || (rows - 1) * v.rs + (cols - 1) * v.cs < v.data.len()
    };
    assert!(
        dst_rs >= n && dst.len() >= (m - 1) * dst_rs + n,
        "gemm: dst too short"
    );
    assert!(
        fits(&lhs, m, k) && fits(&rhs, k, n),
        "gemm: operand too short"
    );
    if k == 0 {
        if !accumulate {
            for row in dst.chunks_mut(dst_rs).take(m) {
                row[..n].fill(F::zero());
            }
        }
        return;
    }
    let parallelism = match threads {
        Threads::Pool => gemm::Parallelism::Rayon(0),
        Threads::Serial => gemm::Parallelism::None,
    };
    // SAFETY: the asserts above keep every element the views address inside its slice; `dst`
    // is a unique borrow, so it aliases neither operand. `gemm::gemm` supports f32 and f64,
    // the only `Float` implementors. It computes `dst = alpha * dst + beta * lhs @ rhs`, and
    // reads `dst` only when `accumulate` is set.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            F::one(),
            scale,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// `out [N*OC] = inp [N*C] @ weight^T + bias`, `weight [OC*C]`, optional `bias [OC]`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_forward<F: Float>(
    out: &mut [F],
    inp: &[F],
    weight: &[F],
    bias: Option<&[F]>,
    n: usize,
    c: usize,
    oc: usize,
) {
    let inp = View::rows(&inp[..n * c], c);
    // weight^T (C x OC): element (c_, o) = weight[o * C + c_].
    let wt = View::cols(&weight[..oc * c], c);
    // With a bias, every row starts as the bias and the product accumulates onto it (one pass
    // over `out` fewer than adding the bias afterwards).
    if let Some(bias) = bias {
        out[..n * oc]
            .par_chunks_mut((ROW_BLOCK * oc).max(1))
            .for_each(|rows| {
                for row in rows.chunks_mut(oc.max(1)) {
                    row.copy_from_slice(&bias[..oc]);
                }
            });
    }
    gemm(n, oc, c, &mut out[..n * oc], bias.is_some(), inp, wt);
}

/// `dinp = dout @ weight` (overwrites); accumulates `dweight += dout^T @ inp`,
/// `dbias += sum_rows(dout)`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_backward<F: Float>(
    dinp: &mut [F],
    dweight: Option<&mut [F]>,
    dbias: Option<&mut [F]>,
    dout: &[F],
    inp: &[F],
    weight: &[F],
    n: usize,
    c: usize,
    oc: usize,
) {
    let dout_v = View::rows(&dout[..n * oc], oc);
    let w = View::rows(&weight[..oc * c], c);
    gemm(n, c, oc, &mut dinp[..n * c], false, dout_v, w);
    // dout^T (OC x N): element (o, i) = dout[i * OC + o].
    if let Some(dweight) = dweight {
        let dout_t = View::cols(&dout[..n * oc], oc);
        let x = View::rows(&inp[..n * c], c);
        gemm(oc, c, n, &mut dweight[..oc * c], true, dout_t, x);
    }
    if let Some(dbias) = dbias {
        for (g, s) in dbias[..oc].iter_mut().zip(sum_rows_f64(dout, n, oc)) {
            *g += F::of(s);
        }
    }
}
