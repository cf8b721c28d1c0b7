//! Launcher for `kernels/cross_entropy.cu`: fused softmax + cross-entropy, gradient in place,
//! scaled uniformly or per row; losses stored as bf16 (an `Activation` buffer) or fp32 (`Grad`
//! or `State`).

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::kernels::cross_entropy::{
    CROSS_ENTROPY_FORWARD_BF16, CROSS_ENTROPY_FORWARD_BF16_F32LOSS,
};
use super::{as_i32, launch_error, BackendError, CudaBackend, CudaBuf, CudaIds, Mem, Result};
use crate::backend::{shapes, LossGrad};

#[allow(clippy::too_many_arguments)]
pub(super) fn forward(
    be: &CudaBackend,
    losses: &mut CudaBuf,
    logits: &mut CudaBuf,
    targets: &CudaIds,
    n: usize,
    v: usize,
    vp: usize,
    grad: LossGrad<'_, CudaBuf>,
) -> Result<()> {
    let op = "cross_entropy";
    let weights = match grad {
        LossGrad::PerRow(w) => Some(w),
        _ => None,
    };
    shapes::cross_entropy(losses, logits, &targets.host, weights, n, v, vp)?;
    let weights = weights.map(|w| w.f32(op, "weights")).transpose()?;
    let (v_, vp_) = (as_i32(op, "V", v)?, as_i32(op, "VP", vp)?);
    let n_blocks = u32::try_from(n).map_err(|_| BackendError::Invalid {
        op,
        msg: format!("N = {n} rows is too many for one launch"),
    })?;
    if !matches!(losses.mem, Mem::Bf16(_) | Mem::F32(_)) {
        return Err(losses.dtype_error(op, "losses", "an Activation, Grad or State buffer"));
    }
    let x = logits.bf16_mut(op, "logits")?;
    if n == 0 {
        return Ok(());
    }
    let (has_grad, scale) = match grad {
        LossGrad::None => (0i32, 0.0f32),
        LossGrad::Uniform(s) => (1, s),
        LossGrad::PerRow(_) => (1, 1.0),
    };
    // Passed for `row_weights` when there are none: the kernel then uses `scale` alone.
    let null: u64 = 0;
    let kernel = match losses.mem {
        Mem::F32(_) => CROSS_ENTROPY_FORWARD_BF16_F32LOSS,
        _ => CROSS_ENTROPY_FORWARD_BF16,
    };
    let f = be.function(kernel)?;
    let cfg = LaunchConfig {
        grid_dim: (n_blocks, 1, 1),
        block_dim: (512, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut launch = be.stream.launch_builder(f);
    match &mut losses.mem {
        Mem::Bf16(l) => launch.arg(l),
        Mem::F32(l) => launch.arg(l),
        Mem::Param { .. } => unreachable!("refused above"),
    };
    launch.arg(x).arg(&targets.dev);
    match weights {
        Some(w) => launch.arg(w),
        None => launch.arg(&null),
    };
    launch.arg(&v_).arg(&vp_).arg(&has_grad).arg(&scale);
    // SAFETY: one block per row; losses holds N values of the kernel's loss type (bf16 for
    // `_bf16`, fp32 for `_f32loss`, picked from the buffer above), logits N*VP bf16, targets N
    // ints each below V (checked on the host copy), row_weights N fp32 or null (then unread);
    // arguments match (loss*, bf16*, const int*, const float*, int, int, int, float); block
    // size 512 is a multiple of 32 as block_reduce_* requires.
    unsafe { launch.launch(cfg) }.map_err(|e| launch_error(kernel, e))?;
    Ok(())
}
