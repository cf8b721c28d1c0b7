//! Matmuls through cuBLASLt, and the launchers for `kernels/matmul.cu` (the bias gradient).
//!
//! Row-major <-> column-major: cuBLASLt is column-major, and a row-major `[R, K]` buffer read
//! column-major is its transpose, a `K x R` matrix with leading dimension `K`. So every product
//! is computed transposed, with the operand roles chosen so no data moves:
//! - forward  `out[N,OC] = inp[N,C] W[OC,C]^T + bias`:  `out^T (OC x N) = op(W) inp^T`, where the
//!   W buffer reads as `C x OC` (transa = T) and inp as `C x N` (transb = N); m = OC, n = N,
//!   k = C; the BIAS epilogue adds `bias[m]` down each column, i.e. per output feature.
//! - dinp     `dinp[N,C] = dout[N,OC] W[OC,C]`: `dinp^T (C x N) = W^T dout^T`, the W buffer
//!   reads as `C x OC` (N), dout as `OC x N` (N); m = C, n = N, k = OC; beta = 0 (an
//!   activation gradient is overwritten, so it needs no zeroing first).
//! - dweight  `dW[OC,C] += dout^T inp`: `dW^T (C x OC) = inp^T dout`, inp reads as `C x N` (N),
//!   dout as `OC x N` (transb = T); m = C, n = OC, k = N; D fp32, beta = 1.
//!
//! A and B are bf16, compute and scale fp32. The heuristic's algorithm is cached per shape and
//! epilogue. The GELU epilogues (GELU_AUX(_BIAS) forward, DGELU backward) serve
//! `matmul_gelu.rs`; their auxiliary matrix, the GELU input, has D's shape and layout.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

use super::{as_i32, driver_error, launch_error, BackendError, CudaBackend, CudaBuf, Result};
use crate::backend::{shapes, Backend};

pub(super) const KERNELS: &[&str] = &[
    "matmul_bias_backward_partial_bf16",
    "matmul_bias_backward_reduce_f32",
];

/// Rows per chunk of the bias-gradient partial sums.
const CHUNK_ROWS: usize = 256;
/// cuBLASLt workspace (NVIDIA's recommendation for Hopper).
const WORKSPACE_BYTES: usize = 32 << 20;

fn blas_error(what: &str, e: lt::CublasError) -> BackendError {
    BackendError::Device(format!(
        "cuBLASLt {what}: {:?} (status {})",
        e.0, e.0 as u32
    ))
}

/// One GEMM's shape, in cuBLASLt's column-major terms; also the algorithm cache key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct Gemm {
    transa: bool,
    transb: bool,
    m: u64,
    n: u64,
    k: u64,
    lda: i64,
    ldb: i64,
    ldc: i64,
    out_f32: bool,
    epilogue: Epilogue,
    accumulate: bool,
}

/// What cuBLASLt does to the product before storing D.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Epilogue {
    None,
    /// `+ bias[m]` down each column.
    Bias,
    /// `aux = product (+ bias)`, `D = gelu(aux)`.
    GeluAux {
        bias: bool,
    },
    /// `D = gelu'(aux) * product`.
    DGelu,
}

/// A cuBLASLt handle, its workspace, and the algorithm chosen for each GEMM shape.
pub(super) struct Blas {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    /// `None`: the heuristic found no algorithm (an epilogue this shape cannot take).
    algos: Mutex<HashMap<Gemm, Option<sys::cublasLtMatmulAlgo_t>>>,
    stream: Arc<CudaStream>,
}

// SAFETY: the handle is only used under `&self` calls that enqueue on one stream; cuBLASLt
// handles may be shared between threads as long as calls do not race on descriptors, and every
// descriptor here is created per call.
unsafe impl Send for Blas {}
unsafe impl Sync for Blas {}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: the handle was created in `new` and is destroyed once.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

/// Destroys cuBLASLt descriptors when dropped.
struct Layout(sys::cublasLtMatrixLayout_t);
impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by create_matrix_layout, destroyed once.
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}
struct Desc(sys::cublasLtMatmulDesc_t);
impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by create_matmul_desc, destroyed once.
        let _ = unsafe { lt::destroy_matmul_desc(self.0) };
    }
}
struct Pref(sys::cublasLtMatmulPreference_t);
impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created by create_matmul_pref, destroyed once.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

impl Blas {
    pub(super) fn new(stream: Arc<CudaStream>) -> Result<Self> {
        let handle = lt::create_handle().map_err(|e| blas_error("creating a handle", e))?;
        let workspace = stream
            .alloc_zeros::<u8>(WORKSPACE_BYTES)
            .map_err(|e| driver_error("allocating the cuBLASLt workspace", e))?;
        Ok(Self {
            handle,
            workspace,
            algos: Mutex::new(HashMap::new()),
            stream,
        })
    }

    /// `D = alpha op(A) op(B) + beta D`, with D also used as C, then `g.epilogue`.
    ///
    /// # Safety
    /// See [`Blas::try_gemm`].
    unsafe fn gemm(&self, g: Gemm, a: u64, b: u64, d: u64, bias: Option<u64>) -> Result<()> {
        // SAFETY: forwarded from the caller.
        if unsafe { self.try_gemm(g, a, b, d, bias, None) }? {
            Ok(())
        } else {
            Err(BackendError::Device(format!(
                "cuBLASLt found no algorithm for {g:?}"
            )))
        }
    }

    /// As [`Blas::gemm`], with the epilogue's auxiliary matrix `aux` (the GELU input, D's
    /// shape, leading dimension `g.ldc`); `Ok(false)`, launching nothing, where cuBLASLt has
    /// no algorithm for this shape and epilogue, so the caller can fall back.
    ///
    /// # Safety
    /// `a`, `b`, `d` (and `bias`, `aux`) must be device pointers to buffers at least as large
    /// as the layouts `g` describes, of the types `g` implies (bias and aux: D's type), alive
    /// until the stream reaches this GEMM.
    unsafe fn try_gemm(
        &self,
        g: Gemm,
        a: u64,
        b: u64,
        d: u64,
        bias: Option<u64>,
        aux: Option<u64>,
    ) -> Result<bool> {
        let bf = sys::cudaDataType_t::CUDA_R_16BF;
        let out_type = if g.out_f32 {
            sys::cudaDataType_t::CUDA_R_32F
        } else {
            bf
        };
        let (a_rows, a_cols) = if g.transa { (g.k, g.m) } else { (g.m, g.k) };
        let (b_rows, b_cols) = if g.transb { (g.n, g.k) } else { (g.k, g.n) };
        let err = |what| move |e| blas_error(what, e);
        let a_l =
            Layout(lt::create_matrix_layout(bf, a_rows, a_cols, g.lda).map_err(err("layout A"))?);
        let b_l =
            Layout(lt::create_matrix_layout(bf, b_rows, b_cols, g.ldb).map_err(err("layout B"))?);
        let d_l =
            Layout(lt::create_matrix_layout(out_type, g.m, g.n, g.ldc).map_err(err("layout D"))?);
        let desc = Desc(
            lt::create_matmul_desc(
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cudaDataType_t::CUDA_R_32F,
            )
            .map_err(err("matmul descriptor"))?,
        );
        let set = |attr, ptr: *const c_void, size| {
            lt::set_matmul_desc_attribute(desc.0, attr, ptr, size)
                .map_err(err("descriptor attribute"))
        };
        let (ta, tb) = (g.transa as i32, g.transb as i32);
        use sys::cublasLtMatmulDescAttributes_t as A;
        set(A::CUBLASLT_MATMUL_DESC_TRANSA, &ta as *const i32 as _, 4)?;
        set(A::CUBLASLT_MATMUL_DESC_TRANSB, &tb as *const i32 as _, 4)?;
        use sys::cublasLtEpilogue_t as E;
        let epilogue = match g.epilogue {
            Epilogue::None => E::CUBLASLT_EPILOGUE_DEFAULT,
            Epilogue::Bias => E::CUBLASLT_EPILOGUE_BIAS,
            Epilogue::GeluAux { bias: true } => E::CUBLASLT_EPILOGUE_GELU_AUX_BIAS,
            Epilogue::GeluAux { bias: false } => E::CUBLASLT_EPILOGUE_GELU_AUX,
            Epilogue::DGelu => E::CUBLASLT_EPILOGUE_DGELU,
        };
        let wants_bias = matches!(
            g.epilogue,
            Epilogue::Bias | Epilogue::GeluAux { bias: true }
        );
        let wants_aux = matches!(g.epilogue, Epilogue::GeluAux { .. } | Epilogue::DGelu);
        if wants_bias != bias.is_some() || wants_aux != aux.is_some() {
            return Err(BackendError::Invalid {
                op: "cuBLASLt matmul",
                msg: format!("epilogue {:?} with bias {bias:?}, aux {aux:?}", g.epilogue),
            });
        }
        if epilogue != E::CUBLASLT_EPILOGUE_DEFAULT {
            set(
                A::CUBLASLT_MATMUL_DESC_EPILOGUE,
                &epilogue as *const _ as _,
                std::mem::size_of::<sys::cublasLtEpilogue_t>(),
            )?;
        }
        if let Some(bias) = bias {
            set(
                A::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                &bias as *const u64 as _,
                8,
            )?;
        }
        if let Some(aux) = aux {
            set(
                A::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER,
                &aux as *const u64 as _,
                8,
            )?;
            let aux_ld = g.ldc;
            set(
                A::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD,
                &aux_ld as *const i64 as _,
                8,
            )?;
        }
        let cached = self.algos.lock().unwrap().get(&g).copied();
        let algo = match cached {
            Some(Some(algo)) => algo,
            Some(None) => return Ok(false),
            None => {
                let pref = Pref(lt::create_matmul_pref().map_err(err("preference"))?);
                let size = WORKSPACE_BYTES;
                lt::set_matmul_pref_attribute(
                    pref.0,
                    sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    &size as *const usize as _,
                    std::mem::size_of::<usize>(),
                )
                .map_err(err("workspace preference"))?;
                let found = lt::get_matmul_algo_heuristic(
                    self.handle,
                    desc.0,
                    a_l.0,
                    b_l.0,
                    d_l.0,
                    d_l.0,
                    pref.0,
                );
                let algo = match found {
                    Ok(h) => Some(h.algo),
                    // An epilogue this shape cannot take: the caller falls back.
                    Err(_) if matches!(g.epilogue, Epilogue::GeluAux { .. } | Epilogue::DGelu) => {
                        None
                    }
                    Err(e) => return Err(blas_error("algorithm heuristic", e)),
                };
                self.algos.lock().unwrap().insert(g, algo);
                match algo {
                    Some(algo) => algo,
                    None => return Ok(false),
                }
            }
        };
        let alpha = 1.0f32;
        let beta = if g.accumulate { 1.0f32 } else { 0.0f32 };
        let (ws, _ws_guard) = self.workspace.device_ptr(&self.stream);
        lt::matmul(
            self.handle,
            desc.0,
            &alpha as *const f32 as _,
            &beta as *const f32 as _,
            a as _,
            a_l.0,
            b as _,
            b_l.0,
            d as _,
            d_l.0,
            d as _,
            d_l.0,
            &algo,
            ws as _,
            WORKSPACE_BYTES,
            self.stream.cu_stream() as _,
        )
        .map_err(err("matmul"))?;
        Ok(true)
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn forward(
    be: &CudaBackend,
    out: &mut CudaBuf,
    inp: &CudaBuf,
    weight: &CudaBuf,
    bias: Option<&CudaBuf>,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<()> {
    let op = "matmul_forward";
    shapes::matmul_forward(
        out.len(),
        inp.len(),
        weight.len(),
        bias.map(|x| x.len()),
        n,
        c,
        oc,
    )?;
    forward_with(be, op, out, None, inp, weight, bias, n, c, oc).map(|_| ())
}

/// `out = inp @ weight^T (+ bias)` (lengths checked by the caller), or with `pre` (out's
/// shape) through the GELU_AUX(_BIAS) epilogue: `pre` = that product, `out = gelu(pre)`.
/// `Ok(false)` where cuBLASLt has no algorithm for the GELU epilogue (nothing launched);
/// always `Ok(true)` without `pre`.
#[allow(clippy::too_many_arguments)]
pub(super) fn forward_with(
    be: &CudaBackend,
    op: &'static str,
    out: &mut CudaBuf,
    pre: Option<&mut CudaBuf>,
    inp: &CudaBuf,
    weight: &CudaBuf,
    bias: Option<&CudaBuf>,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<bool> {
    if n * oc == 0 {
        return Ok(true);
    }
    if c == 0 {
        // An empty sum: out is the bias (or zero); not worth a cuBLASLt special case.
        return Err(BackendError::Invalid {
            op,
            msg: "C = 0 is not supported on the CUDA backend".into(),
        });
    }
    let s = &be.stream;
    let (x, _gx) = inp.bf16(op, "inp")?.device_ptr(s);
    let (w, _gw) = weight.bf16(op, "weight")?.device_ptr(s);
    let bias_guard = match bias {
        Some(bias) => Some(bias.bf16(op, "bias")?.device_ptr(s)),
        None => None,
    };
    let epilogue = match (pre.is_some(), bias.is_some()) {
        (true, bias) => Epilogue::GeluAux { bias },
        (false, true) => Epilogue::Bias,
        (false, false) => Epilogue::None,
    };
    let aux_guard = match pre {
        Some(pre) => Some(pre.bf16_mut(op, "pre")?.device_ptr_mut(s)),
        None => None,
    };
    let (y, _gy) = out.bf16_mut(op, "out")?.device_ptr_mut(s);
    let g = Gemm {
        transa: true,
        transb: false,
        m: oc as u64,
        n: n as u64,
        k: c as u64,
        lda: c as i64,
        ldb: c as i64,
        ldc: oc as i64,
        out_f32: false,
        epilogue,
        accumulate: false,
    };
    let bias = bias_guard.as_ref().map(|(p, _)| *p);
    let aux = aux_guard.as_ref().map(|(p, _)| *p);
    // SAFETY: weight holds OC*C bf16 (C x OC, ld C), inp N*C (C x N, ld C), out and pre N*OC
    // (OC x N, ld OC), bias OC bf16 (the epilogue's default type is D's), all checked by the
    // caller; the guards keep them alive and ordered on the stream.
    unsafe { be.blas.try_gemm(g, w, x, y, bias, aux) }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    be: &CudaBackend,
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
    let op = "matmul_backward";
    shapes::matmul_backward(
        dinp.len(),
        dweight.len(),
        dbias.as_ref().map(|x| x.len()),
        dout.len(),
        inp.len(),
        weight.len(),
        n,
        c,
        oc,
    )?;
    input_grad(be, op, dinp, dout, weight, None, n, c, oc)?;
    weight_grads(be, op, dweight, dbias, dout, inp, n, c, oc)
}

/// `dinp = dout @ weight` (lengths checked by the caller), or with `pre` (D's shape) through
/// the DGELU epilogue, `dinp = gelu'(pre) * (dout @ weight)`. `Ok(false)` where cuBLASLt has
/// no DGELU algorithm for the shape (nothing launched); always `Ok(true)` without `pre`.
#[allow(clippy::too_many_arguments)]
pub(super) fn input_grad(
    be: &CudaBackend,
    op: &'static str,
    dinp: &mut CudaBuf,
    dout: &CudaBuf,
    weight: &CudaBuf,
    pre: Option<&CudaBuf>,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<bool> {
    if n == 0 || c == 0 {
        return Ok(true);
    }
    if oc == 0 {
        // An empty sum: dinp = 0 (and gelu'(pre) * 0 = 0).
        be.fill_zero(dinp)?;
        return Ok(true);
    }
    let s = &be.stream;
    let (dy, _gdy) = dout.bf16(op, "dout")?.device_ptr(s);
    let (w, _gw) = weight.bf16(op, "weight")?.device_ptr(s);
    let aux_guard = match pre {
        Some(pre) => Some(pre.bf16(op, "pre")?.device_ptr(s)),
        None => None,
    };
    let (dx, _gdx) = dinp.bf16_mut(op, "dinp")?.device_ptr_mut(s);
    let g = Gemm {
        transa: false,
        transb: false,
        m: c as u64,
        n: n as u64,
        k: oc as u64,
        lda: c as i64,
        ldb: oc as i64,
        ldc: c as i64,
        out_f32: false,
        epilogue: if pre.is_some() {
            Epilogue::DGelu
        } else {
            Epilogue::None
        },
        accumulate: false,
    };
    let aux = aux_guard.as_ref().map(|(p, _)| *p);
    // SAFETY: weight OC*C bf16 (C x OC, ld C), dout N*OC (OC x N, ld OC), dinp and pre N*C
    // bf16 (C x N, ld C), checked by the caller; the guards keep them alive and ordered.
    unsafe { be.blas.try_gemm(g, w, dy, dx, None, aux) }
}

/// Accumulates `dweight += dout^T @ inp` and `dbias += sum_rows(dout)` (lengths checked by the
/// caller).
#[allow(clippy::too_many_arguments)]
pub(super) fn weight_grads(
    be: &CudaBackend,
    op: &'static str,
    dweight: &mut CudaBuf,
    dbias: Option<&mut CudaBuf>,
    dout: &CudaBuf,
    inp: &CudaBuf,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<()> {
    let (n_, oc_) = (as_i32(op, "N", n)?, as_i32(op, "OC", oc)?);
    if n == 0 || oc == 0 || c == 0 {
        return Ok(());
    }
    let s = &be.stream;
    {
        let (dy, _gdy) = dout.bf16(op, "dout")?.device_ptr(s);
        let (x, _gx) = inp.bf16(op, "inp")?.device_ptr(s);
        let (dw, _gdw) = dweight.f32_mut(op, "dweight")?.device_ptr_mut(s);
        let g = Gemm {
            transa: false,
            transb: true,
            m: c as u64,
            n: oc as u64,
            k: n as u64,
            lda: c as i64,
            ldb: oc as i64,
            ldc: c as i64,
            out_f32: true,
            epilogue: Epilogue::None,
            accumulate: true,
        };
        // SAFETY: inp N*C bf16 (C x N, ld C), dout N*OC read as OC x N (ld OC) and transposed,
        // dweight OC*C fp32 (C x OC, ld C), checked by the caller.
        unsafe { be.blas.gemm(g, x, dy, dw, None) }?;
    }
    let Some(dbias) = dbias else {
        return Ok(());
    };
    let db = dbias.f32_mut(op, "dbias")?;
    let dy = dout.bf16(op, "dout")?;
    let chunks = n.div_ceil(CHUNK_ROWS);
    let mut partials = be.alloc_f32(chunks * oc)?;
    let name = KERNELS[0];
    let f = be.function(name)?;
    let chunk_rows = CHUNK_ROWS as i32;
    let cfg = LaunchConfig {
        grid_dim: (oc.div_ceil(32) as u32, chunks as u32, 1),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: grid (ceil(OC/32), chunks), block (32, 8) as the kernel expects; partials hold
    // chunks*OC floats, dout N*OC bf16.
    unsafe {
        be.stream
            .launch_builder(f)
            .arg(&mut partials)
            .arg(dy)
            .arg(&n_)
            .arg(&oc_)
            .arg(&chunk_rows)
            .launch(cfg)
    }
    .map_err(|e| launch_error(name, e))?;
    let name = KERNELS[1];
    let f = be.function(name)?;
    let chunks_ = chunks as i32;
    let cfg = LaunchConfig {
        grid_dim: (oc.div_ceil(256) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: dbias holds OC floats, partials chunks*OC; threads past OC exit.
    unsafe {
        be.stream
            .launch_builder(f)
            .arg(db)
            .arg(&partials)
            .arg(&chunks_)
            .arg(&oc_)
            .launch(cfg)
    }
    .map_err(|e| launch_error(name, e))?;
    Ok(())
}
