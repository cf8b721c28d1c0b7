//! Shape rules of the Llama family's own ops: the token embedding without positions, RMSNorm
//! (alone and after the residual add), rotary position embedding and SwiGLU. (Grouped-query
//! attention's rules sit with the other attention rules in `sequence.rs`.)

use super::{elementwise, invalid, Len};
use crate::backend::{check_len, Result};

/// Checks for `embedding_forward`: `C > 0`, `out [B*T*C]`, `ids [B*T]` each in `[0, V)`,
/// `wte [V*C]`. Returns `V`.
pub fn embedding_forward<L: Len + ?Sized>(
    out: &L,
    ids: &[i32],
    wte: &L,
    b: usize,
    t: usize,
    c: usize,
) -> Result<usize> {
    embedding_for("embedding_forward", ["out", "wte"], out, ids, wte, b, t, c)
}

/// Checks for `embedding_backward`: those of `embedding_forward` with `dout`, `dwte` in place
/// of `out`, `wte`. Returns `V`.
pub fn embedding_backward<L: Len + ?Sized>(
    dwte: &L,
    dout: &L,
    ids: &[i32],
    b: usize,
    t: usize,
    c: usize,
) -> Result<usize> {
    embedding_for(
        "embedding_backward",
        ["dout", "dwte"],
        dout,
        ids,
        dwte,
        b,
        t,
        c,
    )
}

/// The embedding rule; `names` are the op's names for its (activation, table) buffers.
#[allow(clippy::too_many_arguments)]
fn embedding_for<L: Len + ?Sized>(
    op: &'static str,
    names: [&'static str; 2],
    act: &L,
    ids: &[i32],
    wte: &L,
    b: usize,
    t: usize,
    c: usize,
) -> Result<usize> {
    if c == 0 {
        return Err(invalid(op, "C must be positive".into()));
    }
    check_len(op, names[0], b * t * c, act.len())?;
    check_len(op, "ids", b * t, ids.len())?;
    let table = wte.len();
    check_len(op, names[1], table - table % c, table)?;
    let vocab = table / c;
    if let Some(i) = ids.iter().position(|&id| id < 0 || id as usize >= vocab) {
        let msg = format!(
            "token id {} at position {i} is outside [0, {vocab})",
            ids[i]
        );
        return Err(invalid(op, msg));
    }
    Ok(vocab)
}

/// Checks for `rmsnorm_forward`: `C > 0`, `eps` finite and `>= 0`, `out`, `inp` `[N*C]`,
/// `rstd [N]`, `weight [C]`.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_forward<L: Len + ?Sized>(
    out: &L,
    rstd: &L,
    inp: &L,
    weight: &L,
    n: usize,
    c: usize,
    eps: f32,
) -> Result<()> {
    rmsnorm_for("rmsnorm_forward", out, rstd, inp, weight, n, c, eps)
}

/// Checks for `residual_rmsnorm_forward`: `residual`, `a`, `b` `[N*C]`, then those of
/// `rmsnorm_forward` with `residual` as its input.
#[allow(clippy::too_many_arguments)]
pub fn residual_rmsnorm_forward<L: Len + ?Sized>(
    residual: &L,
    out: &L,
    rstd: &L,
    a: &L,
    b: &L,
    weight: &L,
    n: usize,
    c: usize,
    eps: f32,
) -> Result<()> {
    let op = "residual_rmsnorm_forward";
    elementwise(op, &[("residual", residual), ("a", a), ("b", b)], n * c)?;
    rmsnorm_for(op, out, rstd, residual, weight, n, c, eps)
}

/// The RMSNorm forward rule under `op`'s name.
#[allow(clippy::too_many_arguments)]
fn rmsnorm_for<L: Len + ?Sized>(
    op: &'static str,
    out: &L,
    rstd: &L,
    inp: &L,
    weight: &L,
    n: usize,
    c: usize,
    eps: f32,
) -> Result<()> {
    if c == 0 {
        return Err(invalid(op, "C must be positive".into()));
    }
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(invalid(
            op,
            format!("eps = {eps} is not a finite number >= 0"),
        ));
    }
    elementwise(op, &[("out", out), ("inp", inp)], n * c)?;
    check_len(op, "rstd", n, rstd.len())?;
    check_len(op, "weight", c, weight.len())
}

/// Checks for `rmsnorm_backward`: `C > 0`, `dinp`, `dout`, `inp` `[N*C]`; `dweight`, `weight`
/// `[C]`; `rstd [N]`.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward<L: Len + ?Sized>(
    dinp: &L,
    dweight: Option<&L>,
    dout: &L,
    inp: &L,
    weight: &L,
    rstd: &L,
    n: usize,
    c: usize,
) -> Result<()> {
    let op = "rmsnorm_backward";
    if c == 0 {
        return Err(invalid(op, "C must be positive".into()));
    }
    elementwise(op, &[("dinp", dinp), ("dout", dout), ("inp", inp)], n * c)?;
    elementwise(op, &[("weight", weight)], c)?;
    dweight.map_or(Ok(()), |x| check_len(op, "dweight", c, x.len()))?;
    check_len(op, "rstd", n, rstd.len())
}

/// Checks for `rope_forward`: see [`rope_backward`], whose rule it shares (with `qkv`).
#[allow(clippy::too_many_arguments)]
pub fn rope_forward<L: Len + ?Sized>(
    qkv: &L,
    inv_freq: &L,
    pos: Option<&[i32]>,
    b: usize,
    t: usize,
    nh: usize,
    nkv: usize,
    hs: usize,
) -> Result<()> {
    rope_for("rope_forward", "qkv", qkv, inv_freq, pos, b, t, nh, nkv, hs)
}

/// Checks for `rope_backward`: `hs` even and positive; `NKV > 0` dividing `NH > 0`;
/// `dqkv [B*T*(NH+2*NKV)*hs]`, `inv_freq [hs/2]`, and `pos [B*T]` each `>= 0` when given.
#[allow(clippy::too_many_arguments)]
pub fn rope_backward<L: Len + ?Sized>(
    dqkv: &L,
    inv_freq: &L,
    pos: Option<&[i32]>,
    b: usize,
    t: usize,
    nh: usize,
    nkv: usize,
    hs: usize,
) -> Result<()> {
    rope_for(
        "rope_backward",
        "dqkv",
        dqkv,
        inv_freq,
        pos,
        b,
        t,
        nh,
        nkv,
        hs,
    )
}

/// The RoPE rule under `op`'s name; `name` is the op's name for its `qkv` buffer.
#[allow(clippy::too_many_arguments)]
fn rope_for<L: Len + ?Sized>(
    op: &'static str,
    name: &'static str,
    qkv: &L,
    inv_freq: &L,
    pos: Option<&[i32]>,
    b: usize,
    t: usize,
    nh: usize,
    nkv: usize,
    hs: usize,
) -> Result<()> {
    if hs == 0 || !hs.is_multiple_of(2) {
        let msg = format!("the head size hs = {hs} must be even and positive");
        return Err(invalid(op, msg));
    }
    let w = super::attention_gqa_heads(op, nh * hs, nh, nkv)?;
    check_len(op, name, b * t * w, qkv.len())?;
    check_len(op, "inv_freq", hs / 2, inv_freq.len())?;
    if let Some(pos) = pos {
        check_len(op, "pos", b * t, pos.len())?;
        if let Some(i) = pos.iter().position(|&p| p < 0) {
            let msg = format!("position {} at index {i} is negative", pos[i]);
            return Err(invalid(op, msg));
        }
    }
    Ok(())
}

/// Checks for `swiglu_forward`: `I > 0`, `out [N*I]`, `gate_up [N*2I]`.
pub fn swiglu_forward<L: Len + ?Sized>(out: &L, gate_up: &L, n: usize, i: usize) -> Result<()> {
    let op = "swiglu_forward";
    if i == 0 {
        return Err(invalid(op, "I must be positive".into()));
    }
    check_len(op, "out", n * i, out.len())?;
    check_len(op, "gate_up", n * 2 * i, gate_up.len())
}

/// Checks for `swiglu_backward`: `I > 0`, `dgate_up`, `gate_up` `[N*2I]`, `dout [N*I]`.
pub fn swiglu_backward<L: Len + ?Sized>(
    dgate_up: &L,
    dout: &L,
    gate_up: &L,
    n: usize,
    i: usize,
) -> Result<()> {
    let op = "swiglu_backward";
    if i == 0 {
        return Err(invalid(op, "I must be positive".into()));
    }
    let bufs = [("dgate_up", dgate_up), ("gate_up", gate_up)];
    elementwise(op, &bufs, n * 2 * i)?;
    check_len(op, "dout", n * i, dout.len())
}
