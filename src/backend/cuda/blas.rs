//! cuBLASLt: one handle, its workspace, and [`Blas::gemm`] / [`Blas::try_gemm`], a column-major
//! GEMM with bf16 A and B, fp32 compute and scale, D bf16 or fp32, and an [`Epilogue`] (bias,
//! GELU with its auxiliary output, or GELU's derivative). The heuristic's algorithm is cached
//! per shape and epilogue, including "none" for an epilogue cuBLASLt cannot do at that shape,
//! so callers can fall back once and for all. How row-major buffers map onto these GEMMs:
//! `matmul.rs`.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use super::{driver_error, BackendError, Result};

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
pub(super) struct Gemm {
    pub(super) transa: bool,
    pub(super) transb: bool,
    pub(super) m: u64,
    pub(super) n: u64,
    pub(super) k: u64,
    pub(super) lda: i64,
    pub(super) ldb: i64,
    pub(super) ldc: i64,
    pub(super) out_f32: bool,
    pub(super) epilogue: Epilogue,
    pub(super) accumulate: bool,
}

/// What cuBLASLt does to the product before storing D.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(super) enum Epilogue {
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
    pub(super) unsafe fn gemm(
        &self,
        g: Gemm,
        a: u64,
        b: u64,
        d: u64,
        bias: Option<u64>,
    ) -> Result<()> {
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
    pub(super) unsafe fn try_gemm(
        &self,
        g: Gemm,
        a: u64,
        b: u64,
        d: u64,
        bias: Option<u64>,
        aux: Option<u64>,
    ) -> Result<bool> {
        // Looked up first: an epilogue known to have no algorithm here costs no descriptors.
        let cached = self.algos.lock().unwrap().get(&g).copied();
        if matches!(cached, Some(None)) {
            return Ok(false);
        }
        let (a_l, b_l, d_l) = layouts(&g)?;
        let desc = descriptor(&g, bias, aux)?;
        let algo = match cached {
            Some(Some(algo)) => algo,
            Some(None) => unreachable!("returned above"),
            None => match self.heuristic(g, &desc, [&a_l, &b_l, &d_l])? {
                Some(algo) => algo,
                None => return Ok(false),
            },
        };
        let err = |what| move |e| blas_error(what, e);
        let alpha = 1.0f32;
        let beta = if g.accumulate { 1.0f32 } else { 0.0f32 };
        let (ws, _ws_guard) = self.workspace.device_ptr(&self.stream);
        // SAFETY: a, b, d (and the bias and aux set in `desc`) are as the caller guarantees;
        // the workspace holds WORKSPACE_BYTES and is held by `_ws_guard` on this stream.
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

    /// Asks cuBLASLt's heuristic for `g`'s algorithm and caches the answer; `None` where an
    /// epilogue has no algorithm at this shape (the caller falls back).
    fn heuristic(
        &self,
        g: Gemm,
        desc: &Desc,
        [a_l, b_l, d_l]: [&Layout; 3],
    ) -> Result<Option<sys::cublasLtMatmulAlgo_t>> {
        let err = |what| move |e| blas_error(what, e);
        let pref = Pref(lt::create_matmul_pref().map_err(err("preference"))?);
        let size = WORKSPACE_BYTES;
        // SAFETY: `pref` is live and `size` a usize read for its size.
        unsafe {
            lt::set_matmul_pref_attribute(
                pref.0,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &size as *const usize as _,
                std::mem::size_of::<usize>(),
            )
        }
        .map_err(err("workspace preference"))?;
        // SAFETY: the handle, the descriptor, the layouts and the preference are all live.
        let found = unsafe {
            lt::get_matmul_algo_heuristic(self.handle, desc.0, a_l.0, b_l.0, d_l.0, d_l.0, pref.0)
        };
        let algo = match found {
            Ok(h) => Some(h.algo),
            // An epilogue this shape cannot take: the caller falls back.
            Err(_) if matches!(g.epilogue, Epilogue::GeluAux { .. } | Epilogue::DGelu) => None,
            Err(e) => return Err(blas_error("algorithm heuristic", e)),
        };
        self.algos.lock().unwrap().insert(g, algo);
        Ok(algo)
    }
}

/// The layouts of A, B and D (D is also C) that `g` describes.
fn layouts(g: &Gemm) -> Result<(Layout, Layout, Layout)> {
    let bf = sys::cudaDataType_t::CUDA_R_16BF;
    let out_type = if g.out_f32 {
        sys::cudaDataType_t::CUDA_R_32F
    } else {
        bf
    };
    let (a_rows, a_cols) = if g.transa { (g.k, g.m) } else { (g.m, g.k) };
    let (b_rows, b_cols) = if g.transb { (g.n, g.k) } else { (g.k, g.n) };
    let err = |what| move |e| blas_error(what, e);
    let a_l = Layout(lt::create_matrix_layout(bf, a_rows, a_cols, g.lda).map_err(err("layout A"))?);
    let b_l = Layout(lt::create_matrix_layout(bf, b_rows, b_cols, g.ldb).map_err(err("layout B"))?);
    let d_l = Layout(lt::create_matrix_layout(out_type, g.m, g.n, g.ldc).map_err(err("layout D"))?);
    Ok((a_l, b_l, d_l))
}

/// The matmul descriptor for `g`: fp32 compute and scale, the transposes, and the epilogue
/// with its bias and aux pointers (each must be given exactly when the epilogue takes it).
fn descriptor(g: &Gemm, bias: Option<u64>, aux: Option<u64>) -> Result<Desc> {
    let err = |what| move |e| blas_error(what, e);
    let desc = Desc(
        lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType_t::CUDA_R_32F,
        )
        .map_err(err("matmul descriptor"))?,
    );
    let set = |attr, ptr: *const c_void, size| {
        // SAFETY: `desc` is live, and every call below passes a pointer to a live local of
        // exactly `size` bytes, the attribute's type.
        unsafe { lt::set_matmul_desc_attribute(desc.0, attr, ptr, size) }
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
    Ok(desc)
}
