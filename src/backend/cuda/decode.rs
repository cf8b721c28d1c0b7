//! Launchers for `kernels/decode.cu`: the cached attention of generation (append the new keys
//! and values to the cache, then attend over it).

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::kernels::decode::{DECODE_ATTENTION_BF16, DECODE_KV_APPEND_BF16};
use super::{as_i32, attention, grid_stride, CudaBackend, CudaBuf, Result};
use crate::backend::shapes;

/// `DEC_MAX_HS` in kernels/decode.cu.
const MAX_HEAD_SIZE: usize = 128;
/// `DEC_WARPS` in kernels/decode.cu: warps per block.
const WARPS: u32 = 8;

#[allow(clippy::too_many_arguments)]
pub(super) fn attention_cached_forward(
    be: &CudaBackend,
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
    let op = "attention_cached_forward";
    shapes::attention_cached_forward(out, qkv, k_cache, v_cache, b, tn, past, tmax, c, nh)?;
    let (hs, bh) = attention::head_limits(op, b, c, nh, MAX_HEAD_SIZE)?;
    let (b_, tn_, past_) = (
        as_i32(op, "B", b)?,
        as_i32(op, "Tn", tn)?,
        as_i32(op, "past", past)?,
    );
    let (tmax_, c_, nh_) = (as_i32(op, "Tmax", tmax)?, as_i32(op, "C", c)?, nh as i32);
    as_i32(op, "3C", 3 * c)?;
    if b * tn * c == 0 {
        return Ok(());
    }
    let x = qkv.bf16(op, "qkv")?;
    let kc = k_cache.bf16_mut(op, "k_cache")?;
    let vc = v_cache.bf16_mut(op, "v_cache")?;

    let kernel = DECODE_KV_APPEND_BF16;
    // SAFETY: qkv holds B*Tn*3C bf16 and each cache B*Tmax*C with past + Tn <= Tmax (checked),
    // so every destination row past+i < Tmax; arguments match (bf16*, bf16*, const bf16*, int
    // x 5); the grid-stride loop stays below B*Tn*C.
    unsafe {
        launch!(
            be,
            kernel,
            grid_stride(b * tn * c, 256),
            &mut *kc,
            &mut *vc,
            x,
            &b_,
            &tn_,
            &past_,
            &tmax_,
            &c_
        )
    }?;

    let o = out.bf16_mut(op, "out")?;
    let scale = (1.0 / (hs as f64).sqrt()) as f32;
    let cfg = LaunchConfig {
        grid_dim: (tn as u32, bh, 1),
        block_dim: (WARPS * 32, 1, 1),
        shared_mem_bytes: 0,
    };
    let kernel = DECODE_ATTENTION_BF16;
    // SAFETY: out holds B*Tn*C bf16, qkv B*Tn*3C, the caches B*Tmax*C whose rows 0..past+Tn
    // the append kernel above wrote or earlier steps filled (stream order); grid (Tn, B*NH)
    // with 256 threads as the kernel expects; hs <= 128 fits its registers and shared arrays.
    unsafe { launch!(be, kernel, cfg, o, x, &*kc, &*vc, &tn_, &past_, &tmax_, &c_, &nh_, &scale) }?;
    Ok(())
}
