//! Launchers for `kernels/decode.cu`: the cached attention of generation (append the new keys
//! and values to the cache, then attend over it), with grouped KV heads
//! (`attention_gqa_cached_forward`; `attention_cached_forward` is the case NKV = NH).

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::kernels::decode::{DECODE_ATTENTION_BF16, DECODE_KV_APPEND_BF16};
use super::{as_i32, attention, grid_stride, CudaBackend, CudaBuf, Result};
use crate::backend::shapes;

/// `DEC_MAX_HS` in kernels/decode.cu.
const MAX_HEAD_SIZE: usize = 128;
/// `DEC_WARPS` in kernels/decode.cu: warps per block.
const WARPS: u32 = 8;

/// `attention_gqa_cached_forward`, and `attention_cached_forward` (NKV = NH) under its own `op`
/// name, whose rule the caller checked (the lengths are the same).
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_cached_forward(
    be: &CudaBackend,
    op: &'static str,
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
    nkv: usize,
) -> Result<()> {
    shapes::attention_gqa_cached_forward(
        out, qkv, k_cache, v_cache, b, tn, past, tmax, c, nh, nkv,
    )?;
    let (hs, bh) = attention::head_limits(op, b, c, nh, MAX_HEAD_SIZE)?;
    let ckv = nkv * hs; // a cache row
    let (b_, tn_, past_) = (
        as_i32(op, "B", b)?,
        as_i32(op, "Tn", tn)?,
        as_i32(op, "past", past)?,
    );
    let (tmax_, c_, nh_, nkv_) = (
        as_i32(op, "Tmax", tmax)?,
        as_i32(op, "C", c)?,
        nh as i32,
        nkv as i32,
    );
    as_i32(op, "the qkv row width (NH+2*NKV)*hs", c + 2 * ckv)?;
    if b * tn * c == 0 {
        return Ok(());
    }
    let x = qkv.bf16(op, "qkv")?;
    let kc = k_cache.bf16_mut(op, "k_cache")?;
    let vc = v_cache.bf16_mut(op, "v_cache")?;

    let kernel = DECODE_KV_APPEND_BF16;
    // SAFETY: qkv holds B*Tn*(NH+2*NKV)*hs bf16 and each cache B*Tmax*NKV*hs with past + Tn <=
    // Tmax (checked), so every destination row past+i < Tmax; arguments match (bf16*, bf16*,
    // const bf16*, int x 7); the grid-stride loop stays below B*Tn*NKV*hs.
    unsafe {
        launch!(
            be,
            kernel,
            grid_stride(b * tn * ckv, 256),
            &mut *kc,
            &mut *vc,
            x,
            &b_,
            &tn_,
            &past_,
            &tmax_,
            &c_,
            &nh_,
            &nkv_
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
    // SAFETY: out holds B*Tn*C bf16, qkv B*Tn*(NH+2*NKV)*hs, the caches B*Tmax*NKV*hs whose rows
    // 0..past+Tn the append kernel above wrote or earlier steps filled (stream order); grid
    // (Tn, B*NH) with 256 threads as the kernel expects; hs <= 128 fits its registers and
    // shared arrays; query head h reads cache columns of head h / (NH/NKV) < NKV.
    unsafe {
        launch!(be, kernel, cfg, o, x, &*kc, &*vc, &tn_, &past_, &tmax_, &c_, &nh_, &nkv_, &scale)
    }?;
    Ok(())
}
