//! Launchers for `kernels/rmsnorm.cu`: RMSNorm forward, fused residual + RMSNorm forward, and the
//! deterministic backward (dinp per row from the saved fp32 rstd, then dweight over fixed row
//! chunks and a reduce over the chunks in order).

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::kernels::rmsnorm::{
    RMSNORM_BACKWARD_DINP_BF16, RMSNORM_BACKWARD_PARTIAL_BF16, RMSNORM_BACKWARD_REDUCE_F32,
    RMSNORM_FORWARD_BF16, RMSNORM_RESIDUAL_RMSNORM_FORWARD_BF16,
};
use super::{as_i32, column_partials_cfg, columns_cfg, CudaBackend, CudaBuf, Result, CHUNK_ROWS};
use crate::backend::shapes;

/// Rows per block in the warp-per-row kernels (256 threads).
const ROWS: usize = 8;

fn rows_cfg(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(ROWS) as u32, 1, 1),
        block_dim: ((ROWS * 32) as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn forward(
    be: &CudaBackend,
    out: &mut CudaBuf,
    rstd: &mut CudaBuf,
    inp: &CudaBuf,
    weight: &CudaBuf,
    n: usize,
    c: usize,
    eps: f32,
) -> Result<()> {
    let op = "rmsnorm_forward";
    shapes::rmsnorm_forward(out, rstd, inp, weight, n, c, eps)?;
    let (n_, c_) = (as_i32(op, "N", n)?, as_i32(op, "C", c)?);
    if n == 0 {
        return Ok(());
    }
    let (o, s) = (out.bf16_mut(op, "out")?, rstd.f32_mut(op, "rstd")?);
    let (x, w) = (inp.bf16(op, "inp")?, weight.bf16(op, "weight")?);
    let kernel = RMSNORM_FORWARD_BF16;
    // SAFETY: out/inp hold N*C bf16, rstd N fp32, weight C bf16 (checked above); one warp per
    // row, rows past N exit; arguments match (bf16*, float*, const bf16*, const bf16*, int, int,
    // float).
    unsafe { launch!(be, kernel, rows_cfg(n), o, s, x, w, &n_, &c_, &eps) }?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(super) fn residual_rmsnorm_forward(
    be: &CudaBackend,
    residual: &mut CudaBuf,
    out: &mut CudaBuf,
    rstd: &mut CudaBuf,
    a: &CudaBuf,
    b: &CudaBuf,
    weight: &CudaBuf,
    n: usize,
    c: usize,
    eps: f32,
) -> Result<()> {
    let op = "residual_rmsnorm_forward";
    shapes::residual_rmsnorm_forward(residual, out, rstd, a, b, weight, n, c, eps)?;
    let (n_, c_) = (as_i32(op, "N", n)?, as_i32(op, "C", c)?);
    if n == 0 {
        return Ok(());
    }
    let r = residual.bf16_mut(op, "residual")?;
    let (o, s) = (out.bf16_mut(op, "out")?, rstd.f32_mut(op, "rstd")?);
    let (x, y, w) = (
        a.bf16(op, "a")?,
        b.bf16(op, "b")?,
        weight.bf16(op, "weight")?,
    );
    let kernel = RMSNORM_RESIDUAL_RMSNORM_FORWARD_BF16;
    // SAFETY: residual/out/a/b hold N*C bf16, rstd N fp32, weight C bf16 (checked above); one
    // warp per row; arguments match the kernel signature.
    unsafe { launch!(be, kernel, rows_cfg(n), r, o, s, x, y, w, &n_, &c_, &eps) }?;
    Ok(())
}

/// Accumulates `dinp` and `dweight`, reading the forward's fp32 `rstd` as saved.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    be: &CudaBackend,
    dinp: &mut CudaBuf,
    dweight: Option<&mut CudaBuf>,
    dout: &CudaBuf,
    inp: &CudaBuf,
    weight: &CudaBuf,
    rstd: &CudaBuf,
    n: usize,
    c: usize,
) -> Result<()> {
    let op = "rmsnorm_backward";
    shapes::rmsnorm_backward(dinp, dweight.as_deref(), dout, inp, weight, rstd, n, c)?;
    let (n_, c_) = (as_i32(op, "N", n)?, as_i32(op, "C", c)?);
    if n == 0 || c == 0 {
        return Ok(());
    }
    let dx = dinp.bf16_mut(op, "dinp")?;
    let (dy, x, w) = (
        dout.bf16(op, "dout")?,
        inp.bf16(op, "inp")?,
        weight.bf16(op, "weight")?,
    );
    let s = rstd.f32(op, "rstd")?;
    let chunks = n.div_ceil(CHUNK_ROWS);
    let mut partials = be.alloc_f32(chunks * c)?;

    let kernel = RMSNORM_BACKWARD_DINP_BF16;
    // SAFETY: dinp/dout/inp hold N*C bf16, weight C bf16, rstd N fp32; one warp per row.
    unsafe { launch!(be, kernel, rows_cfg(n), dx, dy, x, w, s, &n_, &c_) }?;
    // A frozen weight (LoRA's base): no parameter gradient to sum.
    let Some(dweight) = dweight else {
        return Ok(());
    };
    let dw = dweight.f32_mut(op, "dweight")?;

    let kernel = RMSNORM_BACKWARD_PARTIAL_BF16;
    let chunk_rows = CHUNK_ROWS as i32;
    let cfg = column_partials_cfg(c, chunks);
    // SAFETY: grid (ceil(C/32), chunks) with block (32, 8) as the kernel expects; partials hold
    // chunks*C floats, rstd N, dout/inp N*C bf16.
    unsafe {
        launch!(
            be,
            kernel,
            cfg,
            &mut partials,
            dy,
            x,
            s,
            &n_,
            &c_,
            &chunk_rows
        )
    }?;

    let kernel = RMSNORM_BACKWARD_REDUCE_F32;
    let chunks_ = chunks as i32;
    // SAFETY: dweight holds C floats, partials chunks*C; threads past C exit.
    unsafe { launch!(be, kernel, columns_cfg(c), dw, &partials, &chunks_, &c_) }?;
    Ok(())
}
