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
//! family (`encoder.rs` <-> `kernels/encoder.cu`, ...); `ops.rs` holds the trait impl, which
//! only forwards; this file opens the backend and loads its kernels.
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

/// Launches `$kernel` on `$be`'s stream over `$cfg` with the arguments in order, mapping a
/// failure to an error that names the kernel; evaluates to `Result<()>`. It expands to the
/// launch itself, which is unsafe: each use sits in an `unsafe` block whose `// SAFETY:` line
/// says why the arguments match the kernel and the buffers cover the grid.
macro_rules! launch {
    ($be:expr, $kernel:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let kernel: $crate::backend::cuda::kernels::Kernel = $kernel;
        let mut args = $be.stream.launch_builder($be.function(kernel)?);
        $(args.arg($arg);)+
        args.launch($cfg)
            .map(|_| ())
            .map_err(|e| $crate::backend::cuda::launch_error(kernel, e))
    }};
}

mod accumulate;
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
mod lora;
mod matmul;
mod matmul_gelu;
mod nccl;
pub mod nccl_lib;
mod ops;
mod options;
mod residual;
mod rmsnorm;
mod rope;
mod sample;
mod swiglu;

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig};
use half::bf16;

use super::{check_len, AdamWStep, BackendError, Result};
use buffer::Mem;
pub use buffer::{CudaBuf, CudaIds};
use device::{driver_error, launch_error};
pub use device::{probe, DeviceInfo, BUILT_WITH_NVCC};
use kernels::{Kernel, MODULES};
pub use nccl::{id_from_bytes, id_to_bytes, ExchangeBytes, NcclCollective, NCCL_ID_BYTES};
pub use nccl_lib::{
    check_nccl_loadable, ensure_libnccl_symlink, nccl_library_dir_hint, NcclNotFound,
};
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

/// Rows per chunk of the deterministic column sums (layernorm's dweight/dbias, matmul's dbias):
/// each chunk's partial sums, then a fixed-order reduce over the chunks.
const CHUNK_ROWS: usize = 256;

/// The partial-sums launch of a column sum: a warp-wide strip of 32 columns by 8 row lanes per
/// block, one block row per chunk of [`CHUNK_ROWS`] rows.
fn column_partials_cfg(cols: usize, chunks: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (cols.div_ceil(32) as u32, chunks as u32, 1),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    }
}

/// One thread per column, 256 to a block (the reduce over a column sum's chunks).
fn columns_cfg(cols: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (cols.div_ceil(256) as u32, 1, 1),
        block_dim: (256, 1, 1),
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

/// Host f32 values rounded to bf16 for upload.
fn to_bf16(host: &[f32]) -> Vec<bf16> {
    host.iter().map(|&x| bf16::from_f32(x)).collect()
}
