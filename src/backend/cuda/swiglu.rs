//! Launchers for `kernels/swiglu.cu`: the SwiGLU gate forward and backward, one block per row of
//! `gate_up [N*2I]`.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::kernels::swiglu::{SWIGLU_BACKWARD_BF16, SWIGLU_FORWARD_BF16};
use super::{as_i32, CudaBackend, CudaBuf, Result};
use crate::backend::shapes;

/// One block of 256 threads per row (the kernels stride over the row's I columns).
fn rows_cfg(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub(super) fn forward(
    be: &CudaBackend,
    out: &mut CudaBuf,
    gate_up: &CudaBuf,
    n: usize,
    i: usize,
) -> Result<()> {
    let op = "swiglu_forward";
    shapes::swiglu_forward(out, gate_up, n, i)?;
    as_i32(op, "N", n)?;
    let i_ = as_i32(op, "2I", 2 * i)? / 2;
    if n * i == 0 {
        return Ok(());
    }
    let (o, x) = (out.bf16_mut(op, "out")?, gate_up.bf16(op, "gate_up")?);
    let kernel = SWIGLU_FORWARD_BF16;
    // SAFETY: out holds N*I bf16 and gate_up N*2I (checked above); one block per row n < N
    // (N fits an int, so the grid's x limit); arguments match (bf16*, const bf16*, int).
    unsafe { launch!(be, kernel, rows_cfg(n), o, x, &i_) }?;
    Ok(())
}

pub(super) fn backward(
    be: &CudaBackend,
    dgate_up: &mut CudaBuf,
    dout: &CudaBuf,
    gate_up: &CudaBuf,
    n: usize,
    i: usize,
) -> Result<()> {
    let op = "swiglu_backward";
    shapes::swiglu_backward(dgate_up, dout, gate_up, n, i)?;
    as_i32(op, "N", n)?;
    let i_ = as_i32(op, "2I", 2 * i)? / 2;
    if n * i == 0 {
        return Ok(());
    }
    let dx = dgate_up.bf16_mut(op, "dgate_up")?;
    let (dy, x) = (dout.bf16(op, "dout")?, gate_up.bf16(op, "gate_up")?);
    let kernel = SWIGLU_BACKWARD_BF16;
    // SAFETY: dgate_up and gate_up hold N*2I bf16, dout N*I (checked above); one block per row;
    // arguments match (bf16*, const bf16*, const bf16*, int).
    unsafe { launch!(be, kernel, rows_cfg(n), dx, dy, x, &i_) }?;
    Ok(())
}
