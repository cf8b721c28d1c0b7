//! Launchers for `kernels/lora.cu`: the column-slice add and copy of LoRA adapters and the
//! seeded dropout on their inputs (all bf16 activations).

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::kernels::lora::{LORA_ADD_COLUMNS_BF16, LORA_COPY_COLUMNS_BF16, LORA_DROPOUT_BF16};
use super::{as_i32, grid_stride, CudaBackend, CudaBuf, Result};
use crate::backend::cpu::lora::{dropout_key, dropout_scale};
use crate::backend::shapes;

/// One block of 256 threads per row, the grid capped (the kernels stride over the rest).
fn rows_cfg(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.clamp(1, 132 * 32) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The `int` shape arguments of the column kernels: `N`, `OC`, `col`, `W` (and `N*OC`, `N*W`
/// must fit the buffers, which the rule checked).
fn column_ints(op: &'static str, n: usize, oc: usize, col: usize, w: usize) -> Result<[i32; 4]> {
    Ok([
        as_i32(op, "N", n)?,
        as_i32(op, "OC", oc)?,
        as_i32(op, "col", col)?,
        as_i32(op, "W", w)?,
    ])
}

#[allow(clippy::too_many_arguments)]
pub(super) fn add_columns(
    be: &CudaBackend,
    y: &mut CudaBuf,
    x: &CudaBuf,
    n: usize,
    oc: usize,
    col: usize,
    w: usize,
    alpha: f32,
) -> Result<()> {
    let op = "add_columns";
    shapes::add_columns(y, x, n, oc, col, w, alpha)?;
    let [n_, oc_, col_, w_] = column_ints(op, n, oc, col, w)?;
    if n * w == 0 {
        return Ok(());
    }
    let (yb, xb) = (y.bf16_mut(op, "y")?, x.bf16(op, "x")?);
    // SAFETY: y holds N*OC and x N*W bf16 with col + W <= OC (the rule, above); each block
    // touches rows below N and columns col..col+W of them; arguments match
    // (bf16*, const bf16*, int, int, int, int, float).
    unsafe {
        launch!(
            be,
            LORA_ADD_COLUMNS_BF16,
            rows_cfg(n),
            yb,
            xb,
            &n_,
            &oc_,
            &col_,
            &w_,
            &alpha
        )
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn copy_columns(
    be: &CudaBackend,
    out: &mut CudaBuf,
    y: &CudaBuf,
    n: usize,
    oc: usize,
    col: usize,
    w: usize,
    alpha: f32,
) -> Result<()> {
    let op = "copy_columns";
    shapes::copy_columns(out, y, n, oc, col, w, alpha)?;
    let [n_, oc_, col_, w_] = column_ints(op, n, oc, col, w)?;
    if n * w == 0 {
        return Ok(());
    }
    let (ob, yb) = (out.bf16_mut(op, "out")?, y.bf16(op, "y")?);
    // SAFETY: out holds N*W and y N*OC bf16 with col + W <= OC (the rule, above); arguments
    // match (bf16*, const bf16*, int, int, int, int, float).
    unsafe {
        launch!(
            be,
            LORA_COPY_COLUMNS_BF16,
            rows_cfg(n),
            ob,
            yb,
            &n_,
            &oc_,
            &col_,
            &w_,
            &alpha
        )
    }
}

/// Dropout forward (`op` "dropout_forward") or backward (the same map on the gradient).
#[allow(clippy::too_many_arguments)]
pub(super) fn dropout(
    be: &CudaBackend,
    op: &'static str,
    names: [&'static str; 2],
    out: &mut CudaBuf,
    inp: &CudaBuf,
    n: usize,
    p: f32,
    seed: u64,
) -> Result<()> {
    shapes::dropout(op, names, out, inp, n, p)?;
    if n == 0 {
        return Ok(());
    }
    let (scale, key) = (dropout_scale(p), dropout_key(seed));
    let (o, x) = (out.bf16_mut(op, names[0])?, inp.bf16(op, names[1])?);
    // SAFETY: both buffers hold n bf16 (the rule, above); the kernel touches indices below n;
    // arguments match (bf16*, const bf16*, size_t, float, float, unsigned long long key).
    unsafe {
        launch!(
            be,
            LORA_DROPOUT_BF16,
            grid_stride(n, 256),
            o,
            x,
            &n,
            &p,
            &scale,
            &key
        )
    }
}
