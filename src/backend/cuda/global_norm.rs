//! Launchers for `kernels/global_norm.cu`: the global L2 norm, a deterministic two-pass reduction.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{driver_error, launch_error, CudaBackend, CudaBuf, Mem, Result};

pub(super) const KERNELS: &[&str] = &[
    "global_norm_partial_f32",
    "global_norm_partial_bf16",
    "global_norm_final_f32",
];

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
        let n = buf.len();
        let mut dst = partials.slice_mut(k * BLOCKS..(k + 1) * BLOCKS);
        let result = match &buf.mem {
            Mem::F32(x) | Mem::Param { master: x, .. } => {
                let f = be.function(KERNELS[0])?;
                // SAFETY: `dst` holds BLOCKS floats, one per block of the fixed grid; `x` holds
                // `n` floats; arguments match (float*, const float*, size_t).
                unsafe {
                    be.stream
                        .launch_builder(f)
                        .arg(&mut dst)
                        .arg(x)
                        .arg(&n)
                        .launch(cfg)
                }
            }
            Mem::Bf16(x) => {
                let f = be.function(KERNELS[1])?;
                // SAFETY: as above with `x` holding `n` bf16 values.
                unsafe {
                    be.stream
                        .launch_builder(f)
                        .arg(&mut dst)
                        .arg(x)
                        .arg(&n)
                        .launch(cfg)
                }
            }
        };
        result.map_err(|e| launch_error("global_norm_partial", e))?;
    }
    let mut out = be.alloc_f32(1)?;
    let count = (BLOCKS * bufs.len()) as i32;
    let f = be.function(KERNELS[2])?;
    let single = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: `out` holds one float, `partials` holds `count` floats; the kernel's shared
    // tree is sized for exactly THREADS = 256 threads.
    unsafe {
        be.stream
            .launch_builder(f)
            .arg(&mut out)
            .arg(&partials)
            .arg(&count)
            .launch(single)
    }
    .map_err(|e| launch_error(KERNELS[2], e))?;
    let host = be
        .stream
        .clone_dtoh(&out)
        .map_err(|e| driver_error("copying the norm from the device", e))?;
    Ok(host[0])
}
