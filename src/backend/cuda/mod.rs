//! The CUDA backend: buffers, the loaded kernel functions and the [`Backend`] impl (finding the
//! device and the embedded kernels lives in `device.rs`).
//!
//! `build.rs` compiles every `kernels/<family>.cu` into a fatbin (sm_90 SASS + compute_90 PTX)
//! and embeds it; [`kernels`] names every module and kernel function (a launcher names its
//! kernel, e.g. `kernels::layernorm::LAYERNORM_FORWARD_BF16`). A build without nvcc has the
//! same names, no fatbins, and is CPU-only.
//! The CUDA driver is opened at run time (cudarc `dynamic-loading`), so [`probe`] turns a
//! missing driver, a missing GPU or a CPU-only build into a [`BackendError::Device`], never a panic.
//!
//! [`CudaBackend`] owns one context, one stream, every kernel function (all loaded, and so
//! checked present, when it opens) and a cuBLASLt handle; [`CudaOptions`] picks its A/B
//! alternatives. Each op's launcher lives in the file named after its kernel
//! family (`encoder.rs` <-> `kernels/encoder.cu`, ...); this file holds the trait impl, which
//! only forwards.
//!
//! Precision of a [`CudaBuf`] by [`Role`] (DESIGN.md "Precision"):
//! - `Param`: a bf16 working copy (what kernels and matmuls read) plus an fp32 master copy
//!   (what AdamW updates; it rewrites the bf16 copy from it).
//! - `Activation`: bf16, and so are the activation gradients and the small per-row statistics
//!   the model allocates as activations (layernorm mean/rstd, losses); the layernorm backward
//!   recomputes its statistics in fp32 rather than trust the bf16 ones.
//! - `Grad`: fp32. Backward ops accumulate into parameter gradients over layers and
//!   micro-batches; fp32 keeps small contributions from vanishing, and AdamW reads it directly.
//! - `State`: fp32 (AdamW moments).
//! - `Stat`: fp32 (attention's saved log-sum-exp, which bf16 would spoil).

mod adamw;
mod attention;
mod blas;
mod buffer;
mod cross_entropy;
mod decode;
mod device;
mod elementwise;
mod encoder;
mod fill;
mod gelu;
mod global_norm;
pub mod kernels;
mod layernorm;
mod matmul;
mod matmul_gelu;
mod options;
mod residual;
mod sample;

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig};
use half::bf16;

use super::BackendError;
use super::{check_len, AdamWStep, Backend, LossGrad, Result, Role, SampleParams};
use buffer::Mem;
pub use buffer::{CudaBuf, CudaIds};
use device::{driver_error, launch_error};
pub use device::{probe, DeviceInfo, BUILT_WITH_NVCC};
use kernels::{Kernel, MODULES};
pub use options::{AttentionKernels, CudaOptions, ParseOptionError};

/// Grid-stride launch shape: enough blocks of `block` threads to cover `n` items, capped so
/// the grid stays a small multiple of the SM count (the kernels loop over the rest).
fn grid_stride(n: usize, block: u32) -> LaunchConfig {
    let blocks = n.div_ceil(block as usize).clamp(1, 132 * 32) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A shape argument as the `int` the kernels take.
fn as_i32(op: &'static str, what: &str, x: usize) -> Result<i32> {
    i32::try_from(x).map_err(|_| BackendError::Invalid {
        op,
        msg: format!("{what} = {x} does not fit in a 32-bit int"),
    })
}

/// The CUDA backend on one device.
pub struct CudaBackend {
    info: DeviceInfo,
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Every function of every module in [`kernels::MODULES`], by kernel name.
    functions: HashMap<&'static str, CudaFunction>,
    blas: blas::Blas,
    options: CudaOptions,
}

impl CudaBackend {
    /// Opens device `ordinal` with the default [`CudaOptions`].
    pub fn new(ordinal: usize) -> Result<Self> {
        Self::with_options(ordinal, CudaOptions::default())
    }

    /// Opens device `ordinal`, loads every embedded kernel and a cuBLASLt handle. Fails with
    /// [`BackendError::Device`] (never a panic) without a driver, a device, kernels or cuBLASLt.
    pub fn with_options(ordinal: usize, options: CudaOptions) -> Result<Self> {
        let info = probe()?;
        // SAFETY: only tries to dlopen the libcublasLt candidates and drops the handle.
        if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
            return Err(BackendError::Device(
                "cuBLASLt library libcublasLt.so not found (install the CUDA 13 cuBLAS runtime)"
                    .into(),
            ));
        }
        std::panic::catch_unwind(|| Self::open(ordinal, info, options)).unwrap_or_else(|_| {
            Err(BackendError::Device(
                "a CUDA library is missing a function topcoat needs (older than CUDA 13?)".into(),
            ))
        })
    }

    fn open(ordinal: usize, info: DeviceInfo, options: CudaOptions) -> Result<Self> {
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| driver_error(&format!("creating a context on device {ordinal}"), e))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| driver_error("creating a stream", e))?;
        let functions = load_functions(&ctx)?;
        for &(kernel, bytes) in attention::DYNAMIC_SMEM {
            let f = lookup(&functions, kernel)?;
            use cudarc::driver::sys::CUfunction_attribute_enum as Attr;
            let attr = Attr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
            f.set_attribute(attr, bytes as i32).map_err(|e| {
                driver_error(&format!("allowing {kernel} {bytes} B of shared memory"), e)
            })?;
        }
        let blas = blas::Blas::new(stream.clone())?;
        Ok(Self {
            info,
            ordinal,
            ctx,
            stream,
            functions,
            blas,
            options,
        })
    }

    /// The options it was opened with.
    pub fn options(&self) -> &CudaOptions {
        &self.options
    }

    /// The context, for callers that need raw driver calls.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The device [`probe`] found.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn function(&self, kernel: Kernel) -> Result<&CudaFunction> {
        lookup(&self.functions, kernel)
    }

    fn alloc_f32(&self, len: usize) -> Result<CudaSlice<f32>> {
        self.stream
            .alloc_zeros::<f32>(len)
            .map_err(|e| driver_error("allocating device memory", e))
    }

    fn alloc_bf16(&self, len: usize) -> Result<CudaSlice<bf16>> {
        self.stream
            .alloc_zeros::<bf16>(len)
            .map_err(|e| driver_error("allocating device memory", e))
    }

    fn htod<T: cudarc::driver::DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.stream
            .clone_htod(host)
            .map_err(|e| driver_error("copying to the device", e))
    }
}

/// Loads every module of [`MODULES`] and every function in it: a fatbin missing from this
/// build or a function missing from its fatbin is an error here, not at the first launch.
fn load_functions(ctx: &Arc<CudaContext>) -> Result<HashMap<&'static str, CudaFunction>> {
    let mut functions = HashMap::new();
    for m in MODULES {
        let family = m.family;
        if m.fatbin.is_empty() {
            return Err(BackendError::Device(format!(
                "kernels/{family}.cu is not in this build"
            )));
        }
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(m.fatbin.to_vec()))
            .map_err(|e| driver_error(&format!("loading kernels/{family}.cu"), e))?;
        for k in m.kernels {
            let f = module
                .load_function(k.name)
                .map_err(|e| driver_error(&format!("finding {k} in {family}.cu"), e))?;
            functions.insert(k.name, f);
        }
    }
    Ok(functions)
}

fn lookup<'a>(
    functions: &'a HashMap<&'static str, CudaFunction>,
    kernel: Kernel,
) -> Result<&'a CudaFunction> {
    functions
        .get(kernel.name)
        .ok_or_else(|| BackendError::Device(format!("kernel {kernel} was not loaded")))
}

fn to_bf16(host: &[f32]) -> Vec<bf16> {
    host.iter().map(|&x| bf16::from_f32(x)).collect()
}

impl Backend for CudaBackend {
    type Buf = CudaBuf;
    type Ids = CudaIds;

    fn name(&self) -> String {
        let label = self.options.label();
        format!("cuda:{} {}{label}", self.ordinal, self.info)
    }

    fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| driver_error("synchronizing the stream", e))
    }

    /// Device-wide: total minus free memory (this process's buffers, cuBLASLt's workspace
    /// and the context itself), the figure `nvidia-smi` shows for the process.
    fn memory_in_use(&self) -> Option<usize> {
        self.ctx
            .mem_get_info()
            .ok()
            .map(|(free, total)| total - free)
    }

    fn element_bytes(&self, role: Role) -> usize {
        match role {
            Role::Param | Role::Activation => 2,
            Role::Grad | Role::State | Role::Stat => 4,
        }
    }

    fn zeros(&self, len: usize, role: Role) -> Result<CudaBuf> {
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

    fn upload(&self, host: &[f32], role: Role) -> Result<CudaBuf> {
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

    fn write(&self, buf: &mut CudaBuf, host: &[f32]) -> Result<()> {
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
    fn download_range(&self, buf: &CudaBuf, offset: usize, len: usize) -> Result<Vec<f32>> {
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

    fn len(&self, buf: &CudaBuf) -> usize {
        buf.len()
    }

    fn fill_zero(&self, buf: &mut CudaBuf) -> Result<()> {
        match &mut buf.mem {
            Mem::Bf16(x) => fill::zero(self, x),
            Mem::F32(x) => fill::zero(self, x),
            Mem::Param { work, master } => {
                fill::zero(self, work)?;
                fill::zero(self, master)
            }
        }
    }

    fn upload_ids(&self, host: &[i32]) -> Result<CudaIds> {
        Ok(CudaIds {
            dev: self.htod(host)?,
            host: host.to_vec(),
        })
    }

    fn ids_len(&self, ids: &CudaIds) -> usize {
        ids.host.len()
    }

    fn encoder_forward(
        &self,
        out: &mut CudaBuf,
        ids: &CudaIds,
        pos: Option<&CudaIds>,
        wte: &CudaBuf,
        wpe: &CudaBuf,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()> {
        encoder::forward(self, out, ids, pos, wte, wpe, b, t, c)
    }

    fn encoder_backward(
        &self,
        dwte: &mut CudaBuf,
        dwpe: &mut CudaBuf,
        dout: &CudaBuf,
        ids: &CudaIds,
        pos: Option<&CudaIds>,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()> {
        encoder::backward(self, dwte, dwpe, dout, ids, pos, b, t, c)
    }

    fn layernorm_forward(
        &self,
        out: &mut CudaBuf,
        mean: &mut CudaBuf,
        rstd: &mut CudaBuf,
        inp: &CudaBuf,
        weight: &CudaBuf,
        bias: &CudaBuf,
        n: usize,
        c: usize,
    ) -> Result<()> {
        layernorm::forward(self, out, mean, rstd, inp, weight, bias, n, c)
    }

    fn layernorm_backward(
        &self,
        dinp: &mut CudaBuf,
        dweight: &mut CudaBuf,
        dbias: &mut CudaBuf,
        dout: &CudaBuf,
        inp: &CudaBuf,
        weight: &CudaBuf,
        mean: &CudaBuf,
        rstd: &CudaBuf,
        n: usize,
        c: usize,
    ) -> Result<()> {
        layernorm::backward(
            self, dinp, dweight, dbias, dout, inp, weight, mean, rstd, n, c,
        )
    }

    fn residual_layernorm_forward(
        &self,
        residual: &mut CudaBuf,
        out: &mut CudaBuf,
        mean: &mut CudaBuf,
        rstd: &mut CudaBuf,
        a: &CudaBuf,
        b: &CudaBuf,
        weight: &CudaBuf,
        bias: &CudaBuf,
        n: usize,
        c: usize,
    ) -> Result<()> {
        layernorm::residual_layernorm_forward(
            self, residual, out, mean, rstd, a, b, weight, bias, n, c,
        )
    }

    fn residual_forward(
        &self,
        out: &mut CudaBuf,
        a: &CudaBuf,
        b: &CudaBuf,
        n: usize,
    ) -> Result<()> {
        residual::forward(self, out, a, b, n)
    }

    fn gelu_forward(&self, out: &mut CudaBuf, inp: &CudaBuf, n: usize) -> Result<()> {
        gelu::forward(self, out, inp, n)
    }

    fn gelu_backward(
        &self,
        dinp: &mut CudaBuf,
        inp: &CudaBuf,
        dout: &CudaBuf,
        n: usize,
    ) -> Result<()> {
        gelu::backward(self, dinp, inp, dout, n)
    }

    fn matmul_forward(
        &self,
        out: &mut CudaBuf,
        inp: &CudaBuf,
        weight: &CudaBuf,
        bias: Option<&CudaBuf>,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        matmul::forward(self, out, inp, weight, bias, n, c, oc)
    }

    fn matmul_backward(
        &self,
        dinp: &mut CudaBuf,
        dweight: &mut CudaBuf,
        dbias: Option<&mut CudaBuf>,
        dout: &CudaBuf,
        inp: &CudaBuf,
        weight: &CudaBuf,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        matmul::backward(self, dinp, dweight, dbias, dout, inp, weight, n, c, oc)
    }

    fn matmul_gelu_forward(
        &self,
        out: &mut CudaBuf,
        pre: &mut CudaBuf,
        inp: &CudaBuf,
        weight: &CudaBuf,
        bias: Option<&CudaBuf>,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        matmul_gelu::forward(self, out, pre, inp, weight, bias, n, c, oc)
    }

    fn matmul_gelu_backward(
        &self,
        dinp: &mut CudaBuf,
        dweight: &mut CudaBuf,
        dbias: Option<&mut CudaBuf>,
        dout: &CudaBuf,
        inp: &CudaBuf,
        weight: &CudaBuf,
        pre: &CudaBuf,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        matmul_gelu::backward(self, dinp, dweight, dbias, dout, inp, weight, pre, n, c, oc)
    }

    fn attention_forward(
        &self,
        out: &mut CudaBuf,
        lse: &mut CudaBuf,
        qkv: &CudaBuf,
        starts: Option<&CudaIds>,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    ) -> Result<()> {
        attention::forward(self, out, lse, qkv, starts, b, t, c, nh)
    }

    fn attention_backward(
        &self,
        dqkv: &mut CudaBuf,
        dout: &CudaBuf,
        qkv: &CudaBuf,
        out: &CudaBuf,
        lse: &CudaBuf,
        starts: Option<&CudaIds>,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    ) -> Result<()> {
        attention::backward(self, dqkv, dout, qkv, out, lse, starts, b, t, c, nh)
    }

    fn cross_entropy(
        &self,
        losses: &mut CudaBuf,
        logits: &mut CudaBuf,
        targets: &CudaIds,
        n: usize,
        v: usize,
        vp: usize,
        grad: LossGrad<'_, CudaBuf>,
    ) -> Result<()> {
        cross_entropy::forward(self, losses, logits, targets, n, v, vp, grad)
    }

    fn adamw(
        &self,
        param: &mut CudaBuf,
        grad: &CudaBuf,
        m: &mut CudaBuf,
        v: &mut CudaBuf,
        hp: &AdamWStep,
    ) -> Result<()> {
        adamw::update(self, param, grad, m, v, hp)
    }

    fn global_norm(&self, bufs: &[&CudaBuf]) -> Result<f32> {
        global_norm::global_norm(self, bufs)
    }

    fn attention_cached_forward(
        &self,
        out: &mut CudaBuf,
        qkv: &CudaBuf,
        k_cache: &mut CudaBuf,
        v_cache: &mut CudaBuf,
        b: usize,
        tn: usize,
        past: usize,
        tmax: usize,
        c: usize,
        nh: usize,
    ) -> Result<()> {
        decode::attention_cached_forward(self, out, qkv, k_cache, v_cache, b, tn, past, tmax, c, nh)
    }

    fn sample_tokens(
        &self,
        logits: &CudaBuf,
        n: usize,
        v: usize,
        vp: usize,
        params: &SampleParams,
        uniforms: &[f32],
    ) -> Result<Vec<u32>> {
        sample::sample_tokens(self, logits, n, v, vp, params, uniforms)
    }
}
