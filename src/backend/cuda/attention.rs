//! Launchers for causal attention: the tensor-core kernels of `kernels/attention_mma.cu` for
//! head sizes 32 and 64 (forward saving an fp32 lse; backward: D = dout . out, then dq, then
//! dk and dv), and the CUDA-core kernels of `kernels/attention.cu` for any other head size.
//! Both take rows holding several packed examples (`starts`, checked on its host copy).

use cudarc::driver::{CudaSlice, LaunchArgs, LaunchConfig, PushKernelArg};
use half::bf16;

use super::kernels::{attention as cuda_cores, attention_mma as mma, Kernel};
use super::options::AttentionKernels;
use super::{as_i32, launch_error, BackendError, CudaBackend, CudaBuf, CudaIds, Result};
use crate::backend::shapes;

/// Dynamic shared memory of the dq and dkv kernels: `6 * SMEM_TILE(HS)` bf16.
const fn backward_smem_bytes(hs: usize) -> usize {
    6 * MMA_ROWS * (hs + 8) * 2
}

/// The kernels that need more than 48 KB of shared memory, with their dynamic size: the
/// backend opts each in once when it opens.
pub(super) const DYNAMIC_SMEM: &[(Kernel, usize)] = &[
    (
        mma::ATTENTION_BACKWARD_DQ_MMA32_BF16,
        backward_smem_bytes(32),
    ),
    (
        mma::ATTENTION_BACKWARD_DKV_MMA32_BF16,
        backward_smem_bytes(32),
    ),
    (
        mma::ATTENTION_BACKWARD_DQ_MMA64_BF16,
        backward_smem_bytes(64),
    ),
    (
        mma::ATTENTION_BACKWARD_DKV_MMA64_BF16,
        backward_smem_bytes(64),
    ),
];

/// `MMA_ROWS` (= `MMA_TILE`) and `MMA_THREADS` in kernels/attention_mma.cuh.
const MMA_ROWS: usize = 64;
const MMA_THREADS: u32 = 128;

/// The tensor-core kernels for one shape.
struct Mma {
    forward: Kernel,
    dq: Kernel,
    dkv: Kernel,
    /// Dynamic shared memory of the dq and dkv kernels.
    backward_smem: u32,
}

/// The tensor-core kernels for this shape, if they take it: head size 32 or 64, and C a
/// multiple of 8 so every row starts 16-byte aligned.
fn mma_kernels(which: AttentionKernels, c: usize, nh: usize) -> Option<Mma> {
    let hs = c / nh;
    let (forward, dq, dkv) = match hs {
        32 => (
            mma::ATTENTION_FORWARD_MMA32_BF16,
            mma::ATTENTION_BACKWARD_DQ_MMA32_BF16,
            mma::ATTENTION_BACKWARD_DKV_MMA32_BF16,
        ),
        64 => (
            mma::ATTENTION_FORWARD_MMA64_BF16,
            mma::ATTENTION_BACKWARD_DQ_MMA64_BF16,
            mma::ATTENTION_BACKWARD_DKV_MMA64_BF16,
        ),
        _ => return None,
    };
    (which == AttentionKernels::Mma && c.is_multiple_of(8)).then(|| Mma {
        forward,
        dq,
        dkv,
        backward_smem: backward_smem_bytes(hs) as u32,
    })
}

/// Grid of the tensor-core kernels: one block of 128 threads per 64 rows, per (batch, head).
fn mma_config(cfg: &LaunchConfig, t: usize, shared_mem_bytes: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (t.div_ceil(MMA_ROWS) as u32, cfg.grid_dim.1, 1),
        block_dim: (MMA_THREADS, 1, 1),
        shared_mem_bytes,
    }
}

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

/// The limits every attention kernel shares (training and decoding), for `NH` heads that
/// divide `C`: the head size at most the kernel's `max_hs`, and `B*NH` within the grid's y
/// limit. Returns `(hs, B*NH)`.
pub(super) fn head_limits(
    op: &'static str,
    b: usize,
    c: usize,
    nh: usize,
    max_hs: usize,
) -> Result<(usize, u32)> {
    let hs = c / nh;
    if hs > max_hs {
        return Err(BackendError::Invalid {
            op,
            msg: format!("head size {hs} is above the kernel's maximum {max_hs}"),
        });
    }
    let bh = u32::try_from(b * nh)
        .ok()
        .filter(|&x| x <= 65535)
        .ok_or_else(|| BackendError::Invalid {
            op,
            msg: format!("B*NH = {} is above the grid's y limit 65535", b * nh),
        })?;
    Ok((hs, bh))
}

/// Checks heads and the head size; returns (launch config, 1/sqrt(hs)).
fn setup(op: &'static str, b: usize, t: usize, c: usize, nh: usize) -> Result<(LaunchConfig, f32)> {
    shapes::attention_heads(op, c, nh)?;
    let (hs, bh) = head_limits(op, b, c, nh, MAX_HEAD_SIZE)?;
    as_i32(op, "T", t)?;
    as_i32(op, "3C", 3 * c)?;
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
    shapes::attention_forward(out, lse, qkv, b, t, c, nh)?;
    shapes::attention_starts(op, starts.map(|s| s.host.as_slice()), b, t)?;
    if b * t * c == 0 {
        return Ok(());
    }
    let (o, l) = (out.bf16_mut(op, "out")?, lse.f32_mut(op, "lse")?);
    let x = qkv.bf16(op, "qkv")?;
    let (t_, c_, nh_) = (t as i32, c as i32, nh as i32);
    if let Some(mma) = mma_kernels(be.options.attention, c, nh) {
        let kernel = mma.forward;
        let f = be.function(kernel)?;
        let mut args = be.stream.launch_builder(f);
        args.arg(o).arg(l).arg(x);
        push_starts(&mut args, starts);
        args.arg(&t_).arg(&c_).arg(&nh_).arg(&scale);
        // SAFETY: qkv holds B*T*3C bf16, out B*T*C bf16, lse B*NH*T fp32, starts (when not
        // null) B*T ints forming contiguous examples (checked); C is a multiple of 8 and hs is
        // the kernel's, so its 16-byte row loads stay aligned and in bounds. Grid
        // (ceil(T/64), B*NH), 128 threads, static shared memory only.
        unsafe { args.launch(mma_config(&cfg, t, 0)) }.map_err(|e| launch_error(kernel, e))?;
        return Ok(());
    }
    let kernel = cuda_cores::ATTENTION_FORWARD_BF16;
    let f = be.function(kernel)?;
    let mut args = be.stream.launch_builder(f);
    args.arg(o).arg(l).arg(x);
    push_starts(&mut args, starts);
    args.arg(&t_).arg(&c_).arg(&nh_).arg(&scale);
    // SAFETY: qkv holds B*T*3C bf16, out B*T*C, lse B*NH*T fp32, starts (when not null) B*T ints
    // forming contiguous examples (checked); grid (ceil(T/8), B*NH) with 256 threads as the
    // kernel expects; hs <= 128 fits its shared tiles; arguments match (bf16*, float*,
    // const bf16*, const int*, int, int, int, float).
    unsafe { args.launch(cfg) }.map_err(|e| launch_error(kernel, e))?;
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
    shapes::attention_backward(dqkv, dout, qkv, out, lse, b, t, c, nh)?;
    shapes::attention_starts(op, starts.map(|s| s.host.as_slice()), b, t)?;
    if b * t * c == 0 {
        return Ok(());
    }
    let dx = dqkv.bf16_mut(op, "dqkv")?;
    let (dy, x, y, l) = (
        dout.bf16(op, "dout")?,
        qkv.bf16(op, "qkv")?,
        out.bf16(op, "out")?,
        lse.f32(op, "lse")?,
    );
    let (t_, c_, nh_) = (t as i32, c as i32, nh as i32);
    if let Some(mma) = mma_kernels(be.options.attention, c, nh) {
        let rows = b * nh * t;
        let rows_ = as_i32(op, "B*NH*T", rows)?;
        let mut dvec = be.alloc_f32(rows)?;
        let kernel = mma::ATTENTION_BACKWARD_DOT_BF16;
        let dot_cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: dvec holds B*NH*T floats, dout and out B*T*C bf16 (checked); one warp per
        // (row, head), 8 per block; warps past the last row exit.
        unsafe { launch!(be, kernel, dot_cfg, &mut dvec, dy, y, &rows_, &t_, &c_, &nh_) }?;
        for kernel in [mma.dq, mma.dkv] {
            let f = be.function(kernel)?;
            let mut args = be.stream.launch_builder(f);
            args.arg(&mut *dx).arg(l).arg(&dvec).arg(dy).arg(x);
            push_starts(&mut args, starts);
            args.arg(&t_).arg(&c_).arg(&nh_).arg(&scale);
            // SAFETY: dqkv and qkv hold B*T*3C bf16, dout B*T*C bf16, lse and dvec B*NH*T
            // fp32, starts as in the forward (checked); alignment as in the forward; dynamic
            // shared memory as the kernel expects (opted in when the backend opened). The dq
            // kernel writes only the q columns of dqkv and the dkv kernel only the k and v
            // columns, each element by one thread; the two run in stream order.
            let cfg = mma_config(&cfg, t, mma.backward_smem);
            unsafe { args.launch(cfg) }.map_err(|e| launch_error(kernel, e))?;
        }
        return Ok(());
    }
    let dims = AttentionDims {
        b,
        t,
        nh,
        t_,
        c_,
        nh_,
        scale,
    };
    backward_cuda_cores(be, cfg, dims, (dx, l, dy, x, y), starts)
}

/// Shapes of one attention call, as the kernels take them.
#[derive(Clone, Copy)]
struct AttentionDims {
    b: usize,
    t: usize,
    nh: usize,
    t_: i32,
    c_: i32,
    nh_: i32,
    scale: f32,
}

/// The backward's buffers: `dqkv` (written), `lse`, `dout`, `qkv`, `out`.
type BackwardBuffers<'a> = (
    &'a mut CudaSlice<bf16>,
    &'a CudaSlice<f32>,
    &'a CudaSlice<bf16>,
    &'a CudaSlice<bf16>,
    &'a CudaSlice<bf16>,
);

/// The CUDA-core backward: per-row statistics, then the dq and the dkv kernels.
fn backward_cuda_cores(
    be: &CudaBackend,
    cfg: LaunchConfig,
    dims: AttentionDims,
    (dx, l, dy, x, y): BackwardBuffers,
    starts: Option<&CudaIds>,
) -> Result<()> {
    let AttentionDims {
        b,
        t,
        nh,
        t_,
        c_,
        nh_,
        scale,
    } = dims;
    let mut stats = be.alloc_f32(2 * b * nh * t)?;

    let kernel = cuda_cores::ATTENTION_BACKWARD_PREP_BF16;
    let f = be.function(kernel)?;
    let mut args = be.stream.launch_builder(f);
    args.arg(&mut stats).arg(dy).arg(y).arg(x).arg(l);
    push_starts(&mut args, starts);
    args.arg(&t_).arg(&c_).arg(&nh_).arg(&scale);
    // SAFETY: stats holds 2*B*NH*T floats, the other buffers their checked lengths, starts as
    // in the forward; same grid as the forward.
    unsafe { args.launch(cfg) }.map_err(|e| launch_error(kernel, e))?;

    let dq_dkv = [
        cuda_cores::ATTENTION_BACKWARD_DQ_BF16,
        cuda_cores::ATTENTION_BACKWARD_DKV_BF16,
    ];
    for kernel in dq_dkv {
        let f = be.function(kernel)?;
        let mut args = be.stream.launch_builder(f);
        args.arg(&mut *dx).arg(&stats).arg(dy).arg(x);
        push_starts(&mut args, starts);
        args.arg(&t_).arg(&c_).arg(&nh_).arg(&scale);
        // SAFETY: dqkv and qkv hold B*T*3C bf16, dout B*T*C, stats 2*B*NH*T floats, starts as
        // in the forward; each element of dqkv is read-modified-written by exactly one lane of
        // one of these two kernels (q part by dq, k and v parts by dkv), which run in stream
        // order.
        unsafe { args.launch(cfg) }.map_err(|e| launch_error(kernel, e))?;
    }
    Ok(())
}
