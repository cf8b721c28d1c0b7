//! Launcher for `kernels/fill.cu`: `fill_zero` as a store kernel (why not the driver's memset:
//! see the kernel's header).

use cudarc::driver::{CudaSlice, DevicePtrMut, DeviceRepr, PushKernelArg, ValidAsZeroBits};

use super::kernels::fill::FILL_ZERO_U8;
use super::{driver_error, grid_stride, CudaBackend, Result};

const BLOCK: u32 = 256;

/// Sets every element of `x` to zero bits.
pub(super) fn zero<T: DeviceRepr + ValidAsZeroBits>(
    be: &CudaBackend,
    x: &mut CudaSlice<T>,
) -> Result<()> {
    let bytes = x.len() * std::mem::size_of::<T>();
    if bytes == 0 {
        return Ok(());
    }
    let (ptr, guard) = x.device_ptr_mut(&be.stream);
    if ptr % 16 != 0 {
        // Never the case for whole allocations (256-byte aligned); kept correct regardless.
        drop(guard);
        return be
            .stream
            .memset_zeros(x)
            .map_err(|e| driver_error("zeroing device memory", e));
    }
    let kernel = FILL_ZERO_U8;
    // SAFETY: the kernel writes bytes [0, bytes) of `x`'s allocation only, which `x` owns
    // (`guard` orders the write on the stream); the pointer is 16-byte aligned (checked
    // above) as its 16-byte stores need.
    unsafe {
        launch!(
            be,
            kernel,
            grid_stride(bytes.div_ceil(16), BLOCK),
            &ptr,
            &bytes
        )
    }?;
    drop(guard);
    Ok(())
}
