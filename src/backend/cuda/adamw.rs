//! Launcher for `kernels/adamw.cu`: AdamW on the fp32 master copy, rewriting the bf16 copy.

use cudarc::driver::PushKernelArg;

use super::kernels::adamw::ADAMW_UPDATE_BF16;
use super::{grid_stride, AdamWStep, BackendError, CudaBackend, CudaBuf, Mem, Result};
use crate::backend::shapes;
use crate::backend::Role;

pub(super) fn update(
    be: &CudaBackend,
    param: &mut CudaBuf,
    grad: &CudaBuf,
    m: &mut CudaBuf,
    v: &mut CudaBuf,
    hp: &AdamWStep,
) -> Result<()> {
    let op = "adamw";
    shapes::adamw(param, grad, m, v, hp)?;
    let n = param.len();
    let g = grad.f32(op, "grad")?;
    let m = m.f32_mut(op, "m")?;
    let v = v.f32_mut(op, "v")?;
    if param.role == Role::Param && matches!(param.mem, Mem::Bf16(_)) {
        return Err(BackendError::Invalid {
            op,
            msg: "this parameter's fp32 master copy was released (ZeRO-1: another rank owns \
                  the tensor and updates it); only its owner may run adamw on it"
                .into(),
        });
    }
    let Mem::Param { work, master } = &mut param.mem else {
        return Err(param.dtype_error(op, "param", "a Param buffer"));
    };
    let step = hp.step.min(i32::MAX as u64) as i32;
    let b1c = 1.0 - hp.beta1.powi(step);
    let b2c = 1.0 - hp.beta2.powi(step);
    let kernel = ADAMW_UPDATE_BF16;
    // SAFETY: master, work, grad, m and v all hold `n` elements of the kernel's types
    // (fp32, bf16, fp32, fp32, fp32; checked above); the scalar list matches the signature.
    unsafe {
        launch!(
            be,
            kernel,
            grid_stride(n, 256),
            master,
            work,
            g,
            m,
            v,
            &n,
            &hp.lr,
            &hp.beta1,
            &hp.beta2,
            &hp.eps,
            &hp.weight_decay,
            &b1c,
            &b2c,
            &hp.grad_scale
        )
    }?;
    Ok(())
}
