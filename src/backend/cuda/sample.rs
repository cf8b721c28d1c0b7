//! Launcher for `kernels/sample.cu`: one token per row of logits (temperature, top-k, top-p)
//! drawn on the device with host-supplied uniforms; only the `N` token ids come back.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::kernels::sample::SAMPLE_TOKENS_BF16;
use super::{as_i32, driver_error, CudaBackend, CudaBuf, Result};
use crate::backend::{shapes, BackendError, SampleParams};

/// `SAMPLE_THREADS` in kernels/sample.cu.
const THREADS: u32 = 1024;

pub(super) fn sample_tokens(
    be: &CudaBackend,
    logits: &CudaBuf,
    n: usize,
    v: usize,
    vp: usize,
    params: &SampleParams,
    uniforms: &[f32],
) -> Result<Vec<u32>> {
    let op = "sample_tokens";
    shapes::sample_tokens(logits, n, v, vp, params, uniforms)?;
    let (v_, vp_) = (as_i32(op, "V", v)?, as_i32(op, "VP", vp)?);
    let rows = u32::try_from(n).map_err(|_| BackendError::Invalid {
        op,
        msg: format!("N = {n} rows is too many for one launch"),
    })?;
    if n == 0 {
        return Ok(Vec::new());
    }
    // top_k >= V keeps every token, as 0 does; this also keeps it inside an int.
    let top_k = if params.top_k >= v {
        0
    } else {
        params.top_k as i32
    };
    let x = logits.bf16(op, "logits")?;
    let u = be.htod(uniforms)?;
    let mut tokens = be
        .stream
        .alloc_zeros::<i32>(n)
        .map_err(|e| driver_error("allocating device memory", e))?;
    let kernel = SAMPLE_TOKENS_BF16;
    let cfg = LaunchConfig {
        grid_dim: (rows, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: one block per row; logits holds N*VP bf16 with V <= VP, uniforms and tokens N
    // each (checked); arguments match (int*, const bf16*, const float*, int, int, float, int,
    // float); 1024 threads is a multiple of 32 as the block reductions require.
    unsafe {
        launch!(
            be,
            kernel,
            cfg,
            &mut tokens,
            x,
            &u,
            &v_,
            &vp_,
            &params.temperature,
            &top_k,
            &params.top_p
        )
    }?;
    let host = be
        .stream
        .clone_dtoh(&tokens)
        .map_err(|e| driver_error("copying from the device", e))?;
    host.into_iter()
        .enumerate()
        .map(|(i, t)| {
            u32::try_from(t)
                .ok()
                .filter(|&t| (t as usize) < v)
                .ok_or_else(|| {
                    BackendError::Device(format!(
                        "{kernel}: row {i} drew token {t}, outside [0, {v})"
                    ))
                })
        })
        .collect()
}
