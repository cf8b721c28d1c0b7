//! Device buffers of the CUDA backend: [`CudaBuf`] (precision by [`Role`], see the module
//! header of `cuda/mod.rs`) with the typed views the launchers take, and [`CudaIds`].

use cudarc::driver::CudaSlice;
use half::bf16;

use super::super::{shapes, BackendError, Result, Role};

pub(super) enum Mem {
    Bf16(CudaSlice<bf16>),
    F32(CudaSlice<f32>),
    Param {
        work: CudaSlice<bf16>,
        master: CudaSlice<f32>,
    },
}

/// A device buffer; its precision follows its [`Role`] (see the module header).
pub struct CudaBuf {
    pub(super) role: Role,
    pub(super) mem: Mem,
}

impl shapes::Len for CudaBuf {
    fn len(&self) -> usize {
        CudaBuf::len(self)
    }
}

impl CudaBuf {
    pub fn role(&self) -> Role {
        self.role
    }

    pub fn len(&self) -> usize {
        match &self.mem {
            Mem::Bf16(x) => x.len(),
            Mem::F32(x) => x.len(),
            Mem::Param { master, .. } => master.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(super) fn dtype_error(&self, op: &'static str, what: &str, want: &str) -> BackendError {
        BackendError::Invalid {
            op,
            msg: format!(
                "buffer `{what}` is a {:?} buffer, this op needs {want} on the CUDA backend",
                self.role
            ),
        }
    }

    /// The bf16 data kernels read: an activation, or a parameter's working copy.
    pub(super) fn bf16(&self, op: &'static str, what: &str) -> Result<&CudaSlice<bf16>> {
        match &self.mem {
            Mem::Bf16(x) => Ok(x),
            Mem::Param { work, .. } => Ok(work),
            Mem::F32(_) => Err(self.dtype_error(op, what, "a bf16 (Activation or Param) buffer")),
        }
    }

    /// bf16 data a kernel may write: activations only (a parameter changes through AdamW).
    pub(super) fn bf16_mut(
        &mut self,
        op: &'static str,
        what: &str,
    ) -> Result<&mut CudaSlice<bf16>> {
        // A parameter whose master was released is Mem::Bf16 too, and still not writable.
        if !matches!(self.mem, Mem::Bf16(_)) || self.role == Role::Param {
            return Err(self.dtype_error(op, what, "a writable bf16 (Activation) buffer"));
        }
        match &mut self.mem {
            Mem::Bf16(x) => Ok(x),
            _ => unreachable!(),
        }
    }

    pub(super) fn f32(&self, op: &'static str, what: &str) -> Result<&CudaSlice<f32>> {
        match &self.mem {
            Mem::F32(x) => Ok(x),
            _ => Err(self.dtype_error(op, what, "an fp32 (Grad or State) buffer")),
        }
    }

    pub(super) fn f32_mut(&mut self, op: &'static str, what: &str) -> Result<&mut CudaSlice<f32>> {
        if !matches!(self.mem, Mem::F32(_)) {
            return Err(self.dtype_error(op, what, "an fp32 (Grad or State) buffer"));
        }
        match &mut self.mem {
            Mem::F32(x) => Ok(x),
            _ => unreachable!(),
        }
    }
}

/// Token ids on the device, plus the host copy they were uploaded from (the launchers check
/// id ranges and build the encoder's backward buckets from it without a download).
pub struct CudaIds {
    pub(super) dev: CudaSlice<i32>,
    pub(super) host: Vec<i32>,
}
