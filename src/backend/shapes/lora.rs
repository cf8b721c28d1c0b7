//! Shape rules of the ops LoRA adds: column-slice add and copy, and the seeded dropout.

use super::{invalid, Len};
use crate::backend::{check_len, Result};

/// Checks for `add_columns`: `y [N*OC]`, `x [N*W]`, `col + W <= OC`, `alpha` finite.
#[allow(clippy::too_many_arguments)]
pub fn add_columns<L: Len + ?Sized>(
    y: &L,
    x: &L,
    n: usize,
    oc: usize,
    col: usize,
    w: usize,
    alpha: f32,
) -> Result<()> {
    columns_for("add_columns", ["y", "x"], y, x, n, oc, col, w, alpha)
}

/// Checks for `copy_columns`: `y [N*OC]`, `out [N*W]`, `col + W <= OC`, `alpha` finite.
#[allow(clippy::too_many_arguments)]
pub fn copy_columns<L: Len + ?Sized>(
    out: &L,
    y: &L,
    n: usize,
    oc: usize,
    col: usize,
    w: usize,
    alpha: f32,
) -> Result<()> {
    columns_for("copy_columns", ["y", "out"], y, out, n, oc, col, w, alpha)
}

#[allow(clippy::too_many_arguments)]
fn columns_for<L: Len + ?Sized>(
    op: &'static str,
    names: [&'static str; 2],
    wide: &L,
    slice: &L,
    n: usize,
    oc: usize,
    col: usize,
    w: usize,
    alpha: f32,
) -> Result<()> {
    if col.checked_add(w).is_none_or(|end| end > oc) {
        return Err(invalid(
            op,
            format!("columns {col}..{col}+{w} are outside a row of OC = {oc}"),
        ));
    }
    if !alpha.is_finite() {
        return Err(invalid(op, format!("alpha {alpha} is not finite")));
    }
    check_len(op, names[0], n * oc, wide.len())?;
    check_len(op, names[1], n * w, slice.len())
}

/// Checks for `dropout_forward` / `dropout_backward` (`op`): both buffers `[n]`, `p` in `[0, 1)`.
pub fn dropout<L: Len + ?Sized>(
    op: &'static str,
    names: [&'static str; 2],
    out: &L,
    inp: &L,
    n: usize,
    p: f32,
) -> Result<()> {
    if !(0.0..1.0).contains(&p) {
        return Err(invalid(op, format!("dropout rate {p} is outside [0, 1)")));
    }
    check_len(op, names[0], n, out.len())?;
    check_len(op, names[1], n, inp.len())
}
