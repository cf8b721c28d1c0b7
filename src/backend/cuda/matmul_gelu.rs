//! The MLP's GELU fused into its matmuls (`Backend::matmul_gelu_forward` / `_backward`):
//! cuBLASLt's GELU_AUX(_BIAS) epilogue writes both the GELU input (`pre`, the aux matrix) and
//! its output in the fc matmul, and the DGELU epilogue multiplies the fc_proj input gradient
//! by `gelu'(pre)` as it is stored. That saves the separate GELU passes over the `N x 4C`
//! activations (two reads and a write forward, three backward).
//!
//! The epilogues need the aux leading dimension (the output width) to be a multiple of 8;
//! other shapes, a cuBLASLt without an algorithm for the epilogue, or
//! `CudaOptions::gelu_epilogue` off take the unfused path (matmul, then the kernels of
//! `kernels/gelu.cu`), which computes the same thing.

use super::matmul;
use super::{gelu, CudaBackend, CudaBuf, Result};
use crate::backend::shapes;

/// cuBLASLt's GELU aux matrix needs a leading dimension divisible by 8.
fn epilogue_fits(be: &CudaBackend, width: usize) -> bool {
    be.options.gelu_epilogue && width.is_multiple_of(8)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn forward(
    be: &CudaBackend,
    out: &mut CudaBuf,
    pre: &mut CudaBuf,
    inp: &CudaBuf,
    weight: &CudaBuf,
    bias: Option<&CudaBuf>,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<()> {
    let op = "matmul_gelu_forward";
    shapes::matmul_gelu_forward(out, pre, inp, weight, bias, n, c, oc)?;
    if n * oc > 0
        && c > 0
        && epilogue_fits(be, oc)
        && matmul::forward_with(be, op, out, Some(pre), inp, weight, bias, n, c, oc)?
    {
        return Ok(());
    }
    matmul::forward(be, pre, inp, weight, bias, n, c, oc)?;
    gelu::forward(be, out, pre, n * oc)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    be: &CudaBackend,
    dinp: &mut CudaBuf,
    dweight: Option<&mut CudaBuf>,
    dbias: Option<&mut CudaBuf>,
    dout: &CudaBuf,
    inp: &CudaBuf,
    weight: &CudaBuf,
    pre: &CudaBuf,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<()> {
    let op = "matmul_gelu_backward";
    shapes::matmul_gelu_backward(
        dinp,
        dweight.as_deref(),
        dbias.as_deref(),
        dout,
        inp,
        weight,
        pre,
        n,
        c,
        oc,
    )?;
    let fused = epilogue_fits(be, c)
        && oc > 0
        && matmul::input_grad(be, op, dinp, dout, weight, Some(pre), n, c, oc)?;
    if !fused {
        matmul::input_grad(be, op, dinp, dout, weight, None, n, c, oc)?;
        gelu::backward_in_place(be, dinp, pre, n * c)?;
    }
    matmul::weight_grads(be, op, dweight, dbias, dout, inp, n, c, oc)
}
