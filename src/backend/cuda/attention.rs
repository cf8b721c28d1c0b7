//! Launchers for causal attention with grouped KV heads (`attention_gqa_forward/backward`; the
//! multi-head `attention_forward/backward` are the case NKV = NH, same kernels, same results):
//! the tensor-core kernels of `kernels/attention_mma.cu` for head sizes 32 and 64 (forward
//! saving an fp32 lse; backward: D = dout . out, then dq per query head, then dk and dv per
//! key/value head, summed over its group), and the CUDA-core kernels of `kernels/attention.cu`
//! for any other head size. Both take rows holding several packed examples (`starts`, checked
//! on its host copy).

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

/// Grid of the tensor-core kernels: one block of 128 threads per 64 rows, per `heads` =
/// (batch, query head) or, for dk and dv, (batch, key/value head).
fn mma_config(t: usize, heads: u32, shared_mem_bytes: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (t.div_ceil(MMA_ROWS) as u32, heads, 1),
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

/// The CUDA-core kernels' launch over `heads` = B*NH (or B*NKV for dk and dv): one warp per
/// row, [`ROWS`] rows per block.
fn rows_config(t: usize, heads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (t.div_ceil(ROWS) as u32, heads, 1),
        block_dim: ((ROWS * 32) as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Heads (NKV dividing NH dividing C, checked by the caller's shape rule), the head size and the
/// 32-bit sizes; returns (B*NH, B*NKV, 1/sqrt(hs)).
fn setup(
    op: &'static str,
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
    nkv: usize,
) -> Result<(u32, u32, f32)> {
    let (hs, bh) = head_limits(op, b, c, nh, MAX_HEAD_SIZE)?;
    as_i32(op, "T", t)?;
    as_i32(op, "the qkv row width (NH+2*NKV)*hs", (nh + 2 * nkv) * hs)?;
    let bkv = (b * nkv) as u32; // <= B*NH
    Ok((bh, bkv, (1.0 / (hs as f64).sqrt()) as f32))
}

/// `attention_gqa_forward` (and `attention_forward`, NKV = NH, under its own `op` name, whose
/// rule the caller checked: the lengths are the same).
#[allow(clippy::too_many_arguments)]
pub(super) fn forward(
    be: &CudaBackend,
    op: &'static str,
    out: &mut CudaBuf,
    lse: &mut CudaBuf,
    qkv: &CudaBuf,
    starts: Option<&CudaIds>,
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
    nkv: usize,
) -> Result<()> {
    shapes::attention_gqa_forward(out, lse, qkv, b, t, c, nh, nkv)?;
    let (bh, _, scale) = setup(op, b, t, c, nh, nkv)?;
    shapes::attention_starts(op, starts.map(|s| s.host.as_slice()), b, t)?;
    if b * t * c == 0 {
        return Ok(());
    }
    let (o, l) = (out.bf16_mut(op, "out")?, lse.f32_mut(op, "lse")?);
    let x = qkv.bf16(op, "qkv")?;
    let (t_, c_, nh_, nkv_) = (t as i32, c as i32, nh as i32, nkv as i32);
    if let Some(mma) = mma_kernels(be.options.attention, c, nh) {
        let kernel = mma.forward;
        let f = be.function(kernel)?;
        let mut args = be.stream.launch_builder(f);
        args.arg(o).arg(l).arg(x);
        push_starts(&mut args, starts);
        args.arg(&t_).arg(&c_).arg(&nh_).arg(&nkv_).arg(&scale);
        // SAFETY: qkv holds B*T*(NH+2*NKV)*hs bf16 with NKV dividing NH, out B*T*C bf16, lse
        // B*NH*T fp32, starts (when not null) B*T ints forming contiguous examples (checked);
        // hs is the kernel's (32 or 64), so every head's columns and the row width are
        // multiples of 8 and its 16-byte row loads stay aligned and in bounds. Grid
        // (ceil(T/64), B*NH), 128 threads, static shared memory only.
        unsafe { args.launch(mma_config(t, bh, 0)) }.map_err(|e| launch_error(kernel, e))?;
        return Ok(());
    }
    let kernel = cuda_cores::ATTENTION_FORWARD_BF16;
    let f = be.function(kernel)?;
    let mut args = be.stream.launch_builder(f);
    args.arg(o).arg(l).arg(x);
    push_starts(&mut args, starts);
    args.arg(&t_).arg(&c_).arg(&nh_).arg(&nkv_).arg(&scale);
    // SAFETY: qkv holds B*T*(NH+2*NKV)*hs bf16 with NKV dividing NH, out B*T*C, lse B*NH*T
    // fp32, starts (when not null) B*T ints forming contiguous examples (checked); grid
    // (ceil(T/8), B*NH) with 256 threads as the kernel expects; hs <= 128 fits its shared
    // tiles; arguments match (bf16*, float*, const bf16*, const int*, int x 4, float).
    unsafe { args.launch(rows_config(t, bh)) }.map_err(|e| launch_error(kernel, e))?;
    Ok(())
}

/// `attention_gqa_backward` (and `attention_backward` under its own `op` name, as `forward`).
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    be: &CudaBackend,
    op: &'static str,
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
    nkv: usize,
) -> Result<()> {
    shapes::attention_gqa_backward(dqkv, dout, qkv, out, lse, b, t, c, nh, nkv)?;
    let (bh, bkv, scale) = setup(op, b, t, c, nh, nkv)?;
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
    let (t_, c_, nh_, nkv_) = (t as i32, c as i32, nh as i32, nkv as i32);
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
        // dq: one block per (query tile, B*NH); dk, dv: one per (key tile, B*NKV).
        for (kernel, heads) in [(mma.dq, bh), (mma.dkv, bkv)] {
            let f = be.function(kernel)?;
            let mut args = be.stream.launch_builder(f);
            args.arg(&mut *dx).arg(l).arg(&dvec).arg(dy).arg(x);
            push_starts(&mut args, starts);
            args.arg(&t_).arg(&c_).arg(&nh_).arg(&nkv_).arg(&scale);
            // SAFETY: dqkv and qkv hold B*T*(NH+2*NKV)*hs bf16, dout B*T*C bf16, lse and dvec
            // B*NH*T fp32, starts as in the forward (checked); alignment as in the forward;
            // dynamic shared memory as the kernel expects (opted in when the backend opened).
            // The dq kernel writes only the query columns of dqkv and the dkv kernel only the
            // key and value columns, each element by one thread (a key/value head's block sums
            // its whole group); the two run in stream order.
            let cfg = mma_config(t, heads, mma.backward_smem);
            unsafe { args.launch(cfg) }.map_err(|e| launch_error(kernel, e))?;
        }
        return Ok(());
    }
    let dims = AttentionDims {
        b,
        t,
        nh,
        bh,
        bkv,
        t_,
        c_,
        nh_,
        nkv_,
        scale,
    };
    backward_cuda_cores(be, dims, (dx, l, dy, x, y), starts)
}

/// Shapes of one attention call, as the kernels take them.
#[derive(Clone, Copy)]
struct AttentionDims {
    b: usize,
    t: usize,
    nh: usize,
    /// Grid heights: B*NH and B*NKV.
    bh: u32,
    bkv: u32,
    t_: i32,
    c_: i32,
    nh_: i32,
    nkv_: i32,
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
    dims: AttentionDims,
    (dx, l, dy, x, y): BackwardBuffers,
    starts: Option<&CudaIds>,
) -> Result<()> {
    let AttentionDims {
        b,
        t,
        nh,
        bh,
        bkv,
        t_,
        c_,
        nh_,
        nkv_,
        scale,
    } = dims;
    let mut stats = be.alloc_f32(2 * b * nh * t)?;

    let kernel = cuda_cores::ATTENTION_BACKWARD_PREP_BF16;
    let f = be.function(kernel)?;
    let mut args = be.stream.launch_builder(f);
    args.arg(&mut stats).arg(dy).arg(y).arg(x).arg(l);
    push_starts(&mut args, starts);
    args.arg(&t_).arg(&c_).arg(&nh_).arg(&nkv_).arg(&scale);
    // SAFETY: stats holds 2*B*NH*T floats, the other buffers their checked lengths, starts as
    // in the forward; same grid as the forward.
    unsafe { args.launch(rows_config(t, bh)) }.map_err(|e| launch_error(kernel, e))?;

    // dq per (row tile, B*NH); dk, dv per (row tile, B*NKV), each summing its group.
    let dq_dkv = [
        (cuda_cores::ATTENTION_BACKWARD_DQ_BF16, bh),
        (cuda_cores::ATTENTION_BACKWARD_DKV_BF16, bkv),
    ];
    for (kernel, heads) in dq_dkv {
        let f = be.function(kernel)?;
        let mut args = be.stream.launch_builder(f);
        args.arg(&mut *dx).arg(&stats).arg(dy).arg(x);
        push_starts(&mut args, starts);
        args.arg(&t_).arg(&c_).arg(&nh_).arg(&nkv_).arg(&scale);
        // SAFETY: dqkv and qkv hold B*T*(NH+2*NKV)*hs bf16, dout B*T*C, stats 2*B*NH*T floats,
        // starts as in the forward; each element of dqkv is written by exactly one lane of one
        // of these two kernels (query columns by dq, key and value columns by dkv), which run
        // in stream order.
        unsafe { args.launch(rows_config(t, heads)) }.map_err(|e| launch_error(kernel, e))?;
    }
    Ok(())
}
