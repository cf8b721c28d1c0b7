//! Launchers for `kernels/gelu.cu`: GELU forward/backward and the residual add (bf16).

use cudarc::driver::PushKernelArg;

use super::{check_len, grid_stride, launch_error, CudaBackend, CudaBuf, Result};

pub(super) const KERNELS: &[&str] = &[
    "gelu_forward_bf16",
    "gelu_backward_bf16",
    "gelu_residual_forward_bf16",
];

const BLOCK: u32 = 256;

pub(super) fn forward(be: &CudaBackend, out: &mut CudaBuf, inp: &CudaBuf, n: usize) -> Result<()> {
    let op = "gelu_forward";
    check_len(op, "out", n, out.len())?;
    check_len(op, "inp", n, inp.len())?;
    let (o, x) = (out.bf16_mut(op, "out")?, inp.bf16(op, "inp")?);
    let name = KERNELS[0];
    let f = be.function(name)?;
    // SAFETY: `out` and `inp` hold `n` bf16 elements (checked above); the kernel touches
    // indices below `n` only and its argument list matches (bf16*, const bf16*, size_t).
    unsafe {
        be.stream
            .launch_builder(f)
            .arg(o)
            .arg(x)
            .arg(&n)
            .launch(grid_stride(n, BLOCK))
    }
    .map_err(|e| launch_error(name, e))?;
    Ok(())
}

pub(super) fn backward(
    be: &CudaBackend,
    dinp: &mut CudaBuf,
    inp: &CudaBuf,
    dout: &CudaBuf,
    n: usize,
) -> Result<()> {
    let op = "gelu_backward";
    check_len(op, "dinp", n, dinp.len())?;
    check_len(op, "inp", n, inp.len())?;
    check_len(op, "dout", n, dout.len())?;
    let dx = dinp.bf16_mut(op, "dinp")?;
    let (x, dy) = (inp.bf16(op, "inp")?, dout.bf16(op, "dout")?);
    let name = KERNELS[1];
    let f = be.function(name)?;
    // SAFETY: all three buffers hold `n` bf16 elements (checked above); arguments match
    // (bf16*, const bf16*, const bf16*, size_t).
    unsafe {
        be.stream
            .launch_builder(f)
            .arg(dx)
            .arg(x)
            .arg(dy)
            .arg(&n)
            .launch(grid_stride(n, BLOCK))
    }
    .map_err(|e| launch_error(name, e))?;
    Ok(())
}

pub(super) fn residual_forward(
    be: &CudaBackend,
    out: &mut CudaBuf,
    a: &CudaBuf,
    b: &CudaBuf,
    n: usize,
) -> Result<()> {
    let op = "residual_forward";
    check_len(op, "out", n, out.len())?;
    check_len(op, "a", n, a.len())?;
    check_len(op, "b", n, b.len())?;
    let o = out.bf16_mut(op, "out")?;
    let (x, y) = (a.bf16(op, "a")?, b.bf16(op, "b")?);
    let name = KERNELS[2];
    let f = be.function(name)?;
    // SAFETY: all three buffers hold `n` bf16 elements (checked above); arguments match
    // (bf16*, const bf16*, const bf16*, size_t).
    unsafe {
        be.stream
            .launch_builder(f)
            .arg(o)
            .arg(x)
            .arg(y)
            .arg(&n)
            .launch(grid_stride(n, BLOCK))
    }
    .map_err(|e| launch_error(name, e))?;
    Ok(())
}
