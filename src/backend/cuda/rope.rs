//! Launchers for `kernels/rope.cu`: the rotary position embedding, in place on the query and key
//! heads of `qkv` (forward) or `dqkv` (backward), one block per token row.

use cudarc::driver::{LaunchArgs, LaunchConfig, PushKernelArg};

use super::kernels::rope::{ROPE_BACKWARD_BF16, ROPE_FORWARD_BF16};
use super::{as_i32, launch_error, BackendError, CudaBackend, CudaBuf, CudaIds, Result};
use crate::backend::shapes;

/// `ROPE_MAX_HALF` in kernels/rope.cu: the cos/sin table's length, `hs / 2`.
const MAX_HALF: usize = 128;
/// Threads per block: one block per token row, striding over its (NH+NKV)*hs/2 pairs.
const THREADS: u32 = 128;
/// A null device pointer: the kernels' `pos` argument for positions `past + t`.
const NO_POS: u64 = 0;

/// The kernels' limits beyond the shape rule: `hs / 2` within the table, every position and the
/// row width within an int. Returns the launch over B*T rows.
#[allow(clippy::too_many_arguments)]
fn setup(
    op: &'static str,
    pos: Option<&CudaIds>,
    past: usize,
    b: usize,
    t: usize,
    nh: usize,
    nkv: usize,
    hs: usize,
) -> Result<LaunchConfig> {
    if hs / 2 > MAX_HALF {
        return Err(BackendError::Invalid {
            op,
            msg: format!(
                "head size {hs} is above the kernel's maximum {}",
                2 * MAX_HALF
            ),
        });
    }
    as_i32(op, "B*T", b * t)?;
    as_i32(op, "the qkv row width (NH+2*NKV)*hs", (nh + 2 * nkv) * hs)?;
    if pos.is_none() {
        as_i32(op, "past + T", past + t)?;
    }
    Ok(LaunchConfig {
        grid_dim: ((b * t) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Pushes the kernels' `pos` argument: the device copy, or a null pointer.
fn push_pos<'a>(args: &mut LaunchArgs<'a>, pos: Option<&'a CudaIds>) {
    match pos {
        Some(p) => args.arg(&p.dev),
        None => args.arg(&NO_POS),
    };
}

#[allow(clippy::too_many_arguments)]
pub(super) fn forward(
    be: &CudaBackend,
    qkv: &mut CudaBuf,
    inv_freq: &CudaBuf,
    pos: Option<&CudaIds>,
    past: usize,
    b: usize,
    t: usize,
    nh: usize,
    nkv: usize,
    hs: usize,
) -> Result<()> {
    let op = "rope_forward";
    let pos_host = pos.map(|p| p.host.as_slice());
    shapes::rope_forward(qkv, inv_freq, pos_host, b, t, nh, nkv, hs)?;
    let cfg = setup(op, pos, past, b, t, nh, nkv, hs)?;
    if b * t == 0 {
        return Ok(());
    }
    let x = qkv.bf16_mut(op, "qkv")?;
    let f = inv_freq.f32(op, "inv_freq")?;
    let (past_, t_, nh_, nkv_, hs_) = (past as i32, t as i32, nh as i32, nkv as i32, hs as i32);
    let kernel = ROPE_FORWARD_BF16;
    let mut args = be.stream.launch_builder(be.function(kernel)?);
    args.arg(x).arg(f);
    push_pos(&mut args, pos);
    args.arg(&past_).arg(&t_).arg(&nh_).arg(&nkv_).arg(&hs_);
    // SAFETY: qkv holds B*T*(NH+2*NKV)*hs bf16, inv_freq hs/2 fp32 with hs/2 <= 128 (the
    // kernel's shared table), pos (when not null) B*T non-negative ints (checked on the host
    // copy); one block per row b*T+t < B*T, each pair of a row read and written by one thread;
    // arguments match (bf16*, const float*, const int*, int x 5).
    unsafe { args.launch(cfg) }.map_err(|e| launch_error(kernel, e))?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    be: &CudaBackend,
    dqkv: &mut CudaBuf,
    inv_freq: &CudaBuf,
    pos: Option<&CudaIds>,
    b: usize,
    t: usize,
    nh: usize,
    nkv: usize,
    hs: usize,
) -> Result<()> {
    let op = "rope_backward";
    let pos_host = pos.map(|p| p.host.as_slice());
    shapes::rope_backward(dqkv, inv_freq, pos_host, b, t, nh, nkv, hs)?;
    let cfg = setup(op, pos, 0, b, t, nh, nkv, hs)?;
    if b * t == 0 {
        return Ok(());
    }
    let x = dqkv.bf16_mut(op, "dqkv")?;
    let f = inv_freq.f32(op, "inv_freq")?;
    let (t_, nh_, nkv_, hs_) = (t as i32, nh as i32, nkv as i32, hs as i32);
    let kernel = ROPE_BACKWARD_BF16;
    let mut args = be.stream.launch_builder(be.function(kernel)?);
    args.arg(x).arg(f);
    push_pos(&mut args, pos);
    args.arg(&t_).arg(&nh_).arg(&nkv_).arg(&hs_);
    // SAFETY: as the forward's, over dqkv; arguments match (bf16*, const float*, const int*,
    // int x 4).
    unsafe { args.launch(cfg) }.map_err(|e| launch_error(kernel, e))?;
    Ok(())
}
