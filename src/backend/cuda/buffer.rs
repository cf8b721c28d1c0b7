//! Device buffers of the CUDA backend: [`CudaBuf`] (precision by [`Role`], see the module
//! header of `cuda/mod.rs`) with the typed views the launchers take, [`CudaIds`], and the
//! allocation and copies behind the Backend impl's `zeros`, `upload`, `write` and
//! `download_range`.

use cudarc::driver::CudaSlice;
use half::bf16;

use super::super::{check_len, shapes, BackendError, Result, Role};
use super::{driver_error, fill, to_bf16, CudaBackend};

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

    /// Drops the fp32 master of a parameter: the buffer keeps its role and its bf16 working
    /// copy (`Mem::Bf16`), which kernels read, `download` widens and `write` rounds into.
    pub(super) fn release_master(&mut self) {
        if let Mem::Param { work, .. } = &self.mem {
            let work = work.clone();
            self.mem = Mem::Bf16(work);
        }
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

impl CudaBackend {
    pub(super) fn zeros_buf(&self, len: usize, role: Role) -> Result<CudaBuf> {
        let mem = match role {
            Role::Param => Mem::Param {
                work: self.alloc_bf16(len)?,
                master: self.alloc_f32(len)?,
            },
            Role::Activation => Mem::Bf16(self.alloc_bf16(len)?),
            Role::Grad | Role::State | Role::Stat => Mem::F32(self.alloc_f32(len)?),
        };
        Ok(CudaBuf { role, mem })
    }

    pub(super) fn upload_buf(&self, host: &[f32], role: Role) -> Result<CudaBuf> {
        let mem = match role {
            Role::Param => Mem::Param {
                work: self.htod(&to_bf16(host))?,
                master: self.htod(host)?,
            },
            Role::Activation => Mem::Bf16(self.htod(&to_bf16(host))?),
            Role::Grad | Role::State | Role::Stat => Mem::F32(self.htod(host)?),
        };
        Ok(CudaBuf { role, mem })
    }

    pub(super) fn write_buf(&self, buf: &mut CudaBuf, host: &[f32]) -> Result<()> {
        check_len("write", "host", buf.len(), host.len())?;
        let copy = |e| driver_error("copying to the device", e);
        match &mut buf.mem {
            Mem::Bf16(x) => self.stream.memcpy_htod(&to_bf16(host), x).map_err(copy),
            Mem::F32(x) => self.stream.memcpy_htod(host, x).map_err(copy),
            Mem::Param { work, master } => {
                self.stream
                    .memcpy_htod(&to_bf16(host), work)
                    .map_err(copy)?;
                self.stream.memcpy_htod(host, master).map_err(copy)
            }
        }
    }

    /// A parameter downloads its fp32 master copy.
    pub(super) fn download_buf(
        &self,
        buf: &CudaBuf,
        offset: usize,
        len: usize,
    ) -> Result<Vec<f32>> {
        let end = offset.saturating_add(len);
        if end > buf.len() {
            return Err(BackendError::Shape {
                op: "download_range",
                what: "buf",
                expected: end,
                found: buf.len(),
            });
        }
        let copy = |e| driver_error("copying from the device", e);
        match &buf.mem {
            Mem::Bf16(x) => {
                let host = self
                    .stream
                    .clone_dtoh(&x.slice(offset..end))
                    .map_err(copy)?;
                Ok(host.into_iter().map(f32::from).collect())
            }
            Mem::F32(x) | Mem::Param { master: x, .. } => {
                self.stream.clone_dtoh(&x.slice(offset..end)).map_err(copy)
            }
        }
    }

    /// `Backend::copy_range`: one device-to-device copy on the stream, bf16 to bf16 (the
    /// source an activation or a parameter's working copy) or fp32 to fp32.
    pub(super) fn copy_range_buf(
        &self,
        dst: &mut CudaBuf,
        dst_offset: usize,
        src: &CudaBuf,
        src_offset: usize,
        len: usize,
    ) -> Result<()> {
        let op = "copy_range";
        shapes::copy_range(dst, dst_offset, src, src_offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let copy = |e| driver_error("copying on the device", e);
        let (s, d) = (src_offset..src_offset + len, dst_offset..dst_offset + len);
        if matches!(src.mem, Mem::F32(_)) {
            let x = src.f32(op, "src")?.slice(s);
            let mut y = dst.f32_mut(op, "dst")?.slice_mut(d);
            self.stream.memcpy_dtod(&x, &mut y).map_err(copy)
        } else {
            let x = src.bf16(op, "src")?.slice(s);
            let mut y = dst.bf16_mut(op, "dst")?.slice_mut(d);
            self.stream.memcpy_dtod(&x, &mut y).map_err(copy)
        }
    }

    pub(super) fn fill_zero_buf(&self, buf: &mut CudaBuf) -> Result<()> {
        match &mut buf.mem {
            Mem::Bf16(x) => fill::zero(self, x),
            Mem::F32(x) => fill::zero(self, x),
            Mem::Param { work, master } => {
                fill::zero(self, work)?;
                fill::zero(self, master)
            }
        }
    }
}
