//! Launcher for `kernels/accumulate.cu`: `acc += x` over fp32 gradient buffers.

use cudarc::driver::{DevicePtr, DevicePtrMut, PushKernelArg};

use super::kernels::accumulate::ACCUMULATE_F32;
use super::{grid_stride, BackendError, CudaBackend, CudaBuf, Result};

const BLOCK: u32 = 256;

/// `acc[i] += x[i]`; both fp32 (Grad or State) buffers of the same length.
pub(super) fn accumulate(be: &CudaBackend, acc: &mut CudaBuf, x: &CudaBuf) -> Result<()> {
    let n = acc.len();
    if x.len() != n {
        return Err(BackendError::Shape {
            op: "accumulate",
            what: "x",
            expected: n,
            found: x.len(),
        });
    }
    if n == 0 {
        return Ok(());
    }
    let xs = x.f32("accumulate", "x")?;
    let accs = acc.f32_mut("accumulate", "acc")?;
    let (xp, xg) = xs.device_ptr(&be.stream);
    let (ap, ag) = accs.device_ptr_mut(&be.stream);
    let vec: i32 = (ap % 16 == 0 && xp % 16 == 0) as i32;
    let kernel = ACCUMULATE_F32;
    // SAFETY: `acc` and `x` hold `n` floats each (checked above) in distinct allocations (one
    // is borrowed mutably, the other shared); float4 accesses only when both are 16-byte
    // aligned (`vec`); arguments match (float*, const float*, size_t, int).
    unsafe {
        launch!(
            be,
            kernel,
            grid_stride(n.div_ceil(4), BLOCK),
            &ap,
            &xp,
            &n,
            &vec
        )
    }?;
    drop((ag, xg));
    Ok(())
}
