//! The shape rule of every op: buffer lengths against the op's shape arguments, and the
//! arguments' ranges (ids, positions, heads, steps). Each backend calls the op's rule before it
//! computes or launches anything, so the rules live in one place; a failure names the op and
//! the buffer or argument. A rule takes the op's buffers themselves (anything with a [`Len`]),
//! so each check is one call. Backend-specific limits (a kernel's maximum head size, 32-bit
//! grid sizes) stay with the backend. The rules over heads, positions and the vocabulary
//! (attention, sampling, the cross-entropy) are in `sequence.rs`; those of the Llama family's
//! embedding, RMSNorm, RoPE and SwiGLU in `llama.rs`.

use super::{check_len, AdamWStep, Backend, BackendError, Result};

/// A buffer as a shape rule sees it: its number of elements.
pub trait Len {
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Len for [f32] {
    fn len(&self) -> usize {
        <[f32]>::len(self)
    }
}

impl Len for Vec<f32> {
    fn len(&self) -> usize {
        Vec::len(self)
    }
}

/// A buffer seen through its backend's [`Backend::len`], for code written against the trait
/// (its default methods).
pub struct Of<'a, B: Backend + ?Sized>(pub &'a B, pub &'a B::Buf);

impl<B: Backend + ?Sized> Len for Of<'_, B> {
    fn len(&self) -> usize {
        self.0.len(self.1)
    }
}

pub(super) fn invalid(op: &'static str, msg: String) -> BackendError {
    BackendError::Invalid { op, msg }
}

/// Lengths for `encoder_forward`: `out [B*T*C]`, `ids [B*T]` each in `[0, V)`, `wte [V*C]`,
/// `wpe [Tmax*C]`, and `T <= Tmax` without `pos`, else `pos [B*T]` each in `[0, Tmax)`.
/// Returns `(V, Tmax)`.
#[allow(clippy::too_many_arguments)]
pub fn encoder_forward<L: Len + ?Sized>(
    out: &L,
    ids: &[i32],
    pos: Option<&[i32]>,
    wte: &L,
    wpe: &L,
    b: usize,
    t: usize,
    c: usize,
) -> Result<(usize, usize)> {
    let (op, names) = ("encoder_forward", ["out", "wte", "wpe"]);
    encoder(
        op,
        names,
        out.len(),
        ids,
        pos,
        wte.len(),
        wpe.len(),
        b,
        t,
        c,
    )
}

/// Lengths for `encoder_backward`: those of `encoder_forward`, with `dout`, `dwte`, `dwpe` in
/// place of `out`, `wte`, `wpe`. Returns `(V, Tmax)`.
#[allow(clippy::too_many_arguments)]
pub fn encoder_backward<L: Len + ?Sized>(
    dwte: &L,
    dwpe: &L,
    dout: &L,
    ids: &[i32],
    pos: Option<&[i32]>,
    b: usize,
    t: usize,
    c: usize,
) -> Result<(usize, usize)> {
    let (op, names) = ("encoder_backward", ["dout", "dwte", "dwpe"]);
    encoder(
        op,
        names,
        dout.len(),
        ids,
        pos,
        dwte.len(),
        dwpe.len(),
        b,
        t,
        c,
    )
}

/// The encoder's rule; `names` are the op's names for its (activation, wte, wpe) buffers.
#[allow(clippy::too_many_arguments)]
fn encoder(
    op: &'static str,
    names: [&'static str; 3],
    act: usize,
    ids: &[i32],
    pos: Option<&[i32]>,
    wte: usize,
    wpe: usize,
    b: usize,
    t: usize,
    c: usize,
) -> Result<(usize, usize)> {
    if c == 0 {
        return Err(invalid(op, "C must be positive".into()));
    }
    check_len(op, names[0], b * t * c, act)?;
    check_len(op, "ids", b * t, ids.len())?;
    check_len(op, names[1], wte - wte % c, wte)?;
    check_len(op, names[2], wpe - wpe % c, wpe)?;
    let (vocab, tmax) = (wte / c, wpe / c);
    match pos {
        None if t > tmax => {
            return Err(BackendError::Shape {
                op,
                what: names[2],
                expected: t * c,
                found: wpe,
            })
        }
        None => {}
        Some(pos) => {
            check_len(op, "pos", b * t, pos.len())?;
            if let Some(i) = pos.iter().position(|&p| p < 0 || p as usize >= tmax) {
                let msg = format!(
                    "position {} at index {i} is outside [0, {tmax}) (the wpe table's rows)",
                    pos[i]
                );
                return Err(invalid(op, msg));
            }
        }
    }
    if let Some(i) = ids.iter().position(|&id| id < 0 || id as usize >= vocab) {
        let msg = format!(
            "token id {} at position {i} is outside [0, {vocab})",
            ids[i]
        );
        return Err(invalid(op, msg));
    }
    Ok((vocab, tmax))
}

/// Every named buffer of an elementwise op holds exactly `n` elements.
pub(super) fn elementwise<L: Len + ?Sized>(
    op: &'static str,
    bufs: &[(&'static str, &L)],
    n: usize,
) -> Result<()> {
    bufs.iter()
        .try_for_each(|&(what, buf)| check_len(op, what, n, buf.len()))
}

/// Lengths for `residual_forward`: `out`, `a`, `b` `[n]`.
pub fn residual_forward<L: Len + ?Sized>(out: &L, a: &L, b: &L, n: usize) -> Result<()> {
    elementwise("residual_forward", &[("out", out), ("a", a), ("b", b)], n)
}

/// Lengths for `gelu_forward`: `out`, `inp` `[n]`.
pub fn gelu_forward<L: Len + ?Sized>(out: &L, inp: &L, n: usize) -> Result<()> {
    elementwise("gelu_forward", &[("out", out), ("inp", inp)], n)
}

/// Lengths for `gelu_backward`: `dinp`, `inp`, `dout` `[n]`.
pub fn gelu_backward<L: Len + ?Sized>(dinp: &L, inp: &L, dout: &L, n: usize) -> Result<()> {
    let bufs = [("dinp", dinp), ("inp", inp), ("dout", dout)];
    elementwise("gelu_backward", &bufs, n)
}

/// Checks for `adamw`: `grad`, `m`, `v` as long as `param`, and a 1-based step.
pub fn adamw<L: Len + ?Sized>(param: &L, grad: &L, m: &L, v: &L, hp: &AdamWStep) -> Result<()> {
    let op = "adamw";
    elementwise(op, &[("grad", grad), ("m", m), ("v", v)], param.len())?;
    if hp.step == 0 {
        return Err(invalid(op, "step is 1-based, got 0".into()));
    }
    Ok(())
}

/// Lengths for `residual_layernorm_forward`: `residual`, `a`, `b` `[N*C]`, then those of
/// `layernorm_forward` with `residual` as its input.
#[allow(clippy::too_many_arguments)]
pub fn residual_layernorm_forward<L: Len + ?Sized>(
    residual: &L,
    out: &L,
    mean: &L,
    rstd: &L,
    a: &L,
    b: &L,
    weight: &L,
    bias: &L,
    n: usize,
    c: usize,
) -> Result<()> {
    let op = "residual_layernorm_forward";
    elementwise(op, &[("residual", residual), ("a", a), ("b", b)], n * c)?;
    layernorm_for(op, out, mean, rstd, residual, weight, bias, n, c)
}

/// Lengths for `layernorm_forward`: `out`, `inp` `[N*C]`; `mean`, `rstd` `[N]`; `weight`,
/// `bias` `[C]`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward<L: Len + ?Sized>(
    out: &L,
    mean: &L,
    rstd: &L,
    inp: &L,
    weight: &L,
    bias: &L,
    n: usize,
    c: usize,
) -> Result<()> {
    layernorm_for(
        "layernorm_forward",
        out,
        mean,
        rstd,
        inp,
        weight,
        bias,
        n,
        c,
    )
}

/// The layernorm rule under `op`'s name (the fused residual op checks its own `inp`).
#[allow(clippy::too_many_arguments)]
fn layernorm_for<L: Len + ?Sized>(
    op: &'static str,
    out: &L,
    mean: &L,
    rstd: &L,
    inp: &L,
    weight: &L,
    bias: &L,
    n: usize,
    c: usize,
) -> Result<()> {
    elementwise(op, &[("out", out), ("inp", inp)], n * c)?;
    elementwise(op, &[("mean", mean), ("rstd", rstd)], n)?;
    elementwise(op, &[("weight", weight), ("bias", bias)], c)
}

/// Lengths for `layernorm_backward`: `dinp`, `dout`, `inp` `[N*C]`; `dweight`, `dbias`,
/// `weight` `[C]`; `mean`, `rstd` `[N]`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward<L: Len + ?Sized>(
    dinp: &L,
    dweight: Option<&L>,
    dbias: Option<&L>,
    dout: &L,
    inp: &L,
    weight: &L,
    mean: &L,
    rstd: &L,
    n: usize,
    c: usize,
) -> Result<()> {
    let op = "layernorm_backward";
    elementwise(op, &[("dinp", dinp), ("dout", dout), ("inp", inp)], n * c)?;
    elementwise(op, &[("weight", weight)], c)?;
    dweight.map_or(Ok(()), |x| check_len(op, "dweight", c, x.len()))?;
    dbias.map_or(Ok(()), |x| check_len(op, "dbias", c, x.len()))?;
    elementwise(op, &[("mean", mean), ("rstd", rstd)], n)
}

/// Lengths for `matmul_forward`: `out [N*OC]`, `inp [N*C]`, `weight [OC*C]`, `bias [OC]`.
pub fn matmul_forward<L: Len + ?Sized>(
    out: &L,
    inp: &L,
    weight: &L,
    bias: Option<&L>,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<()> {
    matmul_forward_for("matmul_forward", out, inp, weight, bias, n, c, oc)
}

/// Lengths for `matmul_gelu_forward`: `pre [N*OC]`, then those of `matmul_forward`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_gelu_forward<L: Len + ?Sized>(
    out: &L,
    pre: &L,
    inp: &L,
    weight: &L,
    bias: Option<&L>,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<()> {
    let op = "matmul_gelu_forward";
    check_len(op, "pre", n * oc, pre.len())?;
    matmul_forward_for(op, out, inp, weight, bias, n, c, oc)
}

/// The matmul forward rule under `op`'s name.
#[allow(clippy::too_many_arguments)]
fn matmul_forward_for<L: Len + ?Sized>(
    op: &'static str,
    out: &L,
    inp: &L,
    weight: &L,
    bias: Option<&L>,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<()> {
    check_len(op, "out", n * oc, out.len())?;
    check_len(op, "inp", n * c, inp.len())?;
    check_len(op, "weight", oc * c, weight.len())?;
    bias.map_or(Ok(()), |x| check_len(op, "bias", oc, x.len()))
}

/// Lengths for `matmul_backward`: `dinp`, `inp` `[N*C]`; `dweight`, `weight` `[OC*C]`;
/// `dbias [OC]`; `dout [N*OC]`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_backward<L: Len + ?Sized>(
    dinp: &L,
    dweight: Option<&L>,
    dbias: Option<&L>,
    dout: &L,
    inp: &L,
    weight: &L,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<()> {
    let op = "matmul_backward";
    matmul_backward_for(op, dinp, dweight, dbias, dout, inp, weight, n, c, oc)
}

/// Lengths for `matmul_gelu_backward`: those of `matmul_backward` plus `pre [N*C]`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_gelu_backward<L: Len + ?Sized>(
    dinp: &L,
    dweight: Option<&L>,
    dbias: Option<&L>,
    dout: &L,
    inp: &L,
    weight: &L,
    pre: &L,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<()> {
    let op = "matmul_gelu_backward";
    matmul_backward_for(op, dinp, dweight, dbias, dout, inp, weight, n, c, oc)?;
    check_len(op, "pre", n * c, pre.len())
}

/// The matmul backward rule under `op`'s name.
#[allow(clippy::too_many_arguments)]
fn matmul_backward_for<L: Len + ?Sized>(
    op: &'static str,
    dinp: &L,
    dweight: Option<&L>,
    dbias: Option<&L>,
    dout: &L,
    inp: &L,
    weight: &L,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<()> {
    check_len(op, "dinp", n * c, dinp.len())?;
    dweight.map_or(Ok(()), |x| check_len(op, "dweight", oc * c, x.len()))?;
    dbias.map_or(Ok(()), |x| check_len(op, "dbias", oc, x.len()))?;
    check_len(op, "dout", n * oc, dout.len())?;
    check_len(op, "inp", n * c, inp.len())?;
    check_len(op, "weight", oc * c, weight.len())
}

mod sequence;
pub use sequence::*;

mod llama;
pub use llama::*;

mod lora;
pub use lora::*;
