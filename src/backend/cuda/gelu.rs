//! Launchers for `kernels/gelu.cu`: GELU forward/backward (and in place, for
//! `matmul_gelu.rs`'s fallback) and the residual add (bf16).

use cudarc::driver::PushKernelArg;

use super::{check_len, grid_stride, launch_error, CudaBackend, CudaBuf, Result};

pub(super) const KERNELS: &[&str] = &[
    "gelu_forward_bf16",
    "gelu_backward_bf16",
    "gelu_residual_forward_bf16",
    "gelu_backward_in_place_bf16",
];

const BLOCK: u32 = 256;

pub(super) fn forward(be: &CudaBackend, out: &mut CudaBuf, inp: &CudaBuf, n: usize) -> Result<()> {
    one_input(be, "gelu_forward", KERNELS[0], ["out", "inp"], out, inp, n)
}

pub(super) fn backward(
    be: &CudaBackend,
    dinp: &mut CudaBuf,
    inp: &CudaBuf,
    dout: &CudaBuf,
    n: usize,
) -> Result<()> {
    let names = ["dinp", "inp", "dout"];
    two_inputs(be, "gelu_backward", KERNELS[1], names, dinp, inp, dout, n)
}

/// `grad *= gelu'(pre)` over `n` bf16 elements, in place.
pub(super) fn backward_in_place(
    be: &CudaBackend,
    grad: &mut CudaBuf,
    pre: &CudaBuf,
    n: usize,
) -> Result<()> {
    let names = ["dinp", "pre"];
    one_input(be, "matmul_gelu_backward", KERNELS[3], names, grad, pre, n)
}

pub(super) fn residual_forward(
    be: &CudaBackend,
    out: &mut CudaBuf,
    a: &CudaBuf,
    b: &CudaBuf,
    n: usize,
) -> Result<()> {
    let names = ["out", "a", "b"];
    two_inputs(be, "residual_forward", KERNELS[2], names, out, a, b, n)
}

/// Launches an elementwise kernel `(bf16* out, const bf16* x, const bf16* y, size_t n)` over
/// `n` bf16 elements, after checking each buffer (named by `names`) holds exactly `n`.
#[allow(clippy::too_many_arguments)]
fn two_inputs(
    be: &CudaBackend,
    op: &'static str,
    name: &'static str,
    names: [&'static str; 3],
    out: &mut CudaBuf,
    x: &CudaBuf,
    y: &CudaBuf,
    n: usize,
) -> Result<()> {
    check_len(op, names[0], n, out.len())?;
    check_len(op, names[1], n, x.len())?;
    check_len(op, names[2], n, y.len())?;
    let o = out.bf16_mut(op, names[0])?;
    let (x, y) = (x.bf16(op, names[1])?, y.bf16(op, names[2])?);
    let f = be.function(name)?;
    // SAFETY: all three buffers hold `n` bf16 elements (checked above); arguments match
    // (bf16*, const bf16*, const bf16*, size_t), and the kernel touches indices below `n` only.
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

/// Launches an elementwise kernel `(bf16* out, const bf16* x, size_t n)` over `n` bf16
/// elements, after checking both buffers (named by `names`) hold exactly `n`.
fn one_input(
    be: &CudaBackend,
    op: &'static str,
    name: &'static str,
    names: [&'static str; 2],
    out: &mut CudaBuf,
    x: &CudaBuf,
    n: usize,
) -> Result<()> {
    check_len(op, names[0], n, out.len())?;
    check_len(op, names[1], n, x.len())?;
    let (o, x) = (out.bf16_mut(op, names[0])?, x.bf16(op, names[1])?);
    let f = be.function(name)?;
    // SAFETY: both buffers hold `n` bf16 elements (checked above); arguments match
    // (bf16*, const bf16*, size_t), and the kernel touches indices below `n` only.
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
