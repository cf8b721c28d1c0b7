//! Launchers for `kernels/layernorm.cu`: LayerNorm forward, fused residual + LayerNorm forward,
//! and the deterministic backward (dinp per row, then dweight/dbias over fixed row chunks).

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::kernels::layernorm::{
    LAYERNORM_BACKWARD_DINP_BF16, LAYERNORM_BACKWARD_PARTIAL_BF16, LAYERNORM_BACKWARD_REDUCE_F32,
    LAYERNORM_FORWARD_BF16, LAYERNORM_RESIDUAL_LAYERNORM_FORWARD_BF16,
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
    mean: &mut CudaBuf,
    rstd: &mut CudaBuf,
    inp: &CudaBuf,
    weight: &CudaBuf,
    bias: &CudaBuf,
    n: usize,
    c: usize,
) -> Result<()> {
    let op = "layernorm_forward";
    shapes::layernorm_forward(out, mean, rstd, inp, weight, bias, n, c)?;
    let (n_, c_) = (as_i32(op, "N", n)?, as_i32(op, "C", c)?);
    if n == 0 {
        return Ok(());
    }
    let (o, m, s) = (
        out.bf16_mut(op, "out")?,
        mean.bf16_mut(op, "mean")?,
        rstd.bf16_mut(op, "rstd")?,
    );
    let (x, w, b) = (
        inp.bf16(op, "inp")?,
        weight.bf16(op, "weight")?,
        bias.bf16(op, "bias")?,
    );
    let kernel = LAYERNORM_FORWARD_BF16;
    // SAFETY: out/inp hold N*C bf16, mean/rstd N, weight/bias C (checked above); one warp per
    // row, rows past N exit; arguments match the kernel signature.
    unsafe { launch!(be, kernel, rows_cfg(n), o, m, s, x, w, b, &n_, &c_) }?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(super) fn residual_layernorm_forward(
    be: &CudaBackend,
    residual: &mut CudaBuf,
    out: &mut CudaBuf,
    mean: &mut CudaBuf,
    rstd: &mut CudaBuf,
    a: &CudaBuf,
    b: &CudaBuf,
    weight: &CudaBuf,
    bias: &CudaBuf,
    n: usize,
    c: usize,
) -> Result<()> {
    let op = "residual_layernorm_forward";
    shapes::residual_layernorm_forward(residual, out, mean, rstd, a, b, weight, bias, n, c)?;
    let (n_, c_) = (as_i32(op, "N", n)?, as_i32(op, "C", c)?);
    if n == 0 {
        return Ok(());
    }
    let r = residual.bf16_mut(op, "residual")?;
    let (o, m, s) = (
        out.bf16_mut(op, "out")?,
        mean.bf16_mut(op, "mean")?,
        rstd.bf16_mut(op, "rstd")?,
    );
    let (x, y) = (a.bf16(op, "a")?, b.bf16(op, "b")?);
    let (w, bb) = (weight.bf16(op, "weight")?, bias.bf16(op, "bias")?);
    let kernel = LAYERNORM_RESIDUAL_LAYERNORM_FORWARD_BF16;
    // SAFETY: residual/out/a/b hold N*C bf16, mean/rstd N, weight/bias C (checked above); one
    // warp per row; arguments match the kernel signature.
    unsafe { launch!(be, kernel, rows_cfg(n), r, o, m, s, x, y, w, bb, &n_, &c_) }?;
    Ok(())
}

/// `mean` and `rstd` are checked but not read: the kernels recompute them in fp32 from `inp`
/// (the saved copies are bf16; see kernels/layernorm.cu).
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    be: &CudaBackend,
    dinp: &mut CudaBuf,
    dweight: Option<&mut CudaBuf>,
    dbias: Option<&mut CudaBuf>,
    dout: &CudaBuf,
    inp: &CudaBuf,
    weight: &CudaBuf,
    mean: &CudaBuf,
    rstd: &CudaBuf,
    n: usize,
    c: usize,
) -> Result<()> {
    let op = "layernorm_backward";
    let (dwr, dbr) = (dweight.as_deref(), dbias.as_deref());
    shapes::layernorm_backward(dinp, dwr, dbr, dout, inp, weight, mean, rstd, n, c)?;
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
    let mut stats = be.alloc_f32(2 * n)?;
    let chunks = n.div_ceil(CHUNK_ROWS);
    let mut partials = be.alloc_f32(chunks * 2 * c)?;

    let kernel = LAYERNORM_BACKWARD_DINP_BF16;
    // SAFETY: dinp/dout/inp hold N*C bf16, weight C, stats 2N floats; one warp per row.
    unsafe { launch!(be, kernel, rows_cfg(n), dx, &mut stats, dy, x, w, &n_, &c_) }?;
    // Frozen weights (LoRA's base): no parameter gradient to sum.
    let (Some(dweight), Some(dbias)) = (dweight, dbias) else {
        return Ok(());
    };
    let (dw, db) = (dweight.f32_mut(op, "dweight")?, dbias.f32_mut(op, "dbias")?);

    let kernel = LAYERNORM_BACKWARD_PARTIAL_BF16;
    let chunk_rows = CHUNK_ROWS as i32;
    let cfg = column_partials_cfg(c, chunks);
    // SAFETY: grid (ceil(C/32), chunks) with block (32, 8) as the kernel expects; partials hold
    // chunks*2*C floats, stats 2N, dout/inp N*C bf16.
    unsafe {
        launch!(
            be,
            kernel,
            cfg,
            &mut partials,
            &stats,
            dy,
            x,
            &n_,
            &c_,
            &chunk_rows
        )
    }?;

    let kernel = LAYERNORM_BACKWARD_REDUCE_F32;
    let chunks_ = chunks as i32;
    let cfg = columns_cfg(c);
    // SAFETY: dweight/dbias hold C floats, partials chunks*2*C; threads past C exit.
    unsafe { launch!(be, kernel, cfg, dw, db, &partials, &chunks_, &c_) }?;
    Ok(())
}
