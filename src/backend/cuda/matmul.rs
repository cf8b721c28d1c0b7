//! Matmuls through cuBLASLt (`blas.rs`), and the launchers for `kernels/matmul.cu` (the bias
//! gradient).
//!
//! Row-major <-> column-major: cuBLASLt is column-major, and a row-major `[R, K]` buffer read
//! column-major is its transpose, a `K x R` matrix with leading dimension `K`. So every product
//! is computed transposed, with the operand roles chosen so no data moves:
//! - forward  `out[N,OC] = inp[N,C] W[OC,C]^T + bias`:  `out^T (OC x N) = op(W) inp^T`, where the
//!   W buffer reads as `C x OC` (transa = T) and inp as `C x N` (transb = N); m = OC, n = N,
//!   k = C; the BIAS epilogue adds `bias[m]` down each column, i.e. per output feature.
//! - dinp     `dinp[N,C] = dout[N,OC] W[OC,C]`: `dinp^T (C x N) = W^T dout^T`, the W buffer
//!   reads as `C x OC` (N), dout as `OC x N` (N); m = C, n = N, k = OC; beta = 0 (an
//!   activation gradient is overwritten, so it needs no zeroing first).
//! - dweight  `dW[OC,C] += dout^T inp`: `dW^T (C x OC) = inp^T dout`, inp reads as `C x N` (N),
//!   dout as `OC x N` (transb = T); m = C, n = OC, k = N; D fp32, beta = 1.
//!
//! The GELU epilogues (GELU_AUX(_BIAS) forward, DGELU backward) serve `matmul_gelu.rs`; their
//! auxiliary matrix, the GELU input, has D's shape and layout.

use cudarc::driver::{DevicePtr, DevicePtrMut, PushKernelArg};

use super::blas::{Epilogue, Gemm};
use super::kernels::matmul::{MATMUL_BIAS_BACKWARD_PARTIAL_BF16, MATMUL_BIAS_BACKWARD_REDUCE_F32};
use super::{
    as_i32, column_partials_cfg, columns_cfg, BackendError, CudaBackend, CudaBuf, Result,
    CHUNK_ROWS,
};
use crate::backend::{shapes, Backend};

#[allow(clippy::too_many_arguments)]
pub(super) fn forward(
    be: &CudaBackend,
    out: &mut CudaBuf,
    inp: &CudaBuf,
    weight: &CudaBuf,
    bias: Option<&CudaBuf>,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<()> {
    let op = "matmul_forward";
    shapes::matmul_forward(out, inp, weight, bias, n, c, oc)?;
    forward_with(be, op, out, None, inp, weight, bias, n, c, oc).map(|_| ())
}

/// `out = inp @ weight^T (+ bias)` (lengths checked by the caller), or with `pre` (out's
/// shape) through the GELU_AUX(_BIAS) epilogue: `pre` = that product, `out = gelu(pre)`.
/// `Ok(false)` where cuBLASLt has no algorithm for the GELU epilogue (nothing launched);
/// always `Ok(true)` without `pre`.
#[allow(clippy::too_many_arguments)]
pub(super) fn forward_with(
    be: &CudaBackend,
    op: &'static str,
    out: &mut CudaBuf,
    pre: Option<&mut CudaBuf>,
    inp: &CudaBuf,
    weight: &CudaBuf,
    bias: Option<&CudaBuf>,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<bool> {
    if n * oc == 0 {
        return Ok(true);
    }
    if c == 0 {
        // An empty sum: out is the bias (or zero); not worth a cuBLASLt special case.
        return Err(BackendError::Invalid {
            op,
            msg: "C = 0 is not supported on the CUDA backend".into(),
        });
    }
    let s = &be.stream;
    let (x, _gx) = inp.bf16(op, "inp")?.device_ptr(s);
    let (w, _gw) = weight.bf16(op, "weight")?.device_ptr(s);
    let bias_guard = match bias {
        Some(bias) => Some(bias.bf16(op, "bias")?.device_ptr(s)),
        None => None,
    };
    let epilogue = match (pre.is_some(), bias.is_some()) {
        (true, bias) => Epilogue::GeluAux { bias },
        (false, true) => Epilogue::Bias,
        (false, false) => Epilogue::None,
    };
    let aux_guard = match pre {
        Some(pre) => Some(pre.bf16_mut(op, "pre")?.device_ptr_mut(s)),
        None => None,
    };
    let (y, _gy) = out.bf16_mut(op, "out")?.device_ptr_mut(s);
    let g = Gemm {
        transa: true,
        transb: false,
        m: oc as u64,
        n: n as u64,
        k: c as u64,
        lda: c as i64,
        ldb: c as i64,
        ldc: oc as i64,
        out_f32: false,
        epilogue,
        accumulate: false,
    };
    let bias = bias_guard.as_ref().map(|(p, _)| *p);
    let aux = aux_guard.as_ref().map(|(p, _)| *p);
    // SAFETY: weight holds OC*C bf16 (C x OC, ld C), inp N*C (C x N, ld C), out and pre N*OC
    // (OC x N, ld OC), bias OC bf16 (the epilogue's default type is D's), all checked by the
    // caller; the guards keep them alive and ordered on the stream.
    unsafe { be.blas.try_gemm(g, w, x, y, bias, aux) }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    be: &CudaBackend,
    dinp: &mut CudaBuf,
    dweight: Option<&mut CudaBuf>,
    dbias: Option<&mut CudaBuf>,
    dout: &CudaBuf,
    inp: &CudaBuf,
    weight: &CudaBuf,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<()> {
    let op = "matmul_backward";
    shapes::matmul_backward(
        dinp,
        dweight.as_deref(),
        dbias.as_deref(),
        dout,
        inp,
        weight,
        n,
        c,
        oc,
    )?;
    input_grad(be, op, dinp, dout, weight, None, n, c, oc)?;
    weight_grads(be, op, dweight, dbias, dout, inp, n, c, oc)
}

/// `dinp = dout @ weight` (lengths checked by the caller), or with `pre` (D's shape) through
/// the DGELU epilogue, `dinp = gelu'(pre) * (dout @ weight)`. `Ok(false)` where cuBLASLt has
/// no DGELU algorithm for the shape (nothing launched); always `Ok(true)` without `pre`.
#[allow(clippy::too_many_arguments)]
pub(super) fn input_grad(
    be: &CudaBackend,
    op: &'static str,
    dinp: &mut CudaBuf,
    dout: &CudaBuf,
    weight: &CudaBuf,
    pre: Option<&CudaBuf>,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<bool> {
    if n == 0 || c == 0 {
        return Ok(true);
    }
    if oc == 0 {
        // An empty sum: dinp = 0 (and gelu'(pre) * 0 = 0).
        be.fill_zero(dinp)?;
        return Ok(true);
    }
    let s = &be.stream;
    let (dy, _gdy) = dout.bf16(op, "dout")?.device_ptr(s);
    let (w, _gw) = weight.bf16(op, "weight")?.device_ptr(s);
    let aux_guard = match pre {
        Some(pre) => Some(pre.bf16(op, "pre")?.device_ptr(s)),
        None => None,
    };
    let (dx, _gdx) = dinp.bf16_mut(op, "dinp")?.device_ptr_mut(s);
    let g = Gemm {
        transa: false,
        transb: false,
        m: c as u64,
        n: n as u64,
        k: oc as u64,
        lda: c as i64,
        ldb: oc as i64,
        ldc: c as i64,
        out_f32: false,
        epilogue: if pre.is_some() {
            Epilogue::DGelu
        } else {
            Epilogue::None
        },
        accumulate: false,
    };
    let aux = aux_guard.as_ref().map(|(p, _)| *p);
    // SAFETY: weight OC*C bf16 (C x OC, ld C), dout N*OC (OC x N, ld OC), dinp and pre N*C
    // bf16 (C x N, ld C), checked by the caller; the guards keep them alive and ordered.
    unsafe { be.blas.try_gemm(g, w, dy, dx, None, aux) }
}

/// Accumulates `dweight += dout^T @ inp` and `dbias += sum_rows(dout)` (lengths checked by the
/// caller); a frozen weight (`None`) skips its GEMM.
#[allow(clippy::too_many_arguments)]
pub(super) fn weight_grads(
    be: &CudaBackend,
    op: &'static str,
    dweight: Option<&mut CudaBuf>,
    dbias: Option<&mut CudaBuf>,
    dout: &CudaBuf,
    inp: &CudaBuf,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<()> {
    let (n_, oc_) = (as_i32(op, "N", n)?, as_i32(op, "OC", oc)?);
    if n == 0 || oc == 0 || c == 0 {
        return Ok(());
    }
    let s = &be.stream;
    if let Some(dweight) = dweight {
        let (dy, _gdy) = dout.bf16(op, "dout")?.device_ptr(s);
        let (x, _gx) = inp.bf16(op, "inp")?.device_ptr(s);
        let (dw, _gdw) = dweight.f32_mut(op, "dweight")?.device_ptr_mut(s);
        let g = Gemm {
            transa: false,
            transb: true,
            m: c as u64,
            n: oc as u64,
            k: n as u64,
            lda: c as i64,
            ldb: oc as i64,
            ldc: c as i64,
            out_f32: true,
            epilogue: Epilogue::None,
            accumulate: true,
        };
        // SAFETY: inp N*C bf16 (C x N, ld C), dout N*OC read as OC x N (ld OC) and transposed,
        // dweight OC*C fp32 (C x OC, ld C), checked by the caller.
        unsafe { be.blas.gemm(g, x, dy, dw, None) }?;
    }
    let Some(dbias) = dbias else {
        return Ok(());
    };
    let db = dbias.f32_mut(op, "dbias")?;
    let dy = dout.bf16(op, "dout")?;
    let chunks = n.div_ceil(CHUNK_ROWS);
    let mut partials = be.alloc_f32(chunks * oc)?;
    let kernel = MATMUL_BIAS_BACKWARD_PARTIAL_BF16;
    let chunk_rows = CHUNK_ROWS as i32;
    let cfg = column_partials_cfg(oc, chunks);
    // SAFETY: grid (ceil(OC/32), chunks), block (32, 8) as the kernel expects; partials hold
    // chunks*OC floats, dout N*OC bf16.
    unsafe { launch!(be, kernel, cfg, &mut partials, dy, &n_, &oc_, &chunk_rows) }?;
    let kernel = MATMUL_BIAS_BACKWARD_REDUCE_F32;
    let chunks_ = chunks as i32;
    let cfg = columns_cfg(oc);
    // SAFETY: dbias holds OC floats, partials chunks*OC; threads past OC exit.
    unsafe { launch!(be, kernel, cfg, db, &partials, &chunks_, &oc_) }?;
    Ok(())
}
