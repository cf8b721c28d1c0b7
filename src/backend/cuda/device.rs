//! Finding the device: [`probe`] (a missing driver, GPU or kernel build becomes a
//! [`BackendError::Device`], never a panic; a card older than sm_80 is
//! [`ArchError::TooOld`]) and driver-error formatting.

use cudarc::driver::result::DriverError;
use cudarc::driver::CudaContext;

use super::super::{BackendError, Result};
use super::arch::{ArchError, MIN_COMPUTE_CAPABILITY};
use super::kernels::{Kernel, MODULES};

/// True when build.rs found nvcc and compiled `kernels/*.cu` into this build.
pub const BUILT_WITH_NVCC: bool = cfg!(topcoat_kernels);

/// What [`probe`] found on device 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub name: String,
    /// `(major, minor)`, e.g. `(9, 0)` for H100/H200.
    pub compute_capability: (i32, i32),
    pub total_mem_bytes: usize,
    /// CUDA devices this process sees (after CUDA_VISIBLE_DEVICES).
    pub device_count: usize,
}

impl std::fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (major, minor) = self.compute_capability;
        write!(
            f,
            "{} (compute capability {major}.{minor}, {:.0} GiB)",
            self.name,
            self.total_mem_bytes as f64 / (1u64 << 30) as f64
        )
    }
}

/// Opens device 0 and describes it, or says why there is no usable CUDA device.
pub fn probe() -> Result<DeviceInfo> {
    if !BUILT_WITH_NVCC || MODULES.iter().any(|m| m.fatbin.is_empty()) {
        return Err(BackendError::Device(
            "this topcoat was built without nvcc: no CUDA kernels; rebuild with NVCC set \
             (see docs/BUILD.md)"
                .into(),
        ));
    }
    // cudarc panics on its first call into a driver library it cannot open, so look first.
    // SAFETY: only tries to dlopen the libcuda candidates and drops the handle.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(BackendError::Device(
            "CUDA driver library libcuda.so not found: no NVIDIA driver on this machine".into(),
        ));
    }
    // A driver older than the symbols cudarc expects also panics; report it as an error.
    let info = std::panic::catch_unwind(open_device_0).unwrap_or_else(|_| {
        Err(BackendError::Device(
            "the CUDA driver is missing a function topcoat needs (driver older than CUDA 13?)"
                .into(),
        ))
    })?;
    if info.compute_capability < MIN_COMPUTE_CAPABILITY {
        return Err(ArchError::TooOld {
            name: info.name,
            cc: info.compute_capability,
        }
        .into());
    }
    Ok(info)
}

fn open_device_0() -> Result<DeviceInfo> {
    let ctx = CudaContext::new(0).map_err(|e| driver_error("creating a context on device 0", e))?;
    Ok(DeviceInfo {
        name: ctx.name().map_err(|e| driver_error("device name", e))?,
        compute_capability: ctx
            .compute_capability()
            .map_err(|e| driver_error("compute capability", e))?,
        total_mem_bytes: ctx
            .total_mem()
            .map_err(|e| driver_error("total memory", e))?,
        device_count: CudaContext::device_count()
            .map_err(|e| driver_error("counting devices", e))?
            .max(1) as usize,
    })
}

/// Names the failed call and the CUresult code; `DriverError`'s own Debug would make another
/// driver call (cuGetErrorString).
pub(super) fn driver_error(what: &str, e: DriverError) -> BackendError {
    BackendError::Device(format!("{what}: {:?} (CUresult {})", e.0, e.0 as u32))
}

/// A launch failure as a `BackendError::Device` naming the kernel and the code.
pub(super) fn launch_error(kernel: Kernel, e: DriverError) -> BackendError {
    driver_error(&format!("launching {}", kernel.name), e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_table_matches_build() {
        for m in MODULES {
            assert_eq!(
                BUILT_WITH_NVCC,
                !m.fatbin.is_empty(),
                "kernels/{}.cu",
                m.family
            );
        }
    }

    /// On a machine with no GPU, probe must fail cleanly; where a GPU is present it is sm_80 or
    /// newer.
    #[test]
    fn probe_without_gpu_is_an_error_not_a_panic() {
        match probe() {
            Err(BackendError::Device(msg)) => {
                println!("probe: {msg}");
                assert!(
                    msg.contains("without nvcc")
                        || msg.contains("libcuda")
                        || msg.contains("CUDA_ERROR_NO_DEVICE"),
                    "unexpected probe error: {msg}"
                );
            }
            Err(BackendError::Arch(e)) => println!("probe: {e}"),
            Err(other) => panic!("probe returned a non-device error: {other}"),
            Ok(info) => {
                println!("probe: {info:?}");
                assert!(
                    info.compute_capability >= MIN_COMPUTE_CAPABILITY,
                    "{info:?}"
                );
            }
        }
    }
}
