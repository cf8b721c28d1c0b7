//! Launcher for `kernels/residual.cu`: the residual add `out = a + b` (bf16).

use super::elementwise::two_inputs;
use super::kernels::residual::RESIDUAL_FORWARD_BF16;
use super::{CudaBackend, CudaBuf, Result};
use crate::backend::shapes;

pub(super) fn forward(
    be: &CudaBackend,
    out: &mut CudaBuf,
    a: &CudaBuf,
    b: &CudaBuf,
    n: usize,
) -> Result<()> {
    shapes::residual_forward(out, a, b, n)?;
    let names = ["out", "a", "b"];
    two_inputs(
        be,
        "residual_forward",
        RESIDUAL_FORWARD_BF16,
        names,
        out,
        a,
        b,
        n,
    )
}
