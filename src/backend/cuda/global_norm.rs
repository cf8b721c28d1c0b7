//! Launchers for `kernels/global_norm.cu`: the global L2 norm, a deterministic two-pass reduction.

use cudarc::driver::{CudaSlice, CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg};

use super::kernels::{
    global_norm::{GLOBAL_NORM_FINAL_F32, GLOBAL_NORM_PARTIAL_BF16, GLOBAL_NORM_PARTIAL_F32},
    Kernel,
};
use super::{driver_error, CudaBackend, CudaBuf, Mem, Result};

/// Blocks per buffer in pass 1: a constant, so the summation order never changes.
const BLOCKS: usize = 256;
const THREADS: u32 = 256;

/// `sqrt(sum of squares)` over every buffer: a parameter counts its fp32 master copy.
pub(super) fn global_norm(be: &CudaBackend, bufs: &[&CudaBuf]) -> Result<f32> {
    if bufs.is_empty() {
        return Ok(0.0);
    }
    let mut partials = be.alloc_f32(BLOCKS * bufs.len())?;
    let cfg = LaunchConfig {
        grid_dim: (BLOCKS as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    for (k, buf) in bufs.iter().enumerate() {
        let dst = partials.slice_mut(k * BLOCKS..(k + 1) * BLOCKS);
        match &buf.mem {
            Mem::F32(x) | Mem::Param { master: x, .. } => {
                partial(be, GLOBAL_NORM_PARTIAL_F32, dst, x, cfg)?
            }
            Mem::Bf16(x) => partial(be, GLOBAL_NORM_PARTIAL_BF16, dst, x, cfg)?,
        }
    }
    let mut out = be.alloc_f32(1)?;
    let count = (BLOCKS * bufs.len()) as i32;
    let kernel = GLOBAL_NORM_FINAL_F32;
    let single = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: `out` holds one float, `partials` holds `count` floats; the kernel's shared
    // tree is sized for exactly THREADS = 256 threads.
    unsafe { launch!(be, kernel, single, &mut out, &partials, &count) }?;
    let host = be
        .stream
        .clone_dtoh(&out)
        .map_err(|e| driver_error("copying the norm from the device", e))?;
    Ok(host[0])
}

/// Pass 1 over one buffer: `kernel` (the fp32 or bf16 partial-sum kernel, matching `T`) writes
/// one sum of squares per block of the fixed grid into `dst`.
fn partial<T: DeviceRepr>(
    be: &CudaBackend,
    kernel: Kernel,
    mut dst: CudaViewMut<'_, f32>,
    x: &CudaSlice<T>,
    cfg: LaunchConfig,
) -> Result<()> {
    let n = x.len();
    // SAFETY: `dst` holds BLOCKS floats, one per block of the fixed grid; `x` holds `n`
    // elements of the type `kernel` reads (float for _f32, bf16 for _bf16); arguments match
    // (float*, const T*, size_t).
    unsafe { launch!(be, kernel, cfg, &mut dst, x, &n) }?;
    Ok(())
}
