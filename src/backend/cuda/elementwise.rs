//! Launch helpers for the grid-stride elementwise bf16 kernels (`kernels/gelu.cu`,
//! `kernels/residual.cu`): each launches over `n` elements. Callers check their op's rule in
//! `backend/shapes.rs` first; the helpers check the lengths again as the guard of their launch.

use cudarc::driver::PushKernelArg;

use super::kernels::Kernel;
use super::{check_len, grid_stride, CudaBackend, CudaBuf, Result};

const BLOCK: u32 = 256;

/// Launches an elementwise kernel `(bf16* out, const bf16* x, const bf16* y, size_t n)` over
/// `n` bf16 elements, after checking each buffer (named by `names`) holds exactly `n`.
#[allow(clippy::too_many_arguments)]
pub(super) fn two_inputs(
    be: &CudaBackend,
    op: &'static str,
    kernel: Kernel,
    names: [&'static str; 3],
    out: &mut CudaBuf,
    x: &CudaBuf,
    y: &CudaBuf,
    n: usize,
) -> Result<()> {
    for (what, len) in names.into_iter().zip([out.len(), x.len(), y.len()]) {
        check_len(op, what, n, len)?;
    }
    let o = out.bf16_mut(op, names[0])?;
    let (x, y) = (x.bf16(op, names[1])?, y.bf16(op, names[2])?);
    // SAFETY: all three buffers hold `n` bf16 elements (checked above); arguments match
    // (bf16*, const bf16*, const bf16*, size_t), and the kernel touches indices below `n` only.
    unsafe { launch!(be, kernel, grid_stride(n, BLOCK), o, x, y, &n) }?;
    Ok(())
}

/// Launches an elementwise kernel `(bf16* out, const bf16* x, size_t n)` over `n` bf16
/// elements, after checking both buffers (named by `names`) hold exactly `n`.
pub(super) fn one_input(
    be: &CudaBackend,
    op: &'static str,
    kernel: Kernel,
    names: [&'static str; 2],
    out: &mut CudaBuf,
    x: &CudaBuf,
    n: usize,
) -> Result<()> {
    for (what, len) in names.into_iter().zip([out.len(), x.len()]) {
        check_len(op, what, n, len)?;
    }
    let (o, x) = (out.bf16_mut(op, names[0])?, x.bf16(op, names[1])?);
    // SAFETY: both buffers hold `n` bf16 elements (checked above); arguments match
    // (bf16*, const bf16*, size_t), and the kernel touches indices below `n` only.
    unsafe { launch!(be, kernel, grid_stride(n, BLOCK), o, x, &n) }?;
    Ok(())
}
