//! The shape rule of every op: buffer lengths against the op's shape arguments, and the
//! arguments' ranges (ids, positions, heads, steps). Each backend calls the op's rule before it
//! computes or launches anything, so the rules live in one place; a failure names the op and
//! the buffer or argument. Backend-specific limits (a kernel's maximum head size, 32-bit grid
//! sizes) stay with the backend.

use super::{check_len, AdamWStep, BackendError, Result, SampleParams};

fn invalid(op: &'static str, msg: String) -> BackendError {
    BackendError::Invalid { op, msg }
}

/// Lengths for `encoder_forward`: `out [B*T*C]`, `ids [B*T]` each in `[0, V)`, `wte [V*C]`,
/// `wpe [Tmax*C]`, and `T <= Tmax` without `pos`, else `pos [B*T]` each in `[0, Tmax)`.
/// Returns `(V, Tmax)`.
#[allow(clippy::too_many_arguments)]
pub fn encoder_forward(
    out: usize,
    ids: &[i32],
    pos: Option<&[i32]>,
    wte: usize,
    wpe: usize,
    b: usize,
    t: usize,
    c: usize,
) -> Result<(usize, usize)> {
    let names = ["out", "wte", "wpe"];
    encoder("encoder_forward", names, out, ids, pos, wte, wpe, b, t, c)
}

/// Lengths for `encoder_backward`: those of `encoder_forward`, with `dout`, `dwte`, `dwpe` in
/// place of `out`, `wte`, `wpe`. Returns `(V, Tmax)`.
#[allow(clippy::too_many_arguments)]
pub fn encoder_backward(
    dwte: usize,
    dwpe: usize,
    dout: usize,
    ids: &[i32],
    pos: Option<&[i32]>,
    b: usize,
    t: usize,
    c: usize,
) -> Result<(usize, usize)> {
    let names = ["dout", "dwte", "dwpe"];
    encoder(
        "encoder_backward",
        names,
        dout,
        ids,
        pos,
        dwte,
        dwpe,
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
fn elementwise(op: &'static str, bufs: &[(&'static str, usize)], n: usize) -> Result<()> {
    bufs.iter()
        .try_for_each(|&(what, len)| check_len(op, what, n, len))
}

/// Lengths for `residual_forward`: `out`, `a`, `b` `[n]`.
pub fn residual_forward(out: usize, a: usize, b: usize, n: usize) -> Result<()> {
    elementwise("residual_forward", &[("out", out), ("a", a), ("b", b)], n)
}

/// Lengths for `gelu_forward`: `out`, `inp` `[n]`.
pub fn gelu_forward(out: usize, inp: usize, n: usize) -> Result<()> {
    elementwise("gelu_forward", &[("out", out), ("inp", inp)], n)
}

/// Lengths for `gelu_backward`: `dinp`, `inp`, `dout` `[n]`.
pub fn gelu_backward(dinp: usize, inp: usize, dout: usize, n: usize) -> Result<()> {
    let bufs = [("dinp", dinp), ("inp", inp), ("dout", dout)];
    elementwise("gelu_backward", &bufs, n)
}

/// Checks for `adamw`: `grad`, `m`, `v` as long as `param`, and a 1-based step.
pub fn adamw(param: usize, grad: usize, m: usize, v: usize, hp: &AdamWStep) -> Result<()> {
    let op = "adamw";
    check_len(op, "grad", param, grad)?;
    check_len(op, "m", param, m)?;
    check_len(op, "v", param, v)?;
    if hp.step == 0 {
        return Err(invalid(op, "step is 1-based, got 0".into()));
    }
    Ok(())
}

/// Lengths for `residual_layernorm_forward`: `residual`, `out`, `a`, `b` `[N*C]`; `mean`,
/// `rstd` `[N]`; `weight`, `bias` `[C]`.
#[allow(clippy::too_many_arguments)]
pub fn residual_layernorm_forward(
    residual: usize,
    out: usize,
    mean: usize,
    rstd: usize,
    a: usize,
    b: usize,
    weight: usize,
    bias: usize,
    n: usize,
    c: usize,
) -> Result<()> {
    let op = "residual_layernorm_forward";
    check_len(op, "residual", n * c, residual)?;
    check_len(op, "out", n * c, out)?;
    check_len(op, "mean", n, mean)?;
    check_len(op, "rstd", n, rstd)?;
    check_len(op, "a", n * c, a)?;
    check_len(op, "b", n * c, b)?;
    check_len(op, "weight", c, weight)?;
    check_len(op, "bias", c, bias)
}

/// Lengths for `layernorm_forward`: `out`, `inp` `[N*C]`; `mean`, `rstd` `[N]`; `weight`, `bias` `[C]`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward(
    out: usize,
    mean: usize,
    rstd: usize,
    inp: usize,
    weight: usize,
    bias: usize,
    n: usize,
    c: usize,
) -> Result<()> {
    let op = "layernorm_forward";
    check_len(op, "out", n * c, out)?;
    check_len(op, "mean", n, mean)?;
    check_len(op, "rstd", n, rstd)?;
    check_len(op, "inp", n * c, inp)?;
    check_len(op, "weight", c, weight)?;
    check_len(op, "bias", c, bias)
}

/// Lengths for `layernorm_backward`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dinp: usize,
    dweight: usize,
    dbias: usize,
    dout: usize,
    inp: usize,
    weight: usize,
    mean: usize,
    rstd: usize,
    n: usize,
    c: usize,
) -> Result<()> {
    let op = "layernorm_backward";
    check_len(op, "dinp", n * c, dinp)?;
    check_len(op, "dweight", c, dweight)?;
    check_len(op, "dbias", c, dbias)?;
    check_len(op, "dout", n * c, dout)?;
    check_len(op, "inp", n * c, inp)?;
    check_len(op, "weight", c, weight)?;
    check_len(op, "mean", n, mean)?;
    check_len(op, "rstd", n, rstd)
}

/// Lengths for `matmul_forward`: `out [N*OC]`, `inp [N*C]`, `weight [OC*C]`, `bias [OC]`.
pub fn matmul_forward(
    out: usize,
    inp: usize,
    weight: usize,
    bias: Option<usize>,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<()> {
    let op = "matmul_forward";
    check_len(op, "out", n * oc, out)?;
    check_len(op, "inp", n * c, inp)?;
    check_len(op, "weight", oc * c, weight)?;
    bias.map_or(Ok(()), |len| check_len(op, "bias", oc, len))
}

/// Lengths for `matmul_gelu_forward`: `out`, `pre` `[N*OC]`, then those of `matmul_forward`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_gelu_forward(
    out: usize,
    pre: usize,
    inp: usize,
    weight: usize,
    bias: Option<usize>,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<()> {
    let op = "matmul_gelu_forward";
    check_len(op, "out", n * oc, out)?;
    check_len(op, "pre", n * oc, pre)?;
    check_len(op, "inp", n * c, inp)?;
    check_len(op, "weight", oc * c, weight)?;
    bias.map_or(Ok(()), |len| check_len(op, "bias", oc, len))
}

/// Lengths for `matmul_backward`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_backward(
    dinp: usize,
    dweight: usize,
    dbias: Option<usize>,
    dout: usize,
    inp: usize,
    weight: usize,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<()> {
    let op = "matmul_backward";
    matmul_backward_for(op, dinp, dweight, dbias, dout, inp, weight, n, c, oc)
}

/// Lengths for `matmul_gelu_backward`: those of `matmul_backward` plus `pre [N*C]`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_gelu_backward(
    dinp: usize,
    dweight: usize,
    dbias: Option<usize>,
    dout: usize,
    inp: usize,
    weight: usize,
    pre: usize,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<()> {
    let op = "matmul_gelu_backward";
    matmul_backward_for(op, dinp, dweight, dbias, dout, inp, weight, n, c, oc)?;
    check_len(op, "pre", n * c, pre)
}

#[allow(clippy::too_many_arguments)]
fn matmul_backward_for(
    op: &'static str,
    dinp: usize,
    dweight: usize,
    dbias: Option<usize>,
    dout: usize,
    inp: usize,
    weight: usize,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<()> {
    check_len(op, "dinp", n * c, dinp)?;
    check_len(op, "dweight", oc * c, dweight)?;
    dbias.map_or(Ok(()), |len| check_len(op, "dbias", oc, len))?;
    check_len(op, "dout", n * oc, dout)?;
    check_len(op, "inp", n * c, inp)?;
    check_len(op, "weight", oc * c, weight)
}

/// Attention needs `NH > 0` heads that divide `C`.
pub fn attention_heads(op: &'static str, c: usize, nh: usize) -> Result<()> {
    if nh == 0 || c % nh != 0 {
        return Err(invalid(
            op,
            format!("C = {c} is not a multiple of NH = {nh}"),
        ));
    }
    Ok(())
}

/// Checks for `attention_forward`: heads, then `out [B*T*C]`, `lse [B*NH*T]`, `qkv [B*T*3C]`.
pub fn attention_forward(
    out: usize,
    lse: usize,
    qkv: usize,
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) -> Result<()> {
    let op = "attention_forward";
    attention_heads(op, c, nh)?;
    check_len(op, "out", b * t * c, out)?;
    check_len(op, "lse", b * nh * t, lse)?;
    check_len(op, "qkv", b * t * 3 * c, qkv)
}

/// Checks for `attention_backward`: heads, then the lengths.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dqkv: usize,
    dout: usize,
    qkv: usize,
    out: usize,
    lse: usize,
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) -> Result<()> {
    let op = "attention_backward";
    attention_heads(op, c, nh)?;
    check_len(op, "dqkv", b * t * 3 * c, dqkv)?;
    check_len(op, "dout", b * t * c, dout)?;
    check_len(op, "qkv", b * t * 3 * c, qkv)?;
    check_len(op, "out", b * t * c, out)?;
    check_len(op, "lse", b * nh * t, lse)
}

/// The optional `starts [B*T]` of attention over packed rows: each row is cut into contiguous
/// examples, and `starts[b*T + i]` is the position where the example holding `i` begins, so
/// `starts[b*T] = 0` and each later entry either repeats the one before or equals its own
/// position `i` (a new example). Anything else is [`BackendError::Invalid`] naming the entry.
pub fn attention_starts(
    op: &'static str,
    starts: Option<&[i32]>,
    b: usize,
    t: usize,
) -> Result<()> {
    let Some(starts) = starts else {
        return Ok(());
    };
    check_len(op, "starts", b * t, starts.len())?;
    for (k, &s) in starts.iter().enumerate() {
        let i = k % t;
        let prev = if i == 0 { 0 } else { starts[k - 1] };
        if s != prev && s as usize != i {
            return Err(BackendError::Invalid {
                op,
                msg: format!(
                    "starts[{k}] = {s} (row {}, position {i}): expected {prev} (same example) \
                     or {i} (a new example)",
                    k / t
                ),
            });
        }
    }
    Ok(())
}

/// Checks for `attention_cached_forward`: heads divide `C`, `past + Tn <= Tmax`, and lengths
/// `out [B*Tn*C]`, `qkv [B*Tn*3C]`, `k_cache`, `v_cache` `[B*Tmax*C]`.
#[allow(clippy::too_many_arguments)]
pub fn attention_cached_forward(
    out: usize,
    qkv: usize,
    k_cache: usize,
    v_cache: usize,
    b: usize,
    tn: usize,
    past: usize,
    tmax: usize,
    c: usize,
    nh: usize,
) -> Result<()> {
    let op = "attention_cached_forward";
    attention_heads(op, c, nh)?;
    if past + tn > tmax {
        return Err(BackendError::Invalid {
            op,
            msg: format!("past {past} + Tn {tn} new positions exceed the cache's Tmax {tmax}"),
        });
    }
    check_len(op, "out", b * tn * c, out)?;
    check_len(op, "qkv", b * tn * 3 * c, qkv)?;
    check_len(op, "k_cache", b * tmax * c, k_cache)?;
    check_len(op, "v_cache", b * tmax * c, v_cache)
}

/// Checks for `sample_tokens`: the parameters' ranges, `0 < V <= VP`, `logits [N*VP]`, and one
/// uniform in `[0, 1)` per row.
pub fn sample_tokens(
    logits: usize,
    n: usize,
    v: usize,
    vp: usize,
    params: &SampleParams,
    uniforms: &[f32],
) -> Result<()> {
    let op = "sample_tokens";
    params.check(op)?;
    if v == 0 || v > vp {
        return Err(BackendError::Invalid {
            op,
            msg: format!("need 0 < V <= VP, got V = {v}, VP = {vp}"),
        });
    }
    check_len(op, "logits", n * vp, logits)?;
    check_len(op, "uniforms", n, uniforms.len())?;
    if let Some(i) = uniforms.iter().position(|u| !(0.0..1.0).contains(u)) {
        return Err(BackendError::Invalid {
            op,
            msg: format!("uniforms[{i}] = {} is outside [0, 1)", uniforms[i]),
        });
    }
    Ok(())
}

/// Checks for `cross_entropy`: `0 < V <= VP`, `losses [N]`, `logits [N*VP]`, `targets [N]`
/// each below `V` (negative: masked), and per-row weights `[N]` when given.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy(
    losses: usize,
    logits: usize,
    targets: &[i32],
    weights: Option<usize>,
    n: usize,
    v: usize,
    vp: usize,
) -> Result<()> {
    let op = "cross_entropy";
    if v == 0 || v > vp {
        return Err(BackendError::Invalid {
            op,
            msg: format!("need 0 < V <= VP, got V = {v}, VP = {vp}"),
        });
    }
    check_len(op, "losses", n, losses)?;
    check_len(op, "logits", n * vp, logits)?;
    check_len(op, "targets", n, targets.len())?;
    weights.map_or(Ok(()), |len| check_len(op, "weights", n, len))?;
    match targets.iter().position(|&x| x >= 0 && x as usize >= v) {
        None => Ok(()),
        Some(i) => Err(BackendError::Invalid {
            op,
            msg: format!("target {} at row {i} is not below V = {v}", targets[i]),
        }),
    }
}
