//! Launcher for `kernels/cross_entropy.cu`: fused softmax + cross-entropy, gradient in place.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{as_i32, check_len, launch_error, BackendError, CudaBackend, CudaBuf, CudaIds, Result};

pub(super) const KERNELS: &[&str] = &["cross_entropy_forward_bf16"];

#[allow(clippy::too_many_arguments)]
pub(super) fn forward(
    be: &CudaBackend,
    losses: &mut CudaBuf,
    logits: &mut CudaBuf,
    targets: &CudaIds,
    n: usize,
    v: usize,
    vp: usize,
    dloss: Option<f32>,
) -> Result<()> {
    let op = "cross_entropy";
    if v == 0 || v > vp {
        return Err(BackendError::Invalid {
            op,
            msg: format!("need 0 < V <= VP, got V = {v}, VP = {vp}"),
        });
    }
    check_len(op, "losses", n, losses.len())?;
    check_len(op, "logits", n * vp, logits.len())?;
    check_len(op, "targets", n, targets.host.len())?;
    if let Some(i) = targets.host.iter().position(|&x| x >= 0 && x as usize >= v) {
        return Err(BackendError::Invalid {
            op,
            msg: format!("target {} at row {i} is not below V = {v}", targets.host[i]),
        });
    }
    let (v_, vp_) = (as_i32(op, "V", v)?, as_i32(op, "VP", vp)?);
    let n_blocks = u32::try_from(n).map_err(|_| BackendError::Invalid {
        op,
        msg: format!("N = {n} rows is too many for one launch"),
    })?;
    if n == 0 {
        return Ok(());
    }
    let loss = losses.bf16_mut(op, "losses")?;
    let x = logits.bf16_mut(op, "logits")?;
    let has_grad = dloss.is_some() as i32;
    let scale = dloss.unwrap_or(0.0);
    let name = KERNELS[0];
    let f = be.function(name)?;
    let cfg = LaunchConfig {
        grid_dim: (n_blocks, 1, 1),
        block_dim: (512, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: one block per row; losses holds N bf16, logits N*VP bf16, targets N ints each
    // below V (checked on the host copy); arguments match (bf16*, bf16*, const int*, int, int,
    // int, float); block size 512 is a multiple of 32 as block_reduce_* requires.
    unsafe {
        be.stream
            .launch_builder(f)
            .arg(loss)
            .arg(x)
            .arg(&targets.dev)
            .arg(&v_)
            .arg(&vp_)
            .arg(&has_grad)
            .arg(&scale)
            .launch(cfg)
    }
    .map_err(|e| launch_error(name, e))?;
    Ok(())
}
