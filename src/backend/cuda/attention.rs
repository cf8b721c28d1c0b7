//! Launchers for `kernels/attention.cu`: causal attention forward (saves lse) and the
//! three-kernel deterministic backward (prep: fp32 lse and D; dq; dk and dv), plain causal or
//! restricted to the examples packed into each row (`starts`, checked on its host copy).

use cudarc::driver::{LaunchArgs, LaunchConfig, PushKernelArg};

use super::{as_i32, launch_error, BackendError, CudaBackend, CudaBuf, CudaIds, Result};
use crate::backend::shapes;

pub(super) const KERNELS: &[&str] = &[
    "attention_forward_bf16",
    "attention_backward_prep_bf16",
    "attention_backward_dq_bf16",
    "attention_backward_dkv_bf16",
];

/// `ATT_MAX_HS` in kernels/attention.cu.
const MAX_HEAD_SIZE: usize = 128;
/// `ATT_ROWS` in kernels/attention.cu: rows (one warp each) per block.
const ROWS: usize = 8;

/// A null device pointer: the kernels' `starts` argument for plain causal attention.
const NO_STARTS: u64 = 0;

/// Pushes the kernels' `starts` argument: the device copy, or a null pointer.
fn push_starts<'a>(args: &mut LaunchArgs<'a>, starts: Option<&'a CudaIds>) {
    match starts {
        Some(s) => args.arg(&s.dev),
        None => args.arg(&NO_STARTS),
    };
}

/// Checks heads and the head size; returns (launch config, 1/sqrt(hs)).
fn setup(op: &'static str, b: usize, t: usize, c: usize, nh: usize) -> Result<(LaunchConfig, f32)> {
    if nh == 0 || c % nh != 0 {
        return Err(BackendError::Invalid {
            op,
            msg: format!("C = {c} is not a multiple of NH = {nh}"),
        });
    }
    let hs = c / nh;
    if hs > MAX_HEAD_SIZE {
        return Err(BackendError::Invalid {
            op,
            msg: format!("head size {hs} is above the kernel's maximum {MAX_HEAD_SIZE}"),
        });
    }
    as_i32(op, "T", t)?;
    as_i32(op, "3C", 3 * c)?;
    let bh = u32::try_from(b * nh)
        .ok()
        .filter(|&x| x <= 65535)
        .ok_or_else(|| BackendError::Invalid {
            op,
            msg: format!("B*NH = {} is above the grid's y limit 65535", b * nh),
        })?;
    let cfg = LaunchConfig {
        grid_dim: (t.div_ceil(ROWS) as u32, bh, 1),
        block_dim: ((ROWS * 32) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    Ok((cfg, (1.0 / (hs as f64).sqrt()) as f32))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn forward(
    be: &CudaBackend,
    out: &mut CudaBuf,
    lse: &mut CudaBuf,
    qkv: &CudaBuf,
    starts: Option<&CudaIds>,
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) -> Result<()> {
    let op = "attention_forward";
    let (cfg, scale) = setup(op, b, t, c, nh)?;
    shapes::attention_forward(out.len(), lse.len(), qkv.len(), b, t, c, nh)?;
    shapes::attention_starts(op, starts.map(|s| s.host.as_slice()), b, t)?;
    if b * t * c == 0 {
        return Ok(());
    }
    let (o, l) = (out.bf16_mut(op, "out")?, lse.bf16_mut(op, "lse")?);
    let x = qkv.bf16(op, "qkv")?;
    let (t_, c_, nh_) = (t as i32, c as i32, nh as i32);
    let name = KERNELS[0];
    let f = be.function(name)?;
    let mut args = be.stream.launch_builder(f);
    args.arg(o).arg(l).arg(x);
    push_starts(&mut args, starts);
    args.arg(&t_).arg(&c_).arg(&nh_).arg(&scale);
    // SAFETY: qkv holds B*T*3C bf16, out B*T*C, lse B*NH*T, starts (when not null) B*T ints
    // forming contiguous examples (checked); grid (ceil(T/8), B*NH) with 256 threads as the
    // kernel expects; hs <= 128 fits its shared tiles; arguments match (bf16*, bf16*,
    // const bf16*, const int*, int, int, int, float).
    unsafe { args.launch(cfg) }.map_err(|e| launch_error(name, e))?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    be: &CudaBackend,
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
    let op = "attention_backward";
    let (cfg, scale) = setup(op, b, t, c, nh)?;
    shapes::attention_backward(
        dqkv.len(),
        dout.len(),
        qkv.len(),
        out.len(),
        lse.len(),
        b,
        t,
        c,
        nh,
    )?;
    shapes::attention_starts(op, starts.map(|s| s.host.as_slice()), b, t)?;
    if b * t * c == 0 {
        return Ok(());
    }
    let dx = dqkv.bf16_mut(op, "dqkv")?;
    let (dy, x, y, l) = (
        dout.bf16(op, "dout")?,
        qkv.bf16(op, "qkv")?,
        out.bf16(op, "out")?,
        lse.bf16(op, "lse")?,
    );
    let (t_, c_, nh_) = (t as i32, c as i32, nh as i32);
    let mut stats = be.alloc_f32(2 * b * nh * t)?;

    let name = KERNELS[1];
    let f = be.function(name)?;
    let mut args = be.stream.launch_builder(f);
    args.arg(&mut stats).arg(dy).arg(y).arg(x).arg(l);
    push_starts(&mut args, starts);
    args.arg(&t_).arg(&c_).arg(&nh_).arg(&scale);
    // SAFETY: stats holds 2*B*NH*T floats, the other buffers their checked lengths, starts as
    // in the forward; same grid as the forward.
    unsafe { args.launch(cfg) }.map_err(|e| launch_error(name, e))?;

    for name in [KERNELS[2], KERNELS[3]] {
        let f = be.function(name)?;
        let mut args = be.stream.launch_builder(f);
        args.arg(&mut *dx).arg(&stats).arg(dy).arg(x);
        push_starts(&mut args, starts);
        args.arg(&t_).arg(&c_).arg(&nh_).arg(&scale);
        // SAFETY: dqkv and qkv hold B*T*3C bf16, dout B*T*C, stats 2*B*NH*T floats, starts as
        // in the forward; each element of dqkv is read-modified-written by exactly one lane of
        // one of these two kernels (q part by dq, k and v parts by dkv), which run in stream
        // order.
        unsafe { args.launch(cfg) }.map_err(|e| launch_error(name, e))?;
    }
    Ok(())
}
