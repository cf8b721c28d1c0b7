//! Launchers for `kernels/gelu.cu`: GELU forward/backward (and in place, for
//! `matmul_gelu.rs`'s fallback), bf16.

use super::elementwise::{one_input, two_inputs};
use super::kernels::gelu::{GELU_BACKWARD_BF16, GELU_BACKWARD_IN_PLACE_BF16, GELU_FORWARD_BF16};
use super::{CudaBackend, CudaBuf, Result};
use crate::backend::shapes;

pub(super) fn forward(be: &CudaBackend, out: &mut CudaBuf, inp: &CudaBuf, n: usize) -> Result<()> {
    one_input(
        be,
        "gelu_forward",
        GELU_FORWARD_BF16,
        ["out", "inp"],
        out,
        inp,
        n,
    )
}

pub(super) fn backward(
    be: &CudaBackend,
    dinp: &mut CudaBuf,
    inp: &CudaBuf,
    dout: &CudaBuf,
    n: usize,
) -> Result<()> {
    shapes::gelu_backward(dinp, inp, dout, n)?;
    let names = ["dinp", "inp", "dout"];
    two_inputs(
        be,
        "gelu_backward",
        GELU_BACKWARD_BF16,
        names,
        dinp,
        inp,
        dout,
        n,
    )
}

/// `grad *= gelu'(pre)` over `n` bf16 elements, in place: `matmul_gelu_backward`'s unfused
/// path (whose rule, `shapes::matmul_gelu_backward`, the caller checked).
pub(super) fn backward_in_place(
    be: &CudaBackend,
    grad: &mut CudaBuf,
    pre: &CudaBuf,
    n: usize,
) -> Result<()> {
    let names = ["dinp", "pre"];
    one_input(
        be,
        "matmul_gelu_backward",
        GELU_BACKWARD_IN_PLACE_BF16,
        names,
        grad,
        pre,
        n,
    )
}
